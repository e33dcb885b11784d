"""MoE experts held as 3-D parameters, in NF4 (:class:`~lowmem_lightning.quant.Experts4bit`): Mixtral (gate and up
stacked), Qwen2-MoE (beside a shared dense expert) and gpt-oss (transposed, biased, its own clamped gate).

Checked against transformers' own eager experts loop on the decoded weights: outputs and input gradients bit-equal in
fp32 and bf16; the routing weights get their gradient; autocast computes in its dtype; backward keeps no dense expert
(saved tensors); codes are those of a ``Linear4bit`` of each expert's matrix; ``.to(bfloat16)``, pickling and deepcopy
keep the codes; ``dequantize_model`` gives the experts back as 3-D parameters; nan in an expert is refused naming it;
a per-expert checkpoint missing an expert is refused before any tensor is read; ``random_causal_lm`` and a 4-bit
``save_pretrained`` reload hold NF4 experts."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file, save_file

from lowmem_lightning.quant import (
    Experts4bit,
    Linear4bit,
    ModelFileError,
    NonFiniteWeightError,
    dequantize_model,
    load_pretrained_causal_lm,
    quantize_model,
    random_causal_lm,
)

TRANSFORMERS = Version(transformers.__version__)
SIZES = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts_per_tok": 2}
KINDS = {
    "mixtral": ("MixtralConfig", {"num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 48}),
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4}),
}


def _model(kind: str, dtype=torch.float32) -> torch.nn.Module:
    cls, extra = KINDS[kind]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**SIZES, **extra)).to(dtype)
    with torch.no_grad():  # gpt-oss's expert biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("_proj_bias"):
                param.normal_(0, 0.1)
    return model.eval()


def _quantized_and_reference(kind: str, dtype):
    """(the model with NF4 experts, the dense model holding their decoded weights, run by transformers' eager loop)."""
    quantized = _model(kind, dtype)
    experts = {name: m for name, m in quantize_model(quantized, skip=("lm_head",)).named_modules()
               if isinstance(m, Experts4bit)}
    reference = _model(kind, dtype)
    quantize_model(reference, skip=("lm_head", "experts"))
    with torch.no_grad():
        for name, module in experts.items():
            for proj in module.nf4_shapes:
                getattr(reference.get_submodule(name), proj).copy_(module.dequantize(proj))
    reference.set_experts_implementation("eager")
    return quantized, reference


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(KINDS))
def test_outputs_and_input_gradients_equal_transformers_eager_experts(kind, dtype):
    quantized, reference = _quantized_and_reference(kind, dtype)
    assert len([m for m in quantized.modules() if isinstance(m, Experts4bit)]) == SIZES["num_hidden_layers"]
    grads = []
    for model in (quantized, reference):
        embeddings = model.get_input_embeddings().weight.requires_grad_(True)
        logits = model(_ids()).logits
        logits.float().square().mean().backward()
        grads.append((logits.detach(), embeddings.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert grads[0][1].abs().sum() > 0
    if kind == "gpt_oss":  # eager's backward multiplies by the (in, out) weight transposed, ours by (out, in): BLAS
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-9)  # sums in another order
    else:
        assert torch.equal(grads[0][1], grads[1][1])


def test_the_router_gets_its_gradient_and_autocast_computes_in_its_dtype():
    quantized, reference = _quantized_and_reference("mixtral", torch.float32)
    outputs = []
    for model in (quantized, reference):
        router = model.model.layers[0].mlp.gate.weight.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(_ids()).logits
        logits.float().square().mean().backward()
        outputs.append((logits.detach().float(), router.grad))
    assert outputs[0][1].abs().sum() > 0
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], atol=1e-3, rtol=5e-2)


def test_backward_keeps_no_dense_expert():
    model = quantize_model(_model("mixtral"), skip=("lm_head",))
    experts = model.model.layers[0].mlp.experts
    dense = {tuple(experts.nf4_shapes[proj]) for proj in experts.nf4_shapes}
    dense |= {shape[::-1] for shape in dense}
    saved = []
    model.get_input_embeddings().weight.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(_ids()).logits.square().mean()
    loss.backward()
    assert saved and not dense & set(saved)


def test_codes_equal_a_linear4bit_of_each_expert_and_bytes_are_nf4s():
    dense = _model("gpt_oss")
    model = quantize_model(copy.deepcopy(dense), skip=("lm_head",))
    experts, weights = model.model.layers[1].mlp.experts, dense.model.layers[1].mlp.experts
    for proj in ("gate_up_proj", "down_proj"):
        for expert in range(4):
            matrix = getattr(weights, proj)[expert].t()  # gpt-oss stores (in, out)
            layer = Linear4bit.from_linear(_linear(matrix))
            assert torch.equal(experts.nf4_weight(proj, expert).packed, layer.qweight)
            assert torch.equal(experts.nf4_weight(proj, expert).qscale, layer.qscale)
    elements = sum(p.numel() for name, p in weights.named_parameters() if not name.endswith("bias"))
    assert 0.5 * elements < experts.nf4_nbytes < 0.53 * elements
    assert experts.gate_up_proj_bias.requires_grad is False


