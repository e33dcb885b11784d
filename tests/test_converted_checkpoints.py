"""Checkpoints whose tensors transformers converts whole while loading, read by the NF4 loader as transformers reads
them.

Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B) stores its experts ``[experts, hidden, intermediate]``, which transformers
swaps into its ``[experts, intermediate, hidden]`` layout (``Transpose(1, 2)``); OLMo-hybrid stores its linear
attention's ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d``, which transformers joins into one ``conv1d``
(``Concatenate(dim=0)``). Before, ``lowmem fit --config qlora_7b.yaml`` and ``lowmem estimate`` on either ended in an
``IndexError`` traceback (the loader took every converter for one that stacks tensors stored per expert). Each model
here is a tiny random checkpoint written by ``save_pretrained`` (which writes the stored layout back), as a user's.
"""

from __future__ import annotations

import pytest
import torch
from test_field_architectures import SIZES, _tokenizer
from tiny_checkpoints import checkpoint_maker

from lowmem_lightning.multimodal import causal_lm_auto_class
from lowmem_lightning.quant import ModelFileError, load_pretrained_causal_lm, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = {**SIZES, "head_dim": 16, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                     "rope_theta": 10000.0}}
CONVERTED = {
    # name: (config class, settings)
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", {
        "text_config": {**TEXT, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48},
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "deepstack_visual_indexes": [0]},
        "image_token_id": 300, "video_token_id": 301, "vision_start_token_id": 302}),
    "olmo_hybrid": ("OlmoHybridConfig", {**SIZES, "num_hidden_layers": 4}),
}
STORED = {"qwen3_vl_moe": "model.language_model.layers.0.mlp.experts.gate_up_proj",
          "olmo_hybrid": "model.layers.0.linear_attn.q_conv1d.weight"}


@pytest.fixture(scope="module")
def converted_dirs(tmp_path_factory):
    """``name -> directory`` of each checkpoint, written on first use."""
    import transformers

    def build(name: str):
        cls, settings = CONVERTED[name]
        config = getattr(transformers, cls)(**settings)
        return causal_lm_auto_class(config).from_config(config)

    def finish(name: str, path) -> None:
        _tokenizer(path)
        if name == "qwen3_vl_moe":  # transformers 5 writes its own layout: make it the Hub's (transformers 4's)
            _store_experts_as_the_hub_does(path)

    return checkpoint_maker(tmp_path_factory.mktemp("converted"), build, finish)


def _store_experts_as_the_hub_does(path) -> None:
    """Rewrite each stored 3-D expert tensor with its last two dimensions swapped: Qwen3-VL-MoE's Hub layout."""
    import json

    from quantized_releases import rewrite_shard

    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted({file for key, file in weight_map.items() if ".experts." in key}):
        rewrite_shard(path, shard, lambda tensors: tensors.update(
            {key: t.transpose(1, 2).contiguous() for key, t in tensors.items() if ".experts." in key}))


def _transformers_load(path):
    from transformers import AutoConfig

    return causal_lm_auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", list(CONVERTED))
def test_whole_tensor_conversions_load_as_transformers_loads_them(name, converted_dirs):
    """The stored layout is the converted one (the test would prove nothing otherwise); loaded in bf16 every tensor
    equals transformers' load, and the NF4 load's logits equal ``quantize_model`` of transformers' load."""
    from safetensors import safe_open

    from lowmem_lightning.quant.loading import checkpoint_files

    path = converted_dirs(name)
    stored = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), "pt") as shard:
            stored.update({key: tuple(shard.get_slice(key).get_shape()) for key in shard.keys()})
    theirs = _transformers_load(path)
    held = {key: tuple(tensor.shape) for key, tensor in theirs.state_dict().items()}
    assert STORED[name] in stored and held.get(STORED[name]) != stored[STORED[name]]
    dense = load_pretrained_causal_lm(path, quantize=None, device="cpu")
    reference = theirs.state_dict()
    assert dense.state_dict().keys() == reference.keys()
    for key, tensor in dense.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    ours = load_pretrained_causal_lm(path, device="cpu")
    theirs = quantize_model(theirs, skip=("lm_head",))
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits, rtol=0, atol=0)


def test_a_conversion_the_loader_does_not_do_is_refused_naming_the_tensor(converted_dirs, monkeypatch):
    """A converter the loader cannot follow (here OLMo-hybrid's, taken as unknown) is refused before any tensor is
    read, naming the stored tensor and what to do instead, not an ``IndexError``."""
    from lowmem_lightning.quant import loading

    monkeypatch.setattr(loading, "_joins_whole_tensors", lambda converter: None)
    with pytest.raises(ModelFileError, match=r"[qkv]_conv1d.* with operations the NF4 loader does not do .* quantize: "
                                             r"null"):
        load_pretrained_causal_lm(converted_dirs("olmo_hybrid"), device="cpu")
