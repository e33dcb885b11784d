"""32-bit optimizer state for chosen params: the group key ``quantize_state`` and the ``fp32_state`` option.

bitsandbytes' ``optim_bits=32`` override (HF Trainer applies it to every ``nn.Embedding``) is here a param group
with ``quantize_state=False``: its params keep the fp32 state that params under 4096 elements keep, through the same
kernels. Checked per quantizing optimizer: the state's dtypes and bytes, the trajectory bit for bit against the
fp32 path, checkpoints of either setting loading into the other, and the callback's ``fp32_state`` on a small HF
Llama under a real Trainer (groups and a OneCycleLR schedule kept).
"""

from __future__ import annotations

import copy
import json
import warnings

import lightning as L
import pytest
import torch
from forked_ranks import forked_ranks
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim import build_optimizer, state_memory
from lowmem_lightning.optim.state_precision import fp32_state_params, parse_fp32_state, split_param_groups

SHAPE = (64, 100)  # 6400 elements: quantized by default

# name -> (kwargs, (name, kwargs) of the same family's fp32-state reference)
QUANTIZING = {
    "adamw_8bit": ({}, ("adamw_8bit", {})),
    "adamw_4bit": ({}, ("adamw_4bit", {})),
    "paged_adamw_8bit": ({"gpu_budget_bytes": 0}, ("paged_adamw_8bit", {"gpu_budget_bytes": 0})),
    "lion_8bit": ({}, ("lion", {})),
    "ademamix_8bit": ({}, ("ademamix", {})),
    "muon_8bit": ({"use_muon": True}, ("muon", {"use_muon": True, "momentum_dtype": "float32"})),
    "sgd": ({"momentum": 0.9, "momentum_dtype": "int8"}, ("sgd", {"momentum": 0.9})),
    "adafactor": ({"beta1": 0.9, "momentum_dtype": "int8", "relative_step": False, "scale_parameter": False},
                  ("adafactor", {"beta1": 0.9, "relative_step": False, "scale_parameter": False})),
    "came": ({"momentum_dtype": "int8"}, ("came", {})),
    # Muon's AdamW part (embeddings, head, norms): 8-bit AdamW with adamw_betas, the group's lr and weight decay
    "muon_8bit:adamw": ({"use_muon": False}, ("adamw_8bit", {"betas": (0.9, 0.95), "weight_decay": 0.1})),
}
CHUNKED = ("adamw_8bit", "adamw_4bit", "paged_adamw_8bit", "muon_8bit:adamw")  # fp32 path: the param cut < 4096


def _build(name: str, params, **kwargs):
    """``build_optimizer`` of ``name`` without its ``:part`` suffix."""
    return build_optimizer(name.split(":")[0], params, **kwargs)


def _grads(steps: int, shape=SHAPE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)))


def _run(opt, params, grads) -> None:
    for grad in grads:
        for param, part in zip(params, grad.chunk(len(params))):
            param.grad = part.clone()
        opt.step()


def _float_state(state: dict) -> dict:
    return {k: v.dtype for k, v in state.items()}


@pytest.mark.parametrize("name", list(QUANTIZING))
def test_group_key_keeps_fp32_state_and_its_bytes(name):
    kwargs, (ref_name, ref_kwargs) = QUANTIZING[name]
    quantized, fp32 = _param(), _param()
    opt = _build(name, [{"params": [quantized]}, {"params": [fp32], "quantize_state": False}], lr=1e-3,
                          **kwargs)
    _run(opt, [quantized], _grads(1))
    _run(opt, [fp32], _grads(1))
    assert any(v.dtype in (torch.int8, torch.uint8) for v in opt.state[quantized].values())
    assert all(v.dtype == torch.float32 for v in opt.state[fp32].values()), _float_state(opt.state[fp32])
    assert [s.dtype for s in opt.state_layout(fp32)] == [torch.float32] * len(opt.state[fp32])
    # the bytes of the fp32 param's state are those of the family's fp32 path (torch AdamW's 8 B/elem + step)
    only = _build(name, [{"params": [fp32], "quantize_state": False}], lr=1e-3, **kwargs)
    reference_param = _param()
    reference = (torch.optim.AdamW([reference_param]) if name in CHUNKED
                 else build_optimizer(ref_name, [reference_param], lr=1e-3, **ref_kwargs))
    _run(only, [fp32], _grads(1))
    _run(reference, [reference_param], _grads(1))
    assert state_memory(only).total_bytes == state_memory(reference).total_bytes
    if name in CHUNKED:
        assert state_memory(only).total_bytes == 2 * 4 * fp32.numel() + 4


