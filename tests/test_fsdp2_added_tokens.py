"""Added tokens trained under FSDP2: ``CausalLMModule(resize_embeddings=True)`` with LoRA on 2 gloo CPU processes.

A user's run: a tiny saved Llama (300 ids), a tokenizer with ChatML's two tokens and 70 tool tokens added (72 new
rows, so peft's ``trainable_tokens_delta`` of the embedding and of the untied head is 72 x 64 = 4608 elements: 8-bit
state, not the fp32 kept for tensors under 4096), LoRA, the module sharded the FSDP2 way (``fully_shard`` per
decoder layer, then the whole peft model: each delta is split by rows, 36 per rank), Lightning's
``ModelParallelStrategy``, the optimizer the recipes name through ``LowMemOptimizerCallback`` (``adamw_8bit``,
``came``), gradient clipping, a ``ModelCheckpoint`` every 2 steps, ``save_dir`` for the adapter. The script (the
strategy re-launches it as rank 1) trains 4 steps, then resumes the step-2 checkpoint to step 4. Cases: ``adamw_8bit``
(the default test), ``came``, and QLoRA (NF4) on a tied Qwen2 with ``adamw_8bit`` (its head shares the embedding's
delta); the last two are marked slow (~20 s each). Checked:

* one process on the same global batches (batch 4 where each rank reads 2; every row has the same number of
  targets, so the mean of the ranks' losses is the single loss) reaches the same losses, LoRA weights and trained
  rows, to the tolerance of ``tests/test_fsdp2.py`` (rtol 1e-4, atol 2e-5);
* the resumed run ends bit for bit where the straight one does (losses too), from a sharded checkpoint
  (``adamw_8bit``) or a single file (``came``);
* each rank's optimizer holds state for its 36 rows of each delta only (``adamw_8bit``: 8-bit codes);
* the adapter ``save_dir`` got (gathered from the shards) holds the trained rows exactly and loads with
  ``PeftModel.from_pretrained`` on the base grown to the tokenizer's length; ``lowmem export`` of the single-file
  checkpoint writes the same adapter.

Nothing needed fixing: peft's ``TrainableTokensWrapper`` keeps its frozen embedding and its delta in the root
``fully_shard`` group (the delta a ``Shard(0)`` DTensor param like any other, gathered for each forward, its gradient
reduce-scattered), and the optimizers update and save its state per shard.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from launched_scripts import run_script
from test_added_tokens import ADDED, BASE_VOCAB, TINY, _base_tokenizer
from test_data_chat import CHATML

from lowmem_lightning.modules.causal_lm import CausalLMModule

TOOLS = [f"<|tool_{i}|>" for i in range(70)]
NEW_ROWS = len(ADDED) + len(TOOLS)
STEPS, LR = 4, 3e-3
EMBED_DELTA = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
HEAD_DELTA = "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"
# case -> (optimizer, checkpoint, quantize, checkpoint form: True a torch.distributed.checkpoint folder, False one
# file written by rank 0)
CASES = {"adamw_8bit": ("adamw_8bit", "llama", None, True), "came": ("came", "llama", None, False),
         "qlora_tied": ("adamw_8bit", "qwen", "nf4", True), "qdora_tied": ("adamw_8bit", "qwen", "nf4", True)}
DORA_CASES = ("qdora_tied",)
"""Cases whose adapters are DoRA (``use_dora``: a magnitude per output row, sharded like any param)."""


class ShardedCausalLM(CausalLMModule):
    """``CausalLMModule`` sharded the FSDP2 way: each decoder layer of the peft model's base, then the whole; not
    sharded without a device mesh (``lowmem export`` builds it on one process)."""

    def configure_model(self) -> None:
        """Build the model (LoRA, grown embeddings), then shard it (once)."""
        from torch.distributed.fsdp import fully_shard

        if self.model is not None:
            return
        super().configure_model()
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def module_args(files: Path, case: str, save_dir: Path) -> dict:
    """The ``CausalLMModule`` arguments of both runs of ``case``."""
    _, name, quantize, _ = CASES[case]
    lora = {"r": 4, "use_dora": case in DORA_CASES}
    return {"model_name_or_path": str(files / name), "quantize": quantize, "lora": lora,
            "resize_embeddings": True, "save_dir": str(save_dir)}


def deltas(case: str) -> tuple[str, ...]:
    """The trained rows' params of ``case``: the embedding's and the untied head's (a tied head shares the
    embedding's)."""
    return (EMBED_DELTA,) if CASES[case][1] == "qwen" else (EMBED_DELTA, HEAD_DELTA)