def _linear(matrix: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(matrix.detach().clone(), requires_grad=False)
    return layer


def test_to_bfloat16_pickle_and_deepcopy_keep_the_codes():
    model = quantize_model(_model("mixtral"), skip=("lm_head",))
    before = {k: v.clone() for k, v in model.state_dict().items() if "experts" in k}
    logits = model(_ids()).logits
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone.model.layers[0].mlp.experts).__name__ == "MixtralExperts4bit"
        assert torch.equal(clone(_ids()).logits, logits)
    model.to(torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    assert experts.nf4_weight_dtype == torch.bfloat16 and experts.gate_up_proj_scale_step.dtype == torch.float32
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert isinstance(experts, transformers.models.mixtral.modeling_mixtral.MixtralExperts)


def test_dequantize_model_gives_the_3d_experts_back():
    model = quantize_model(_model("gpt_oss"), skip=("lm_head",))
    decoded = model.model.layers[0].mlp.experts.dequantize("gate_up_proj")
    logits = model(_ids()).logits
    dequantize_model(model)
    experts = model.model.layers[0].mlp.experts
    assert type(experts) is transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts
    assert torch.equal(experts.gate_up_proj, decoded) and experts.gate_up_proj.shape == (4, 64, 192)
    assert not [name for name, _ in experts.named_buffers()]
    model.set_experts_implementation("eager")
    assert torch.equal(model(_ids()).logits, logits)
    assert not model.is_loaded_in_4bit


def test_a_nan_in_an_expert_is_refused_naming_it_and_nothing_changes():
    model = _model("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.1\.mlp\.experts\.down_proj"):
        quantize_model(model)
    assert not any(isinstance(m, (Experts4bit, Linear4bit)) for m in model.modules())


def test_a_per_expert_checkpoint_missing_an_expert_is_refused_before_reading(tmp_path):
    _model("mixtral", torch.bfloat16).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in tensors
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"holds expert 3 of 'model\.layers\.1\.mlp\.experts\.gate_up_proj' as "
                       r"\[\('model\.layers\.1\.block_sparse_moe\.experts\.3\.w1\.weight', \(96, 64\)\)\]: the model "
                       r"of config\.json needs 2 tensors of 64 columns and 192 rows in all for each of its 4 experts"):
        load_pretrained_causal_lm(tmp_path)


def test_random_and_saved_4bit_models_hold_nf4_experts(tmp_path):
    config = transformers.MixtralConfig(**SIZES, num_local_experts=4)
    model = random_causal_lm(config, torch_dtype=torch.bfloat16)
    assert len([m for m in model.modules() if isinstance(m, Experts4bit)]) == 2
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    if TRANSFORMERS < Version("5.21"):
        pytest.skip("save_pretrained of NF4 experts needs transformers 5.21: before, its weight-conversion revert "
                    "takes the codes' scales for experts to split ('Undefined Operation encountered!')")
    model.save_pretrained(tmp_path)  # the codes and scales, under the checkpoint's own (Mixtral) names
    index = tmp_path / "model.safetensors.index.json"
    keys = json.loads(index.read_text())["weight_map"] if index.exists() else load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.gate_up_proj_qweight" in keys
    reloaded = load_pretrained_causal_lm(tmp_path, torch_dtype=torch.bfloat16)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_from_scratch_moe_config_is_drawn_expert_by_expert_into_nf4():
    """``CausalLMModule(config={"model_type": "mixtral", ...}, quantize="nf4")``: built on meta, each expert's matrix
    drawn from normal(0, initializer_range), quantized and freed; the model trains a LoRA step."""
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    config = {"model_type": "qwen3_moe", **SIZES, "num_experts": 4, "moe_intermediate_size": 32}
    model = build_causal_lm(None, config, "nf4", {"r": 4, "alpha": 8, "target_modules": "all-linear"}, device="cpu",
                            torch_dtype="bfloat16")
    experts = [m for m in model.modules() if isinstance(m, Experts4bit)]
    assert len(experts) == 2 and not [n for n, p in model.named_parameters() if p.dim() == 3]
    decoded = experts[0].dequantize("down_proj").float()
    assert 0.015 < decoded.std() < 0.025  # initializer_range 0.02
    loss = model(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.gpu
def test_on_cuda_codes_outputs_and_gradients_equal_the_cpu_path():
    """The Triton quantize and decode of each expert (a row view of the module's buffers) on CUDA: codes equal the
    CPU reference's, and outputs and input gradients match the CPU model's (GEMMs differ: close, not equal)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    results = []
    for device in ("cpu", "cuda"):
        model = quantize_model(_model("gpt_oss").to(device), skip=("lm_head",))
        embeddings = model.get_input_embeddings().weight.requires_grad_(True)
        logits = model(_ids().to(device)).logits
        logits.square().mean().backward()
        codes = {k: v.cpu() for k, v in model.state_dict().items() if "experts" in k}
        results.append((codes, logits.detach().cpu(), embeddings.grad.cpu()))
    (cpu_codes, cpu_logits, cpu_grad), (cuda_codes, cuda_logits, cuda_grad) = results
    assert cpu_codes.keys() == cuda_codes.keys() and all(torch.equal(cpu_codes[k], cuda_codes[k]) for k in cpu_codes)
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(cuda_grad, cpu_grad, rtol=1e-3, atol=1e-7)


def _synthetic_experts(has_gate: bool, post_norm: bool) -> torch.nn.Module:
    """An experts module of transformers' interface without a gate (NemotronH's ``up_proj``) or with a post-expert
    norm, with the interface's eager loop as its own forward."""
    from types import SimpleNamespace

    from transformers.integrations.moe import use_experts_implementation

    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            first = 2 * 24 if has_gate else 24
            self.num_experts = 4
            setattr(self, "gate_up_proj" if has_gate else "up_proj", torch.nn.Parameter(torch.randn(4, first, 16)))
            self.down_proj = torch.nn.Parameter(torch.randn(4, 16, 24) * 0.2)
            self.act_fn = torch.nn.ReLU()
            if post_norm:
                self.post_expert_norm = torch.nn.LayerNorm(16)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            final = torch.zeros_like(hidden_states)
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            for expert in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
                pos, tokens = torch.where(mask[expert])
                first = self.gate_up_proj if has_gate else self.up_proj
                state = hidden_states[tokens] @ first[expert].t()
                state = self._apply_gate(state) if has_gate else self.act_fn(state)
                state = state @ self.down_proj[expert].t()
                state = self.post_expert_norm(state) if post_norm else state
                final.index_add_(0, tokens, state * top_k_weights[tokens, pos, None])
            return final

    options = {"has_post_expert_norm": True} if post_norm else {}  # transformers >= 5.20
    decorated = use_experts_implementation(has_gate=has_gate, **options)(Experts)
    torch.manual_seed(0)
    return decorated(SimpleNamespace(_experts_implementation="eager"))