@pytest.mark.parametrize("name", list(QUANTIZING))
def test_trajectory_is_bit_exact_with_the_fp32_path(name):
    kwargs, (ref_name, ref_kwargs) = QUANTIZING[name]
    grads = _grads(5)
    param = _param()
    opt = _build(name, [{"params": [param], "quantize_state": False}], lr=1e-2, **kwargs)
    _run(opt, [param], grads)
    if name in CHUNKED:  # the same elements as two tensors of 3200 (< 4096): the fp32-state path of the same kernels
        parts = [torch.nn.Parameter(part.clone()) for part in _param().detach().chunk(2)]
        reference = build_optimizer(ref_name, parts, lr=1e-2, **ref_kwargs)
        _run(reference, parts, grads)
        expected = torch.cat([p.detach() for p in parts])
    else:
        expected = torch.nn.Parameter(_param().detach().clone())
        reference = build_optimizer(ref_name, [expected], lr=1e-2, **ref_kwargs)
        _run(reference, [expected], grads)
    assert torch.equal(param.detach(), expected.detach())
    quantized = _param()
    _run(_build(name, [quantized], lr=1e-2, **kwargs), [quantized], grads)
    assert not torch.equal(quantized.detach(), expected.detach())  # the default (quantized) state differs


def _opt_pair(name: str, quantize_state: bool):
    kwargs, _ = QUANTIZING[name]
    param = _param()
    return param, _build(name, [{"params": [param], "quantize_state": quantize_state}], lr=1e-2, **kwargs)


@pytest.mark.parametrize("name", list(QUANTIZING))
def test_checkpoint_round_trip_is_bit_exact(name):
    grads = _grads(5)
    param, opt = _opt_pair(name, False)
    _run(opt, [param], grads[:3])
    saved, weights = copy.deepcopy(opt.state_dict()), param.detach().clone()
    assert saved["param_groups"][0]["quantize_state"] is False
    _run(opt, [param], grads[3:])
    resumed, again = _opt_pair(name, False)
    with torch.no_grad():
        resumed.copy_(weights)
    again.load_state_dict(saved)
    _run(again, [resumed], grads[3:])
    assert torch.equal(resumed.detach(), param.detach())


@pytest.mark.parametrize("name", list(QUANTIZING))
@pytest.mark.parametrize("saved_quantized", [True, False])
def test_checkpoint_of_the_other_setting_is_converted(name, saved_quantized):
    param, opt = _opt_pair(name, saved_quantized)
    _run(opt, [param], _grads(2))
    saved = opt.state_dict()
    target_param, target = _opt_pair(name, not saved_quantized)
    target.load_state_dict(saved)
    assert target.param_groups[0]["quantize_state"] is (not saved_quantized)  # a storage choice: the loader's
    state = target.state[target_param]
    assert {k: v.dtype for k, v in state.items()} == {s.name: s.dtype for s in target.state_layout(target_param)}
    assert float(state["step"]) == 2.0
    fp32_side = state if saved_quantized else opt.state[param]
    coded_side = opt.state[param] if saved_quantized else state
    checked = 0
    for key, value in fp32_side.items():  # the fp32 moments and the codes they were converted from/to agree
        prefix = {"momentum_buffer": "momentum"}.get(key, key)
        if key != "step" and f"{prefix}_codes" in coded_side:
            decoded = _decoded(coded_side, prefix, value.numel()).reshape(value.shape)
            tolerance = 0.15 if name == "adamw_4bit" else 0.03  # of the largest moment: 4-bit or 8-bit levels
            assert ((decoded - value).abs().max() / value.abs().max().clamp_min(1e-30)) < tolerance, key
            checked += 1
    assert checked >= 1
    target_param.grad = torch.randn_like(target_param)
    target.step()  # it trains on