def data_args(files: Path, batch_size: int) -> dict:
    """The ``TextDataModule`` arguments: chat turns as plain text, packed into 32-token blocks."""
    return {"data_path": str(files / "chat.txt"), "tokenizer": str(files / "tok"), "seq_len": 32,
            "batch_size": batch_size, "val_fraction": 0.0}


SCRIPT = """
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

sys.path.insert(0, {tests_dir!r})
from test_fsdp2_added_tokens import CASES, LR, STEPS, ShardedCausalLM, data_args, deltas, module_args
from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.data import TextDataModule

files, out, case = Path({files!r}), {out!r}, {case!r}
opt, _, _, distributed = CASES[case]


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def fit(name, ckpt_path=None):
    L.seed_everything(0)
    module = ShardedCausalLM(**module_args(files, case, out + "/" + name + "-adapter"))
    losses = Losses()
    callbacks = [losses, LowMemOptimizerCallback(opt, lr=LR, plot=False, print_summary=False)]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=out + "/ckpt", every_n_train_steps=2, save_top_k=-1,
                                         filename="{{step}}"))
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=STEPS, logger=False, gradient_clip_val=1.0,
                        enable_checkpointing=ckpt_path is None, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                       save_distributed_checkpoint=distributed))
    trainer.fit(module, TextDataModule(**data_args(files, 2)), ckpt_path=ckpt_path)
    trained = {{n: p for n, p in module.model.named_parameters() if p.requires_grad}}
    full = {{n: p.full_tensor().detach().clone() for n, p in trained.items()}}  # every rank joins each gather
    optimizer = trainer.optimizers[0]
    delta_state = {{n: {{k: tuple(v.shape) for k, v in optimizer.state[trained[n]].items()}} for n in deltas(case)}}
    local_rows = {{n: trained[n].to_local().shape[0] for n in deltas(case)}}
    return trainer, {{"losses": losses.losses, "params": full, "delta_state": delta_state,
                     "local_rows": local_rows, "types": sorted({{type(p).__name__ for p in trained.values()}})}}


straight_trainer, straight = fit("straight")
_, resumed = fit("resumed", ckpt_path=out + "/ckpt/step=2.ckpt")
rank = straight_trainer.global_rank
torch.save({{"straight": straight, "resumed": resumed}}, out + f"/rank{{rank}}.pt")
torch.distributed.barrier()  # gloo's threads joined before exit
torch.distributed.destroy_process_group()
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """``tok/``: the base tokenizer + ChatML's and 70 tool tokens (302 + 70 ids), ``llama/`` (untied) and ``qwen/``
    (tied): tiny checkpoints embedding the base's 300 ids, ``chat.txt``: 50 ChatML exchanges as plain text, each
    answer with a tool token."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("fsdp2-added")
    tok = _base_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ADDED + TOOLS})
    tok.chat_template = CHATML
    tok.save_pretrained(root / "tok")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=BASE_VOCAB)).save_pretrained(root / "llama")
    Qwen2ForCausalLM(Qwen2Config(**TINY, vocab_size=BASE_VOCAB, tie_word_embeddings=True)).save_pretrained(
        root / "qwen")
    (root / "chat.txt").write_text("".join(
        f"<|im_start|>user\nWhat is {i}+2?<|im_end|>\n<|im_start|>assistant\n{TOOLS[i % 70]}It is {i + 2}.<|im_end|>\n"
        for i in range(50)))
    return root


class _Record(L.Callback):
    """Each step's loss, and the number of targets of each row of its batch."""

    def __init__(self):
        self.losses, self.targets = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.targets += (batch["labels"][:, 1:] != -100).sum(dim=1).tolist()


def _single_process(files: Path, case: str, save_dir: Path) -> tuple[dict, list[float], torch.Tensor]:
    """The same 4 steps on one process, batch 4 (the two ranks' batches of 2): trained params, losses, and the
    embedding's added rows as they started (peft's copy)."""
    from lowmem_lightning.callbacks import LowMemOptimizerCallback
    from lowmem_lightning.data import TextDataModule

    L.seed_everything(0)
    module = CausalLMModule(**module_args(files, case, save_dir))
    record = _Record()
    optimizer = LowMemOptimizerCallback(CASES[case][0], lr=LR, plot=False, print_summary=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        gradient_clip_val=1.0, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record, optimizer])
    trainer.fit(module, TextDataModule(**data_args(files, 4)))
    assert set(record.targets) == {31}, record.targets  # equal rows: the mean of the ranks' means is this mean
    start = module.model.get_input_embeddings().token_adapter.trainable_tokens_original["default"]
    return {n: p.detach() for n, p in module.model.named_parameters() if p.requires_grad}, record.losses, start


