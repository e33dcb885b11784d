"""peft's adapter methods other than LoRA on our NF4 model, as their users write them
(``get_peft_model(model, XConfig(...))``, train, ``merge_and_unload``): each must compute what it computes on the same
weights held dense, and a merge must either give the dense merge's model or refuse with a message that says what to
do, never a half-merged model."""

import copy

import peft
import pytest
import torch
from peft import get_peft_model

from lowmem_lightning.optim import build_optimizer
from lowmem_lightning.quant import dequantize_model, quantize_model

VOCAB = 128
TARGETS = ["q_proj", "v_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _method(cls_name: str, **kwargs):
    """(config class name, kwargs): the config, built at test time (skipped where this peft lacks the method)."""
    return pytest.param(cls_name, kwargs, id=cls_name.removesuffix("Config"))


METHODS = [
    _method("LoHaConfig", r=4, target_modules=TARGETS),
    _method("LoKrConfig", r=4, target_modules=TARGETS),
    _method("AdaLoraConfig", init_r=4, target_r=2, target_modules=TARGETS, total_step=10),
    _method("VeraConfig", r=4, target_modules=TARGETS),
    _method("FourierFTConfig", n_frequency=16, target_modules=TARGETS),
    _method("LNTuningConfig", target_modules=["input_layernorm"]),
    _method("LoraConfig", r=4, target_modules=TARGETS, use_rslora=True),
    _method("ShiraConfig", r=4, target_modules=TARGETS),
    _method("C3AConfig", block_size=16, target_modules=TARGETS),
    _method("RoadConfig", target_modules=TARGETS),
    _method("MissConfig", r=4, target_modules=TARGETS),
    _method("WaveFTConfig", target_modules=TARGETS),
    _method("GraloraConfig", r=4, target_modules=TARGETS),
]
"""Methods whose forward and ``merge_and_unload(safe_merge=True)`` work on a 4-bit base as on a dense one (BOFT does
too, left out: it tries to build a CUDA extension under ``~/.cache`` when first used)."""


def _config(cls_name: str, kwargs: dict):
    cls = getattr(peft, cls_name, None)
    if cls is None:
        pytest.skip(f"peft {peft.__version__} has no {cls_name}")
    return cls(**kwargs)


def _nf4_and_its_dense_twin(dense):
    """Our 4-bit model, and a dense model holding exactly the weights the 4-bit one decodes to."""
    nf4 = quantize_model(copy.deepcopy(dense))
    return nf4, dequantize_model(copy.deepcopy(nf4))


def _same_adapters(config, nf4, twin):
    """Both wrapped by peft, every trainable tensor set to the same random values (not the identity init)."""
    a, b = get_peft_model(nf4, copy.deepcopy(config)), get_peft_model(twin, copy.deepcopy(config))
    mine = {n: p for n, p in a.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in b.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(theirs) and mine
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in sorted(mine):
            value = torch.randn(mine[name].shape, generator=generator) * 0.05
            mine[name].copy_(value)
            theirs[name].copy_(value)
    return a.eval(), b.eval()


def _ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cls_name, kwargs", METHODS)
def test_method_computes_on_4bit_weights_what_it_computes_on_them_dense_and_merges_losslessly(dense_llama, cls_name,
                                                                                              kwargs):
    a, b = _same_adapters(_config(cls_name, kwargs), *_nf4_and_its_dense_twin(dense_llama))
    ids = _ids()
    adapted = a(input_ids=ids).logits
    assert torch.equal(adapted, b(input_ids=ids).logits)
    merged, merged_dense = a.merge_and_unload(safe_merge=True), b.merge_and_unload(safe_merge=True)
    logits = merged(input_ids=ids).logits
    assert torch.equal(logits, merged_dense(input_ids=ids).logits)
    torch.testing.assert_close(logits, adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls_name, kwargs", [METHODS[3], METHODS[7]])  # VeRA, SHiRA
def test_merges_that_add_to_the_base_weight_in_place_work_without_safe_merge(dense_llama, cls_name, kwargs):
    """VeRA's and SHiRA's unsafe merge: ``w = base.weight.data; w += delta; base.weight.data = w``. The ``+=`` made
    the layer dense and the assignment then failed (a Parameter cannot take the handle), leaving a layer merged that
    peft thought unmerged."""
    a, b = _same_adapters(_config(cls_name, kwargs), *_nf4_and_its_dense_twin(dense_llama))
    ids = _ids()
    merged = a.merge_and_unload()
    assert torch.equal(merged(input_ids=ids).logits, b.merge_and_unload()(input_ids=ids).logits)


def test_oft_trains_on_4bit_weights_and_its_merge_is_refused_saying_what_to_do(dense_llama):
    """OFT's merge reads the base weight as a tensor (a rotation of it) whatever ``safe_merge`` is: refused before
    any layer changes, naming ``dequantize`` and the unquantized model."""
    config = peft.OFTConfig(r=0, oft_block_size=16, target_modules=TARGETS)
    a, b = _same_adapters(config, *_nf4_and_its_dense_twin(dense_llama))
    ids = _ids()
    adapted = a(input_ids=ids).logits
    assert torch.equal(adapted, b(input_ids=ids).logits)
    for safe_merge in (False, True):
        with pytest.raises((TypeError, AttributeError), match=r"(?s)dequantize\(dtype\).*loaded unquantized"):
            a.merge_and_unload(safe_merge=safe_merge)
        assert torch.equal(a(input_ids=ids).logits, adapted)


def test_adalora_prunes_and_trains_with_adamw_8bit_on_4bit_weights_as_on_them_dense(dense_llama):
    """AdaLoRA as its users run it (``update_and_allocate`` after each step) with our 8-bit AdamW: the same losses
    and the same ranks kept as on the dense twin, then a lossless merge. It could not be built before: AdaLoRA sets
    ``base_layer.weight.requires_grad = False``."""
    nf4, twin = _nf4_and_its_dense_twin(dense_llama)
    config = peft.AdaLoraConfig(init_r=6, target_r=2, target_modules=[*TARGETS, "down_proj"], total_step=30,
                                tinit=4, tfinal=8, deltaT=2, task_type="CAUSAL_LM")
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))

    def train(base):
        torch.manual_seed(3)
        model = get_peft_model(base, copy.deepcopy(config)).train()
        optimizer = build_optimizer("adamw_8bit", [p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(30):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
            losses.append(loss.item())
        return model.eval(), losses

    (a, losses), (b, dense_losses) = train(nf4), train(twin)
    assert losses == dense_losses and losses[-1] < losses[0] - 0.5
    ranks = a.peft_config["default"].rank_pattern
    assert ranks == b.peft_config["default"].rank_pattern
    assert sum(sum(kept) for kept in ranks.values()) < 6 * len(ranks)  # ranks were pruned
    adapted = a(input_ids=ids).logits
    merged = a.merge_and_unload()
    assert torch.equal(merged(input_ids=ids).logits, b.merge_and_unload()(input_ids=ids).logits)
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)


def test_the_4bit_weight_can_be_frozen_again_but_not_unfrozen(dense_llama):
    layer = quantize_model(copy.deepcopy(dense_llama)).model.layers[0].self_attn.q_proj
    layer.weight.requires_grad = False
    assert layer.weight.requires_grad is False and layer.is_quantized
    with pytest.raises(ValueError, match=r"Invalid requires_grad=True for Linear4bit.weight: .*dequantize_model"):
        layer.weight.requires_grad = True
    assert layer.is_quantized


def test_reading_the_4bit_weight_as_a_tensor_names_what_to_do_instead(dense_llama):
    """PiSSA-, HRA-like code reads the base weight: every kind of read is refused with the same message."""
    layer = quantize_model(copy.deepcopy(dense_llama)).model.layers[0].self_attn.q_proj
    delta = torch.zeros(64, 64)
    for read in (lambda w: w + delta, lambda w: delta - w, lambda w: w @ delta, lambda w: torch.norm(w),
                 lambda w: w.to(torch.float32), lambda w: w.t()):
        with pytest.raises((TypeError, AttributeError), match=r"(?s)layer.dequantize\(dtype\).*PiSSA"):
            read(layer.weight)
    assert layer.is_quantized