def _decoded(state: dict, key: str, numel: int) -> torch.Tensor:
    """The fp32 values of ``key``'s codes: 4-bit (uint8 bytes, a scale per 128) or 8-bit (a scale per 256)."""
    from lowmem_lightning.kernels.adamw4bit import dequantize4_reference, num_blocks4
    from lowmem_lightning.kernels.codec import dequantize_reference

    codes, absmax = state[f"{key}_codes"], state[f"{key}_absmax"]
    if codes.dtype == torch.uint8 and absmax.numel() == num_blocks4(numel) != -(-numel // 256):
        return dequantize4_reference(codes, absmax, numel, key == "exp_avg")
    return dequantize_reference(codes, absmax)[:numel]


def test_adamw_8bit_cross_load_decodes_exactly():
    param, opt = _opt_pair("adamw_8bit", True)
    _run(opt, [param], _grads(2))
    target_param, target = _opt_pair("adamw_8bit", False)
    target.load_state_dict(opt.state_dict())
    from lowmem_lightning.optim.adamw_convert import FORM_8BIT, decoded_moments

    expected = decoded_moments(param, opt.state[param], FORM_8BIT)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(target.state[target_param][key], expected[key])


@pytest.mark.parametrize("where", ["constructor", "group", "add_param_group"])
def test_bad_quantize_state_names_group_key_value_and_allowed(where):
    param, other = _param(), _param()
    with pytest.raises(ValueError) as err:
        if where == "constructor":
            build_optimizer("adamw_8bit", [param], quantize_state="no")
        elif where == "group":
            build_optimizer("lion_8bit", [{"params": [other]}, {"params": [param], "quantize_state": 0}])
        elif where == "add_param_group":
            opt = build_optimizer("sgd", [other], lr=0.1)
            opt.add_param_group({"params": [param], "quantize_state": None})
    message = str(err.value)
    assert "quantize_state=" in message and "expected True" in message and "False" in message
    if where != "constructor":
        assert "param group 1" in message
        assert {"group": "quantize_state=0 ", "add_param_group": "quantize_state=None "}[where] in message
    if where == "add_param_group":
        assert len(opt.param_groups) == 1  # not added


# ------------------------------------------------------------------ fp32_state: resolution and the callback
def _llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("value, expected", [
    ("torch.nn.Embedding", ["model.embed_tokens.weight"]),
    (torch.nn.Embedding, ["model.embed_tokens.weight"]),
    ("embeddings", ["model.embed_tokens.weight"]),
    (["*embed_tokens*", "lm_head"], ["lm_head.weight", "model.embed_tokens.weight"]),
    ("model.layers.0.mlp.*", ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                             "model.layers.0.mlp.up_proj.weight"]),
])
def test_fp32_state_selects_by_class_path_and_pattern(value, expected):
    model = _llama()
    ids, unmatched = fp32_state_params(model, parse_fp32_state(value))
    assert sorted(n for n, p in model.named_parameters() if id(p) in ids) == expected
    assert unmatched == []


def test_split_keeps_positions_and_every_key():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    groups, origin = split_param_groups(
        [{"params": [a, b], "lr": 0.1, "weight_decay": 0.01, "name": "x"}, {"params": [c], "lr": 0.2}], {id(b), id(c)})
    assert origin == [0, 1, 0]
    assert [g["params"] for g in groups] == [[a], [c], [b]]
    assert groups[0] == {"params": [a], "lr": 0.1, "weight_decay": 0.01, "name": "x"}
    assert groups[2] == {"params": [b], "lr": 0.1, "weight_decay": 0.01, "name": "x", "quantize_state": False}
    assert groups[1]["quantize_state"] is False


@pytest.mark.parametrize("value", [3, "", ["lm_head", None], "torch.nn.Embeding", "torch.optim.AdamW"])
def test_bad_fp32_state_is_refused_naming_it(value):
    with pytest.raises(ValueError, match="fp32_state") as err:
        LowMemOptimizerCallback("adamw_8bit", fp32_state=value)
    assert "torch.nn.Embedding" in str(err.value) and "pattern" in str(err.value)


def test_fp32_state_for_torch_adamw_is_refused():
    with pytest.raises(ValueError, match=r"fp32_state=.*optimizer='adamw'.*32-bit state for every param"):
        LowMemOptimizerCallback("adamw", fp32_state="embeddings")