def _run_ranks(files: Path, out: Path, case: str) -> list[dict]:
    script = out / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests_dir=os.path.dirname(__file__), files=str(files),
                                                    out=str(out), case=case)))
    run_script(script, cwd=out, timeout=600)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


SLOW = [pytest.param(case, marks=pytest.mark.slow) for case in ("came", "qlora_tied", "qdora_tied")]


@pytest.mark.parametrize("case", ["adamw_8bit", *SLOW])  # ~20 s each
def test_added_rows_train_sharded_as_on_one_process_and_resume_bit_for_bit(files, tmp_path, case):
    from peft import PeftModel
    from safetensors.torch import load_file

    from lowmem_lightning.quant import load_lora

    ranks = _run_ranks(files, tmp_path, case)
    single, single_losses, start = _single_process(files, case, tmp_path / "single-adapter")
    straight = ranks[0]["straight"]
    assert straight["types"] == ["DTensor"]
    assert set(straight["params"]) == set(single) and set(deltas(case)) <= set(single)
    for name, value in single.items():
        torch.testing.assert_close(straight["params"][name], value, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    moved = (single[EMBED_DELTA][:len(ADDED)] - start[:len(ADDED)]).abs().amin(dim=1)
    assert moved.gt(0).all()  # the ChatML rows (in every batch) trained
    mean_losses = [sum(pair) / 2 for pair in zip(ranks[0]["straight"]["losses"], ranks[1]["straight"]["losses"])]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(single_losses), rtol=1e-5, atol=0)

    for result in ranks:
        straight, resumed = result["straight"], result["resumed"]
        assert resumed["losses"] == straight["losses"][2:]
        for name, value in straight["params"].items():
            assert torch.equal(resumed["params"][name], value), name
        for name in deltas(case):
            assert straight["local_rows"][name] == NEW_ROWS // 2
            state = straight["delta_state"][name]
            if CASES[case][0] == "adamw_8bit":  # 8-bit codes of this rank's rows only (flat, in blocks of 256)
                assert state["exp_avg_codes"] == (NEW_ROWS // 2 * TINY["hidden_size"],), state

    adapter = load_file(tmp_path / "straight-adapter" / "adapter_model.safetensors")
    trained = ranks[0]["straight"]["params"]
    for name in (EMBED_DELTA, HEAD_DELTA):  # a tied head's delta saved as the embedding's
        saved = adapter[name.removesuffix(".default")]
        assert torch.equal(saved, trained[name if name in trained else EMBED_DELTA]), name
    base = _base(files, case)
    base.resize_token_embeddings(BASE_VOCAB + NEW_ROWS)
    loaded = (load_lora(base, tmp_path / "straight-adapter") if case in DORA_CASES  # peft's DoRA reads no NF4
              else PeftModel.from_pretrained(base, tmp_path / "straight-adapter"))
    rows = loaded.get_input_embeddings().token_adapter.get_merged_weights(["default"])
    assert torch.equal(rows[BASE_VOCAB:], trained[EMBED_DELTA])

    if not CASES[case][3]:  # a single-file checkpoint: lowmem export on one process writes the same adapter
        _export(files, case, tmp_path, tmp_path / "ckpt" / f"step={STEPS}.ckpt")
        exported = load_file(tmp_path / "exported" / "adapter_model.safetensors")
        assert exported.keys() == adapter.keys()
        for key, value in adapter.items():
            assert torch.equal(exported[key], value), key


def _base(files: Path, case: str):
    """The base model of ``case`` as a user loads it to put the adapter on (NF4 for QLoRA), grown to the
    tokenizer's length."""
    from transformers import AutoModelForCausalLM

    from lowmem_lightning.quant import load_pretrained_causal_lm

    _, name, quantize, _ = CASES[case]
    if quantize:
        base = load_pretrained_causal_lm(str(files / name), quantize=quantize, skip=("lm_head",),
                                         torch_dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(files / name, local_files_only=True)
    base.resize_token_embeddings(BASE_VOCAB + NEW_ROWS)
    return base


def _export(files: Path, case: str, tmp_path: Path, ckpt: Path) -> None:
    """``lowmem export`` of ``ckpt`` with a recipe of the same module and data (one process: no device mesh)."""
    from lowmem_lightning.cli import main

    recipe = {"model": {"class_path": f"{__name__}.ShardedCausalLM",
                        "init_args": {**module_args(files, case, tmp_path / "unused"), "save_dir": None}},
              "data": {"class_path": "lowmem_lightning.data.text.TextDataModule", "init_args": data_args(files, 4)}}
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["export", "--config", str(tmp_path / "export.yaml"), "--ckpt_path", str(ckpt),
                 "--save_dir", str(tmp_path / "exported")]) == 0