@pytest.mark.parametrize("has_gate, post_norm", [(False, False), (True, True)])
def test_experts_without_a_gate_or_with_a_post_norm(has_gate, post_norm):
    from lowmem_lightning.quant import quantize_experts

    if post_norm and TRANSFORMERS < Version("5.20"):
        pytest.skip("the experts interface has a post-expert norm from transformers 5.20")

    dense = _synthetic_experts(has_gate, post_norm)
    quantized = quantize_experts(copy.deepcopy(dense))
    first = "gate_up_proj" if has_gate else "up_proj"
    assert set(quantized.nf4_shapes) == {first, "down_proj"}
    with torch.no_grad():
        for proj in quantized.nf4_shapes:
            getattr(dense, proj).copy_(quantized.dequantize(proj))
    states = torch.randn(10, 16, requires_grad=True)
    index = torch.randint(0, 4, (10, 2), generator=torch.Generator().manual_seed(2))
    weights = torch.rand(10, 2)
    outputs = []
    for module in (quantized, dense):
        out = module(states, index, weights)
        (grad,) = torch.autograd.grad(out.square().sum(), states)
        outputs.append((out.detach(), grad))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_the_triton_kernels_on_row_views_of_the_buffers_equal_the_reference():
    """The Triton quantize and decode (the CUDA path; here under the interpreter) of each expert, a row view of the
    module's buffers at an offset: the same codes as the PyTorch reference, and the same outputs."""
    from lowmem_lightning.kernels import dispatch

    reference = quantize_model(_model("mixtral"), skip=("lm_head",))
    with dispatch.override(force_triton=True):
        triton = quantize_model(_model("mixtral"), skip=("lm_head",))
        experts = triton.model.layers[1].mlp.experts
        decoded = experts.dequantize_expert("gate_up_proj", 3)
        logits = triton(_ids()).logits
    codes = {k: v for k, v in reference.state_dict().items() if "experts" in k}
    assert all(torch.equal(v, triton.state_dict()[k]) for k, v in codes.items())
    assert torch.equal(decoded, reference.model.layers[1].mlp.experts.dequantize_expert("gate_up_proj", 3))
    assert torch.equal(logits, reference(_ids()).logits)


def test_a_nan_in_an_expert_part_of_a_checkpoint_is_named_with_its_key(tmp_path):
    from lowmem_lightning.quant import NonFiniteCheckpointError

    _model("mixtral", torch.bfloat16).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"][0, :3] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteCheckpointError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj \(key "
                       r"'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight'\) in model\.safetensors: 3 "
                       r"non-finite elements \(3 nan\)"):
        load_pretrained_causal_lm(tmp_path)