class _LM(L.LightningModule):
    """A small HF Llama; AdamW with a decayed and an undecayed group under OneCycleLR (cycling betas[0])."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.model = _llama(tied)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim == 2]
        rest = [p for p in self.parameters() if p.ndim != 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-3, 1e-3], total_steps=10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(tmp_path, model, callback, steps: int = 3) -> L.Trainer:
    tokens = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(1))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    trainer.fit(model, DataLoader(TensorDataset(tokens), batch_size=4))
    return trainer


@pytest.mark.parametrize("fp32_state", ["torch.nn.Embedding", ["*embed_tokens*", "lm_head"]])
def test_callback_keeps_the_embedding_fp32_with_groups_and_schedule(tmp_path, fp32_state):
    model = _LM()
    callback = LowMemOptimizerCallback("adamw_8bit", fp32_state=fp32_state, print_summary=False, plot=False)
    trainer = _fit(tmp_path, model, callback)
    opt = trainer.optimizers[0]
    names = {id(p): n for n, p in model.model.named_parameters()}
    chosen = {"model.embed_tokens.weight"} | ({"lm_head.weight"} if isinstance(fp32_state, list) else set())
    assert len(opt.param_groups) == 3  # decayed, undecayed, and the decayed group's fp32-state part
    split = opt.param_groups[2]
    assert {names[id(p)] for p in split["params"]} == chosen and split["quantize_state"] is False
    assert not any(id(p) in {id(q) for q in split["params"]} for p in opt.param_groups[0]["params"])
    for key in ("lr", "weight_decay", "betas", "max_lr", "initial_lr", "min_lr", "eps"):
        assert split[key] == opt.param_groups[0][key], key  # the source group's keys, on its schedule
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is opt and len(scheduler.base_lrs) == 3 and scheduler.last_epoch == 3
    assert opt.param_groups[0]["lr"] != 1e-3 and opt.param_groups[0]["betas"][0] < 0.95  # OneCycleLR drove it
    for param in opt.param_groups[2]["params"]:
        assert set(opt.state[param]) == {"step", "exp_avg", "exp_avg_sq"}
    big = [p for p in opt.param_groups[0]["params"] if p.numel() >= 4096]
    assert big and all("exp_avg_codes" in opt.state[p] for p in big)


def test_callback_tied_embedding_and_no_module_optimizer(tmp_path):
    class NoOptimizer(_LM):
        def configure_optimizers(self):
            return None

    model = NoOptimizer(tied=True)
    trainer = _fit(tmp_path, model, LowMemOptimizerCallback("adamw_4bit", lr=1e-3, fp32_state="embeddings",
                                                            print_summary=False, plot=False), steps=2)
    opt = trainer.optimizers[0]
    embedding = model.model.model.embed_tokens.weight
    assert model.model.lm_head.weight is embedding
    fp32_groups = [g for g in opt.param_groups if g.get("quantize_state") is False]
    assert len(fp32_groups) == 1 and fp32_groups[0]["params"] == [embedding]
    assert set(opt.state[embedding]) == {"step", "exp_avg", "exp_avg_sq"}


def test_unmatched_pattern_warns_once_naming_it(tmp_path):
    callback = LowMemOptimizerCallback("adamw_8bit", fp32_state=["*embed_tokens*", "lm_haed"], print_summary=False,
                                       plot=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, _LM(), callback, steps=1)
    messages = [str(w.message) for w in caught if "selects no param" in str(w.message)]
    assert len(messages) == 1 and "'lm_haed'" in messages[0] and "'*embed_tokens*'" not in messages[0].split(":")[1]


# ------------------------------------------------------------------ LowMemModule, lowmem estimate, YAML
def test_lowmem_module_builds_fp32_state_groups():
    from lowmem_lightning.modules import LowMemModule

    class Tiny(LowMemModule):
        def __init__(self, **kwargs):
            super().__init__(optimizer="adamw_8bit", lr=1e-3, weight_decay=0.1, warmup_steps=2, **kwargs)
            self.model = _llama()

    module = Tiny(fp32_state="torch.nn.Embedding")
    config = module.configure_optimizers()
    opt, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    fp32 = [g for g in opt.param_groups if g.get("quantize_state") is False]
    assert len(fp32) == 1 and fp32[0]["params"] == [module.model.model.embed_tokens.weight]
    assert fp32[0]["weight_decay"] == 0.1 and len(scheduler.base_lrs) == len(opt.param_groups)
    with pytest.warns(UserWarning, match="'embed_tokenz'"):
        Tiny(fp32_state="embed_tokenz").configure_optimizers()
    with pytest.raises(ValueError, match="fp32_state=.*CausalLMModule.*'adamw'"):
        from lowmem_lightning.modules import CausalLMModule

        CausalLMModule(config={"hidden_size": 32}, optimizer="adamw", fp32_state="embeddings")


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_4bit", "lion_8bit", "muon_8bit"])
def test_estimate_counts_fp32_state_as_the_optimizer_holds_it(name):
    from lowmem_lightning.estimate import estimate_memory

    model = _llama()
    est = estimate_memory(model, variants={name: (name, {"lr": 1e-3})}, fp32_state="embeddings")
    ids, _ = fp32_state_params(model, parse_fp32_state("embeddings"))
    groups = split_param_groups(list(model.named_parameters()), ids)[0]
    opt = _build(name, groups, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    assert est.optimizers[name].state_bytes == state_memory(opt).total_bytes
    plain = estimate_memory(model, variants={name: (name, {"lr": 1e-3})})
    embedding = model.model.embed_tokens.weight.numel()
    assert est.optimizers[name].state_bytes > plain.optimizers[name].state_bytes + 2 * embedding  # ~3-7 B/elem more
    assert any(f"{embedding:,} trainable params" in note for note in est.notes)


def test_yaml_recipe_fp32_state_reaches_estimate(tmp_path, capsys):
    import yaml

    from lowmem_lightning.cli import main
    from lowmem_lightning.cli.recipes import RECIPES_DIR

    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    recipe["trainer"]["callbacks"][0]["init_args"]["fp32_state"] = ["torch.nn.Embedding", "lm_head"]
    path = tmp_path / "tiny_fp32emb.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["estimate", "--config", str(path), "--format", "json"]) == 0
    with_emb = json.loads(capsys.readouterr().out)
    assert main(["estimate", "--config", str(path), "--format", "json", "--fp32-state", "lm_haed"]) == 0
    typo = json.loads(capsys.readouterr().out)
    assert any("fp32_state=['torch.nn.Embedding', 'lm_head']" in n for n in with_emb["notes"])
    assert any("'lm_haed' select no param" in n for n in typo["notes"])
    rows = ("adamw_8bit", "adamw")
    assert with_emb["optimizers"][rows[0]]["state_bytes"] > typo["optimizers"][rows[0]]["state_bytes"]
    assert with_emb["optimizers"][rows[1]]["state_bytes"] == typo["optimizers"][rows[1]]["state_bytes"]  # fp32 anyway


# ------------------------------------------------------------------ FSDP1 presentation, DTensor (FSDP2) shards
@pytest.mark.parametrize("name", ["adamw_8bit", "lion_8bit", "sgd"])
def test_fsdp1_presentation_follows_the_group_key(name):
    kwargs, _ = QUANTIZING[name]
    flat = [torch.nn.Parameter(torch.randn(9000, generator=torch.Generator().manual_seed(k))) for k in range(2)]
    for param in flat:
        param._fsdp_flattened = True  # what FSDP1 marks its flat params with
    opt = _build(name, [{"params": [flat[0]]}, {"params": [flat[1]], "quantize_state": False}], lr=1e-2,
                          **kwargs)
    _run(opt, flat[:1], _grads(2, (9000,)))
    _run(opt, flat[1:], _grads(2, (9000,)))
    presented = opt.state_dict()
    for state in presented["state"].values():  # both in the fp32 form FSDP1 re-slices
        assert all(v.dtype == torch.float32 for v in state.values())
    before = {k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in enumerate(flat)}
    fresh = _build(name, [{"params": [flat[0]]}, {"params": [flat[1]], "quantize_state": False}], lr=1e-2,
                            **kwargs)
    fresh.load_state_dict(presented)
    for k, param in enumerate(flat):
        assert set(fresh.state[param]) == set(before[k])
    for key, value in before[1].items():  # the fp32-state param comes back bit for bit
        assert torch.equal(fresh.state[flat[1]][key], value)


WORLD = 2


def _sharded_run(rank: int) -> dict:
    """Two sharded params (row form and flat), the first with quantize_state=False: its state presented as fp32
    DTensors, a resume of the same setting bit for bit, a load into the other setting converted."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    full = [torch.randn(64, 256, generator=torch.Generator().manual_seed(1)), torch.randn(9000)]
    grads = [[torch.randn(t.shape, generator=torch.Generator().manual_seed(10 + s)) for t in full] for s in range(4)]

    def build(settings):
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        groups = [{"params": [p], "quantize_state": q} for p, q in zip(params, settings)]
        return params, build_optimizer("adamw_8bit", groups, lr=1e-2)

    def steps(params, opt, which):
        for s in which:
            for p, g in zip(params, grads[s]):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()

    params, opt = build([False, True])
    steps(params, opt, range(2))
    saved = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    steps(params, opt, range(2, 4))
    out = {"presented": {k: sorted(v) for k, v in saved["state"].items()},
           "final": [p.full_tensor() for p in params]}
    for settings in ([False, True], [True, False]):
        resumed, again = build(settings)
        with torch.no_grad():
            for p, w in zip(resumed, weights):
                p.copy_(w)
        again.load_state_dict(saved)
        out[str(settings)] = [sorted(again.state[p]) for p in resumed]
        steps(resumed, again, range(2, 4))
        out[f"final{settings}"] = [p.full_tensor() for p in resumed]
    return out


