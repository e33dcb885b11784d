"""MoE routers kept in fp32, as transformers keeps them, through our loads and every cast of the model.

DeepSeek-V2/V3, GLM-4.5, ERNIE 4.5 MoE and Nemotron-H list their router weights and score-correction biases in
``_keep_in_fp32_modules_strict``: ``from_pretrained(dtype=torch.bfloat16)`` loads them fp32. Before, the NF4 loader
cast them to the load dtype (the routing of the model the QLoRA recipe trained was not the released model's), and the
full fine-tune's builder and Lightning's ``bf16-true`` cast did the same. Each model here is a tiny random checkpoint
of its transformers 5 config class written by ``save_pretrained`` (fp32 values, sharded), as a user's directory.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from test_field_architectures import PEFT_ADAPTS_LINEAR_MOE_NAMES, RECIPE_LORA, SIZES
from tiny_checkpoints import checkpoint_maker

from lowmem_lightning.data import TextDataModule
from lowmem_lightning.kept_fp32 import cast_keeping_fp32, kept_fp32_names
from lowmem_lightning.modules.causal_lm import CausalLMModule, build_causal_lm
from lowmem_lightning.quant import load_pretrained_causal_lm, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_hidden_layers": 4}
DEEPSEEK_ATTENTION = {"q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                      "v_head_dim": 16}
ROUTED = {
    # name: (config class, settings beyond SIZES, the router tensors transformers keeps fp32 in each MoE layer)
    "deepseek_v3": ("DeepseekV3Config", {**MOE, **DEEPSEEK_ATTENTION, "n_routed_experts": 4, "n_shared_experts": 1,
                                         "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
                    {"mlp.gate.weight", "mlp.gate.e_score_correction_bias"}),
    "deepseek_v2": ("DeepseekV2Config", {**MOE, **DEEPSEEK_ATTENTION, "n_routed_experts": 4, "n_shared_experts": 1,
                                         "first_k_dense_replace": 1}, {"mlp.gate.weight"}),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", {**MOE, "moe_num_experts": 4, "moe_k": 2, "moe_num_shared_experts": 1},
                     {"mlp.gate.weight", "mlp.gate.moe_statics.e_score_correction_bias"}),
    "glm4_moe": ("Glm4MoeConfig", {**MOE, "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
                                   "head_dim": 16}, {"mlp.gate.weight", "mlp.gate.e_score_correction_bias"}),
    "nemotron_h": ("NemotronHConfig", {**MOE, "layers_block_type": ["mamba", "moe", "attention", "moe"],
                                       "n_routed_experts": 4, "head_dim": 16, "mamba_num_heads": 4,
                                       "mamba_head_dim": 16, "n_groups": 1, "ssm_state_size": 16},
                   {"mixer.gate.weight", "mixer.gate.e_score_correction_bias"}),
    # routers that are linear layers (nothing kept fp32 by transformers): kept dense by NF4
    "gemma4_moe": ("Gemma4TextConfig", {"head_dim": 16, "global_head_dim": 16, "hidden_size_per_layer_input": 0,
                                        "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                                        "moe_intermediate_size": 32,
                                        "layer_types": ["sliding_attention", "full_attention"]}, set()),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 64}, set()),
}
LINEAR_ROUTERS = {"gemma4_moe": "router.proj", "qwen2_moe": "mlp.shared_expert_gate"}


@pytest.fixture(scope="module")
def routed_dirs(tmp_path_factory):
    """``name -> directory`` of each MoE checkpoint, written on first use."""
    import transformers

    def build(name: str):
        cls, settings, _ = ROUTED[name]
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{**SIZES, **settings}))
        with torch.no_grad():  # the biases start at zero: give them values whose precision can be lost
            for key in kept_fp32_names(model):
                if key.endswith("e_score_correction_bias"):
                    _tensor(model, key).normal_()
        return model

    return checkpoint_maker(tmp_path_factory.mktemp("routed"), build)


def _tensor(model, key: str) -> torch.Tensor:
    """Parameter or buffer ``key`` of ``model``."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return tensors[key]


def _kept(model) -> set[str]:
    """The kept-fp32 tensors of ``model`` as layer-relative names (``mlp.gate.weight``)."""
    return {name.split(".layers.")[-1].split(".", 1)[-1] for name in kept_fp32_names(model)}


