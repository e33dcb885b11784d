"""A pretrained checkpoint trains in train mode: ``from_pretrained`` hands models over in eval mode and Lightning keeps
each module's mode at fit start, so without ``CausalLMModule`` switching it dropout was off and transformers' gradient
checkpointing (active only while ``module.training``) was silently skipped: the activations of every layer kept,
the memory the recipes' ``gradient_checkpointing: true`` is there to save."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lowmem_lightning.modules.causal_lm import CausalLMModule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama with attention dropout, saved as users' checkpoints are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.5)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


class LayerCalls(L.Callback):
    """Counts the calls of the decoder layers' first norm in the first training step (transformers checkpoints a
    layer's ``forward``, not ``__call__``, so the recompute shows in the layer's children; a pre-hook, as the
    recompute stops once it has what backward needs) and records the modes seen then."""

    def __init__(self):
        self.calls, self.eval_modules, self.handles = 0, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        self.eval_modules = [name for name, m in pl_module.model.named_modules() if not m.training]
        for layer in _decoder_layers(pl_module.model):
            self.handles.append(layer.input_layernorm.register_forward_pre_hook(self._count))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _count(self, *args):
        self.calls += 1


def _decoder_layers(model) -> list[torch.nn.Module]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]


def _first_step(checkpoint, **kwargs) -> LayerCalls:
    module = CausalLMModule(model_name_or_path=str(checkpoint), optimizer="adamw", **kwargs)
    calls = LayerCalls()
    batch = {"input_ids": torch.randint(0, 259, (2, 16)), "labels": torch.randint(0, 259, (2, 16))}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[calls], accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    return calls


@pytest.mark.parametrize("kwargs", [{}, {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                                    {"quantize": "nf4", "lora": {"r": 4, "alpha": 8}}],
                         ids=["full", "lora", "qlora"])
def test_a_pretrained_model_trains_in_train_mode_and_checkpointing_recomputes(checkpoint, kwargs):
    """Every module trains (dropout on), and with checkpointing each decoder layer runs twice in a step (forward,
    then again in backward), once without."""
    checkpointed = _first_step(checkpoint, gradient_checkpointing=True, **kwargs)
    assert checkpointed.eval_modules == []
    assert checkpointed.calls == 2 * 2  # two layers, each recomputed in backward
    plain = _first_step(checkpoint, gradient_checkpointing=False, **kwargs)
    assert plain.eval_modules == [] and plain.calls == 2


def _checkpointed_model(path: str, train_mode: bool):
    """The checkpoint at ``path`` as a project loads it: ``from_pretrained`` (eval mode), gradient checkpointing on,
    and ``model.train()`` only when ``train_mode``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train() if train_mode else model


class UsersModule(L.LightningModule):
    """A project's own module around an HF model, written the usual way: from_pretrained and checkpointing in
    ``__init__``, its own AdamW."""

    def __init__(self, path: str, train_mode: bool):
        super().__init__()
        self.model = _checkpointed_model(path, train_mode)

    def training_step(self, batch, batch_idx):
        return self.model(**batch, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _eval_mode_warnings_of_one_step_with_the_callback(module: L.LightningModule) -> list[str]:
    """The eval-mode ``LowMemWarning`` messages of one training step of ``module`` with ``LowMemOptimizerCallback``
    (``adamw_8bit``), every warning shown (``simplefilter("always")``)."""
    import warnings

    from lowmem_lightning.callbacks import LowMemOptimizerCallback
    from lowmem_lightning.lowmem_warning import LowMemWarning

    batch = {"input_ids": torch.randint(0, 259, (2, 16)), "labels": torch.randint(0, 259, (2, 16))}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1,
                        callbacks=[LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    return [str(w.message) for w in caught if issubclass(w.category, LowMemWarning) and "eval mode" in str(w.message)]


@pytest.mark.parametrize("train_mode", [False, True])
def test_the_callback_warns_when_checkpointing_layers_train_in_eval_mode(checkpoint, train_mode):
    """LowMemOptimizerCallback on a project that loaded its model with from_pretrained: one warning naming the layers
    and the fix while they are in eval mode (checkpointing skipped); none after model.train()."""
    said = _eval_mode_warnings_of_one_step_with_the_callback(UsersModule(str(checkpoint), train_mode))
    if train_mode:
        assert said == []
    else:
        assert len(said) == 1
        assert said[0].startswith("Gradient checkpointing is on in 2 layer(s) that are in eval mode (e.g. "
                                  "'model.model.layers.0')")
        assert "call model.train() after loading it" in said[0]


class UsersLowMemModule:
    """A LowMemModule subclass written the same way (built lazily: LowMemModule is imported inside the test)."""

    @staticmethod
    def build(path: str, train_mode: bool):
        from lowmem_lightning import LowMemModule

        class Subclass(LowMemModule):
            def __init__(self):
                super().__init__(optimizer="adamw_8bit", lr=1e-3)
                self.model = _checkpointed_model(path, train_mode)

            def training_step(self, batch, batch_idx):
                return self.model(**batch, use_cache=False).loss

        return Subclass()


@pytest.mark.parametrize("train_mode", [False, True])
def test_a_lowmem_module_subclass_is_warned_too(checkpoint, train_mode):
    """The same warning from LowMemModule itself (no callback), none after model.train()."""
    import warnings

    from lowmem_lightning.lowmem_warning import LowMemWarning

    batch = {"input_ids": torch.randint(0, 259, (2, 16)), "labels": torch.randint(0, 259, (2, 16))}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(UsersLowMemModule.build(str(checkpoint), train_mode),
                    torch.utils.data.DataLoader([batch], batch_size=None))
    said = [str(w.message) for w in caught if issubclass(w.category, LowMemWarning) and "eval mode" in str(w.message)]
    assert len(said) == (0 if train_mode else 1)


def test_a_lowmem_module_under_the_callback_is_warned_once(checkpoint):
    """A LowMemModule subclass trained with LowMemOptimizerCallback: both would warn (the module's on_train_start and
    the callback's CheckpointingModeCheck part); under ``simplefilter("always")`` the user still reads it once."""
    said = _eval_mode_warnings_of_one_step_with_the_callback(UsersLowMemModule.build(str(checkpoint), False))
    assert len(said) == 1, said