def test_dtensor_state_follows_the_group_key_and_converts(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    result = forked_ranks(tmp_path, WORLD, _sharded_run)[0]
    moments, codes = ["exp_avg", "exp_avg_sq", "step"], ["exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax",
                                                         "exp_avg_sq_codes", "step"]
    assert result["presented"][0] == moments and result["presented"][1][:5] == codes
    assert all(torch.equal(a, b) for a, b in zip(result["final[False, True]"], result["final"]))  # bit for bit
    assert result["[True, False]"] == [codes, moments]  # converted into the other setting's form
    assert not torch.equal(result["final[True, False]"][0], result["final"][0])


def test_readme_7b_bytes_per_param_are_lowmem_estimate(capsys):
    """README's paragraph on 32-bit state quotes these (``lowmem estimate`` of the 7B full fine-tune recipe)."""
    from pathlib import Path

    from lowmem_lightning.cli import main

    text = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    figures = {}
    for flag in ([], ["--fp32-state", "embeddings"]):
        assert main(["estimate", "--config", "full_finetune_7b.yaml", "--format", "json", *flag]) == 0
        rows = json.loads(capsys.readouterr().out)["optimizers"]
        figures[bool(flag)] = {name: f"{rows[name]['bytes_per_param']:.3f}" for name in ("adamw_8bit", "adamw_4bit")}
    for name in ("adamw_8bit", "adamw_4bit"):
        assert f"`{name}` from {figures[False][name]} to {figures[True][name]}" in text


def test_added_group_and_translation_carry_the_key():
    from lowmem_lightning.callbacks.swap import rebuild_param_groups
    from lowmem_lightning.optim import AdamW4bit, AdamW8bit

    first, added = _param(), _param()
    opt = build_optimizer("adamw_8bit", [first], lr=1e-3)
    opt.add_param_group({"params": [added], "quantize_state": False})  # e.g. a layer unfrozen later
    _run(opt, [first], _grads(1))
    _run(opt, [added], _grads(1))
    assert "exp_avg_codes" in opt.state[first] and set(opt.state[added]) == {"step", "exp_avg", "exp_avg_sq"}
    # the callback rebuilding one of ours as another keeps the key; a torch optimizer's group carrying it too
    groups, _, _ = rebuild_param_groups(opt, AdamW4bit, AdamW4bit([_param()]).defaults, lr=None, weight_decay=None)
    assert [g.get("quantize_state", True) for g in groups] == [True, False]  # a default is not carried
    torch_opt = torch.optim.AdamW([{"params": [first]}, {"params": [added], "quantize_state": False}])
    groups, _, _ = rebuild_param_groups(torch_opt, AdamW8bit, AdamW8bit([_param()]).defaults, lr=None,
                                        weight_decay=None)
    assert "quantize_state" not in groups[0] and groups[1]["quantize_state"] is False


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_4bit", "paged_adamw_8bit", "lion_8bit", "ademamix_8bit",
                                  "sgd", "muon_8bit:adamw"])
