"""A vision user's existing Lightning project, as tests/test_field_vision.py meets it: synthetic 32x32x3 images
(no download), a small ResNet-like CNN and a small ViT, the module's own AdamW with decay / no-decay groups and a
OneCycleLR (CNN) or CosineAnnealingLR (ViT) schedule, bf16-mixed and ModelCheckpoint(monitor="val_acc").

Importable by ``lowmem estimate`` (``model: {class_path: vision_project.ImageClassifier}``) with this folder on
``PYTHONPATH``.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

CLASSES = 4
"""Two blob colours x two blob sizes."""


def blob_images(n: int, seed: int, noise: float = 1.0) -> TensorDataset:
    """``n`` images ``[3, 32, 32]`` (fp32) and labels: a red or blue Gaussian blob, small (sigma 2 px) or large
    (sigma 5 px), at a random place, under N(0, ``noise``**2) pixel noise; label = 2 * colour + size."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cy, cx = torch.rand(2, n, 1, 1, generator=gen) * 20 + 6
    sigma = torch.where(labels % 2 == 0, 2.0, 5.0)[:, None, None]
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))  # [n, 32, 32]
    colours = torch.tensor([[1.0, 0.2, 0.2], [0.2, 0.2, 1.0]])[labels // 2]  # [n, 3]
    images = 1.5 * colours[:, :, None, None] * blob[:, None] + noise * torch.randn(n, 3, 32, 32, generator=gen)
    return TensorDataset(images, labels)


def loaders(batch_size: int = 64, train: int = 1024, val: int = 256) -> tuple[DataLoader, DataLoader]:
    """Training (shuffled, seeded by Lightning's seed) and validation loaders of :func:`blob_images`."""
    return (DataLoader(blob_images(train, 0), batch_size=batch_size, shuffle=True),
            DataLoader(blob_images(val, 1), batch_size=val))


class ResNetish(nn.Module):
    """Stem conv (no bias) + BatchNorm, a depthwise (groups=C) residual block, a 1x1 conv with bias beside a
    strided 3x3 downsample, a Conv1d over the width of the height-pooled map, and a Linear head."""

    def __init__(self, width: int = 16, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(width)
        self.pointwise = nn.Conv2d(width, 2 * width, 1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(2 * width)
        self.across_width = nn.Conv1d(2 * width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # [B, C, 32, 32]
        x = x + torch.relu(self.bn_depthwise(self.depthwise(x)))
        x = torch.relu(self.pointwise(x))[:, :, ::2, ::2] + torch.relu(self.bn_down(self.down(x)))  # [B, 2C, 16, 16]
        x = torch.relu(self.across_width(x.mean(2))).mean(2)  # [B, 2C]
        return self.head(x)


class ViTish(nn.Module):
    """Patch-embedding Conv2d (8x8 patches), cls token ``[1, 1, D]``, position embedding ``[1, N + 1, D]``, one
    pre-norm transformer block (LayerNorm, multi-head attention, MLP) and a Linear head on the cls token."""

    def __init__(self, dim: int = 32, patch: int = 8, heads: int = 4, classes: int = CLASSES):
        super().__init__()
        patches = (32 // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed  # [B, N + 1, D]
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x[:, 0]))


class ImageClassifier(L.LightningModule):
    """The project's module: ``arch`` ``"resnet"`` (OneCycleLR, ``cycle_momentum`` as given) or ``"vit"``
    (CosineAnnealingLR), AdamW at ``lr`` with weight decay 0.05 on conv/linear weights and none on norms, biases
    and the ViT's tokens; ``channels_last`` puts the network in that memory format. Logs ``train_loss`` and
    ``val_acc``."""

    def __init__(self, arch: str = "resnet", lr: float = 3e-3, channels_last: bool = False,
                 cycle_momentum: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.net = ResNetish() if arch == "resnet" else ViTish()
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            tokens = name.endswith(("cls_token", "pos_embed"))
            (no_decay if param.ndim <= 1 or tokens else decay).append(param)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=self.hparams.lr)
        steps = self.trainer.estimated_stepping_batches
        if self.hparams.arch == "resnet":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=steps,
                                                        cycle_momentum=self.hparams.cycle_momentum)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