@pytest.mark.parametrize("name", list(ROUTED))
def test_the_nf4_load_keeps_the_routers_fp32_and_equals_transformers_load(name, routed_dirs):
    """The QLoRA recipe's NF4 load: each router tensor fp32 with the file's values (before: rounded to bf16), and the
    model's logits equal those of ``quantize_model`` applied to transformers' own bf16 load."""
    from transformers import AutoModelForCausalLM

    path = routed_dirs(name)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert _kept(theirs) == ROUTED[name][2]
    ours = load_pretrained_causal_lm(path, device="cpu")
    mine = {**dict(ours.named_parameters()), **dict(ours.named_buffers())}
    for key in kept_fp32_names(theirs):
        assert mine[key].dtype == torch.float32 and torch.equal(mine[key], _tensor(theirs, key)), key
    theirs = quantize_model(theirs, skip=("lm_head",))
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["deepseek_v3", "nemotron_h"])
def test_a_full_finetune_trains_the_routers_in_fp32_through_bf16_true(name, routed_dirs):
    """The full fine-tune's build (``from_pretrained`` then a cast: before, a plain ``.to(bfloat16)``) and
    Lightning's ``bf16-true`` cast of the module keep the routers fp32; they train there, the rest is bf16."""
    from transformers import AutoModelForCausalLM

    path = routed_dirs(name)
    module = CausalLMModule(model_name_or_path=str(path), torch_dtype="bfloat16", optimizer="adamw_8bit", lr=1e-2)
    module.configure_model()
    kept = kept_fp32_names(module.model)
    loaded = {key: module.model.get_parameter(key).detach().clone() for key in kept if key.endswith("gate.weight")}
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert all(torch.equal(value, reference.get_parameter(key)) for key, value in loaded.items())
    data = TextDataModule("sample", seq_len=32, batch_size=2, val_fraction=0.02, seed=0,
                          isolate_documents=name != "nemotron_h")  # its Mamba layers cannot keep documents apart
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, precision="bf16-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data)
    tensors = {**dict(module.model.named_parameters()), **dict(module.model.named_buffers())}
    assert {key for key, t in tensors.items() if t.dtype == torch.float32 and "inv_freq" not in key} == set(kept)
    assert all(not torch.equal(module.model.get_parameter(key), value) for key, value in loaded.items())


def test_fp16_keeps_what_transformers_keeps_against_fp16_only():
    """gpt-oss lists its norms in ``_keep_in_fp32_modules`` (kept against fp16 only) and nothing as strict: a cast to
    fp16 leaves them fp32, a cast to bf16 does not."""
    import transformers

    config = transformers.GptOssConfig(**{**SIZES, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                          "sliding_window": 32})
    model = transformers.AutoModelForCausalLM.from_config(config)
    norms = {key for key in kept_fp32_names(model)}
    assert norms and all("norm" in key for key in norms)
    cast_keeping_fp32(model, torch.float16)
    assert {key for key, p in model.named_parameters() if p.dtype == torch.float32} == norms
    cast_keeping_fp32(model, torch.bfloat16)
    assert not [key for key, p in model.named_parameters() if p.dtype == torch.float32]


class _OwnProject(L.LightningModule):
    """A user's own module around a DeepSeek-V3 checkpoint loaded by transformers in bf16 (not a LowMemModule)."""

    def __init__(self, path: Path):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_the_callback_keeps_a_projects_routers_fp32_under_bf16_true(routed_dirs, tmp_path):
    """An existing project's module under ``bf16-true`` with ``LowMemOptimizerCallback``: Lightning's cast rounded the
    routers transformers loaded in fp32 (before); the callback takes them at ``setup`` and puts them back before the
    first step, so they train in fp32 from the checkpoint's values."""
    from torch.utils.data import DataLoader, TensorDataset

    from lowmem_lightning.callbacks import LowMemOptimizerCallback

    module = _OwnProject(routed_dirs("deepseek_v3"))
    kept = kept_fp32_names(module.model)
    loaded = {key: _tensor(module.model, key).detach().clone() for key in kept}
    seen = {}

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen.update({key: _tensor(pl_module.model, key).detach().clone() for key in kept})

    data = DataLoader(TensorDataset(torch.randint(0, 256, (4, 32))), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-true", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[
                            LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False), FirstStep()])
    trainer.fit(module, data)
    assert module.model.model.embed_tokens.weight.dtype == torch.bfloat16
    for key, value in loaded.items():
        assert seen[key].dtype == torch.float32 and torch.equal(seen[key], value), key
        assert _tensor(module.model, key).dtype == torch.float32, key


@pytest.mark.parametrize("name", list(LINEAR_ROUTERS))
def test_routers_that_are_linear_layers_stay_dense_under_nf4(name, routed_dirs):
    """Gemma 4's ``router.proj`` and Qwen2-MoE's ``shared_expert_gate`` are linear layers: NF4 took them too (before;
    as transformers' bitsandbytes path does), and NF4 on a router sends about half the tokens of a random Gemma-4-
    shaped layer to other experts (``python benchmarks/router_precision.py``). The NF4 load and ``quantize_model``
    keep them dense with the checkpoint's values; the experts and the other linear layers are NF4."""
    from transformers import AutoModelForCausalLM

    from lowmem_lightning.quant import Experts4bit, Linear4bit, router_names

    path = routed_dirs(name)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ours = load_pretrained_causal_lm(path, device="cpu")
    routers = router_names(ours)
    assert routers and all(key.endswith(LINEAR_ROUTERS[name]) for key in routers)
    for key in routers:
        assert type(ours.get_submodule(key)) is torch.nn.Linear, key
        assert torch.equal(ours.get_submodule(key).weight, theirs.get_submodule(key).weight), key
    assert any(isinstance(m, Experts4bit) for m in ours.modules()) and any(isinstance(m, Linear4bit)
                                                                          for m in ours.modules())
    assert router_names(quantize_model(theirs, skip=("lm_head",))) == routers