def test_cuda_fp32_state_of_a_large_tensor(name):
    """On CUDA the fp32-state kernels (before only given tensors under 4096 elements) update a 1.1M-element tensor of
    a ``quantize_state=False`` group bit for bit as the same elements cut into tensors under 4096, and as on the CPU
    to fp32 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kwargs, (ref_name, ref_kwargs) = QUANTIZING[name]
    shape = (1000, 1100)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    grads = _grads(3, shape)
    results = {}
    for device in ("cuda", "cpu"):
        param = torch.nn.Parameter(start.clone().to(device))
        opt = _build(name, [{"params": [param], "quantize_state": False}], lr=1e-2, **kwargs)
        _run(opt, [param], [g.to(device) for g in grads])
        assert all(v.dtype == torch.float32 for v in opt.state[param].values())
        results[device] = param.detach().cpu()
    parts = [torch.nn.Parameter(part.clone().cuda()) for part in start.reshape(-1).chunk(300)]  # 3667 elements
    chunked_name = ref_name if name in CHUNKED else name.split(":")[0]
    reference = build_optimizer(chunked_name, parts, lr=1e-2, **(ref_kwargs if name in CHUNKED else kwargs))
    _run(reference, parts, [g.reshape(-1).cuda() for g in grads])
    assert torch.equal(torch.cat([p.detach().cpu() for p in parts]).reshape(shape), results["cuda"])
    torch.testing.assert_close(results["cuda"], results["cpu"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_4bit", "lion_8bit", "sgd"])
def test_triton_fp32_state_path_over_4096_elements(name, force_triton):
    """The Triton kernels' fp32-state variant (run by the interpreter here), until now given only tensors under 4096
    elements, on a 4097 x 3 tensor of a ``quantize_state=False`` group: the same params as the CPU reference path."""
    kwargs, _ = QUANTIZING[name]
    shape = (4097, 3)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    grads = _grads(2, shape)
    results = []
    for triton in (True, False):
        from lowmem_lightning.kernels import dispatch

        with dispatch.override(force_triton=triton):
            param = torch.nn.Parameter(start.clone())
            opt = _build(name, [{"params": [param], "quantize_state": False}], lr=1e-2, **kwargs)
            _run(opt, [param], grads)
            assert "exp_avg_codes" not in opt.state[param] and "momentum_codes" not in opt.state[param]
            results.append(param.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0], start)


def test_summary_counts_fp32_state_params_and_resume_hint(tmp_path):
    from lowmem_lightning.callbacks.report import format_summary, small_tensor_summary

    model = _LM()
    callback = LowMemOptimizerCallback("adamw_8bit", fp32_state="embeddings", print_summary=False, plot=False)
    trainer = _fit(tmp_path, model, callback, steps=1)
    opt = trainer.optimizers[0]
    counts = small_tensor_summary([opt])
    embedding = model.model.model.embed_tokens.weight
    assert counts["fp32_state_params"] == embedding.numel()
    assert counts["fp32_state_bytes"] == 2 * 4 * embedding.numel() + 4
    assert counts["small_params"] == sum(p.numel() for p in model.parameters() if p.numel() < 4096)
    text = format_summary(callback.summary, None)
    assert f"{embedding.numel():,} params" in text and "keep 32-bit state by choice" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    plain = build_optimizer("adamw_8bit", [p for p in model.parameters()], lr=1e-3)  # a run without fp32_state
    with pytest.raises(ValueError, match="it has 3 param groups, this optimizer has 1.*fp32_state"):
        plain.load_state_dict(opt.state_dict())


def test_optim_switch_to_torch_adamw_drops_fp32_state_with_a_note():
    from lowmem_lightning.cli.switch import switch_optimizer

    init = {"optimizer": "adamw_8bit", "fp32_state": ["torch.nn.Embedding"], "lr": 1e-3}
    note = switch_optimizer(init, "adamw", run_lr=1e-3, module_lr=1e-3)
    assert init["fp32_state"] is None and "dropped the config's fp32_state=['torch.nn.Embedding']" in note
    kept = {"optimizer": "adamw_8bit", "fp32_state": "embeddings", "lr": 1e-3}
    switch_optimizer(kept, "lion_8bit", run_lr=1e-3, module_lr=1e-3)
    assert kept["fp32_state"] == "embeddings"