def _sharded_steps(rank: int, path: str) -> tuple[list[float], set]:
    """Two AdamW steps of ``path``'s model built as the full fine-tune builds it, each router sharded on its own
    (``kept_fp32_modules``), then each decoder layer, then the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lowmem_lightning.kept_fp32 import kept_fp32_modules
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    torch.manual_seed(0)
    model = build_causal_lm(path, None, None, None, device="cpu", torch_dtype="bfloat16")
    mesh = init_device_mesh("cpu", (2,))
    for router in kept_fp32_modules(model):
        fully_shard(router, mesh=mesh)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    losses = []
    for _ in range(2):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses, {str(p.dtype) for p in model.parameters()}


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2", "ernie4_5_moe", "glm4_moe"])
def test_the_recipe_adapts_the_dense_layers_and_shared_experts_from_peft_022(name):
    """peft before 0.22 read ``gate_proj`` / ``up_proj`` / ``down_proj`` on these models as transformers 4's expert
    names and put no adapter on their dense layers' or shared experts' linear layers (peft issue 3711): the QLoRA
    recipe's seven names trained only the attention, and our warning said so. peft 0.22 keeps names of linear layers
    as modules: both get adapters, and nothing is said."""
    cls, settings, _ = ROUTED[name]
    config = getattr(transformers, cls)(**{**SIZES, **settings}).to_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_causal_lm(None, config, "nf4", RECIPE_LORA, device="meta", torch_dtype="bfloat16")
    dropped = [str(w.message) for w in caught if "peft put no adapter" in str(w.message)]
    adapted = {qualified.split(".mlp.", 1)[1] for qualified, module in model.named_modules()
               if hasattr(module, "lora_A") and ".mlp." in qualified}
    mlp = {"gate_proj", "up_proj", "down_proj"}
    if not PEFT_ADAPTS_LINEAR_MOE_NAMES:
        assert adapted == set() and len(dropped) == 1 and "fixed in peft 0.22" in dropped[0], (adapted, dropped)
    else:
        assert adapted == mlp | {f"shared_experts.{proj}" for proj in mlp} and dropped == [], (adapted, dropped)


def test_fsdp2_shards_the_kept_fp32_routers_on_their_own(routed_dirs, tmp_path):
    """FSDP2 wants one dtype per ``fully_shard`` group, and the routers transformers keeps in fp32 sit in bf16
    decoder layers: sharding each router on its own first (``kept_fp32_modules``, as the README's FSDP2 section
    says) trains on 2 gloo ranks, the routers fp32."""
    from forked_ranks import forked_ranks

    results = forked_ranks(tmp_path, 2, _sharded_steps, str(routed_dirs("deepseek_v3")), timeout_s=120)
    for losses, dtypes in results:
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
        assert dtypes == {"torch.bfloat16", "torch.float32"}


@pytest.mark.parametrize("name", ["deepseek_v3", "nemotron_h", "gemma4_moe", "qwen2_moe"])
def test_the_estimate_counts_the_routers_as_the_fit_holds_them(name, routed_dirs):
    """``lowmem estimate``'s meta build of the QLoRA recipe holds the same bytes per dtype as the fit's loaded model:
    fp32 routers as fp32, linear routers dense."""
    import yaml

    from lowmem_lightning.cli import RECIPES_DIR
    from lowmem_lightning.estimate import count_model
    from lowmem_lightning.modules.causal_lm import build_causal_lm
    from lowmem_lightning.rotary import keep_rotary_fp32

    lora = yaml.safe_load((RECIPES_DIR / "qlora_7b.yaml").read_text())["model"]["init_args"]["lora"]
    path = str(routed_dirs(name))
    module = CausalLMModule(model_name_or_path=path, quantize="nf4", lora=lora, torch_dtype="bfloat16")
    module.configure_model()
    planned = build_causal_lm(path, None, "nf4", lora, device="meta", torch_dtype="bfloat16")
    keep_rotary_fp32(planned)  # as configure_model does (rotary buffers are no router)
    planned, loaded = count_model(planned), count_model(module.model)
    assert planned.frozen_bytes_by_dtype == loaded.frozen_bytes_by_dtype
    assert planned.params == loaded.params
