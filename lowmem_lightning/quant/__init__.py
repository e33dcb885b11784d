"""4-bit NF4 frozen weights (QLoRA) without bitsandbytes: ``Linear4bit``, ``Experts4bit`` (MoE experts held as
3-D parameters), ``quantize_model``, LoRA adapters through peft, and shard-by-shard loading of Hugging Face
checkpoints (``load_pretrained_causal_lm``).

**peft as peft users write it.** A model from :func:`quantize_model` or
:func:`load_pretrained_causal_lm` takes the bitsandbytes QLoRA recipe unchanged::

    model = prepare_model_for_kbit_training(model)            # freezes, upcasts fp16/bf16 params, checkpointing
    model = get_peft_model(model, LoraConfig(r=16, target_modules=[...], task_type="CAUSAL_LM"))
    ...train...; model.save_pretrained(dir)
    model = PeftModel.from_pretrained(quantize_model(base), dir)   # no config, no registration
    merged = model.merge_and_unload()                          # lossless: merged layers become dense
    dense = dequantize_model(merged)                           # and the rest: save_pretrained -> a dense model

TRL's trainers take such a model the same way: ``SFTTrainer(model=quantize_model(model), peft_config=...)``, or a
``get_peft_model`` of it for ``DPOTrainer`` / ``GRPOTrainer`` (``tests/test_field_trl.py``).

How peft picks a LoRA layer (peft 0.21, ``LoraModel._create_new_module`` in ``tuners/lora/model.py``):
it tries a list of dispatchers built inside that function, first match wins: the config's own ``_custom_modules``
(``LoraConfig._register_custom_module``; not saved in ``adapter_config.json``), then bitsandbytes,
EETQ, AQLM, AWQ, GPTQ, HQQ, INC, torchao, Megatron, and last ``dispatch_default``, which wraps
``nn.Linear`` / ``nn.Embedding`` / ``nn.Conv*`` / ``Conv1D``. Each backend dispatcher matches its own
library's classes by ``isinstance`` (and only if that library is installed); the model-level flags
peft reads (``is_loaded_in_4bit``, ``quantization_method``, ``hf_quantizer``) only pass options to
those. There is no model-level hook, and ``PeftModel.from_pretrained(base, dir)`` rebuilds the config
from JSON, so a per-config registration cannot survive a save/load.

So :class:`Linear4bit` *is* an ``nn.Linear`` (with no weight ``Parameter``): ``dispatch_default`` wraps
it with peft's plain ``lora.Linear``, whose forward is ``base_layer(x)`` plus the adapter, for
``get_peft_model`` and ``from_pretrained`` alike, and ``target_modules="all-linear"`` includes it. What
peft does to a base weight beyond that is its merge, ``base.weight.data += delta`` (or, with
``safe_merge``, ``w = base.weight.data.clone(); w += delta`` and then ``base.weight.data = w``, or from peft 0.22
``base.weight.data.copy_(w)``): ``weight`` is an
:class:`NF4WeightHandle` that takes exactly these and makes the layer dense with ``dequantize(W) +
delta`` computed in fp32 (rounded once to ``weight_dtype``, as :func:`add_lora`'s merge does), so
``merge_and_unload()`` is lossless; every other use of ``weight`` as a tensor raises a TypeError naming
``Linear4bit.dequantize``. Nothing is dequantized before a merge, and only merged layers become dense.
Not chosen: a ``torch.Tensor`` subclass weight (every op of every library would need a rule, and
``Parameter.data = x`` swaps only the C++ tensor of a subclass); pre-wrapping layers as peft tuner
layers (peft then warns "modify a model with PEFT for a second time"); patching peft's dispatcher list
(process-wide, forbidden by DESIGN.md). peft's DoRA and weight-reading initialisations (PiSSA, OLoRA,
LoftQ, ...) need a dense base weight: they fail at ``get_peft_model`` with an error naming
``NF4WeightHandle`` (:class:`LoraLinear4bit`, the layer of :func:`add_lora` and :func:`register_peft_custom_module`,
refuses them by name but runs DoRA itself: QDoRA, ``add_lora(..., use_dora=True)``; :func:`load_lora` reloads it).

peft's other adapter methods wrap the same ``nn.Linear`` and call ``base_layer(x)``: LoHa, LoKr, AdaLoRA (which sets
``weight.requires_grad = False``: accepted), VeRA, FourierFT, LN tuning, SHiRA, C3A, RoAd, MiSS, WaveFT, GraLoRA,
BOFT, OFT and IA3 compute on a 4-bit base exactly what they compute on its decoded weights held dense, and
``merge_and_unload(safe_merge=True)`` merges all but OFT (a rotation of the weight) and IA3 (peft refuses 4-bit)
losslessly; VeRA's and SHiRA's default merge (``w = weight.data; w += delta; weight.data = w``) works because ``+=``
hands back the new dense weight (``tests/test_peft_methods_nf4.py``).

``quantize_model`` / ``load_pretrained_causal_lm`` mark the model ``is_loaded_in_4bit`` (an instance
attribute, :func:`mark_loaded_in_4bit`), as transformers does for bitsandbytes 4-bit models: with it
``peft.prepare_model_for_kbit_training`` enables input gradients and gradient checkpointing. Its
fp32 upcast touches parameters only (embeddings, norms, biases); NF4 codes and scales are buffers.
The flag is true only while a 4-bit layer remains and bitsandbytes is installed, since transformers'
``num_parameters()`` (the HF ``Trainer``'s FLOP count, every step) imports bitsandbytes when it is true;
without bitsandbytes it reads false and warns once that gradient checkpointing is then the user's to
enable (so a merged model saves, and the ``Trainer`` runs, without bitsandbytes).

Bad inputs name themselves: :class:`ModelFileError` (a ``ValueError`` with ``.path``) for a missing,
empty, truncated or foreign model file; :class:`NonFiniteWeightError` for nan/inf weights given to
:func:`quantize_model`, and :class:`NonFiniteCheckpointError` (both) for nan/inf read from a file.

:func:`add_lora` (and :func:`register_peft_custom_module` for a config of your own) still registers
:class:`LoraLinear4bit` on the config it builds: same adapter keys and math, and its merge swaps the
4-bit layer for a plain ``nn.Linear`` (``unmerge`` restores the exact codes). Adapters saved by either
path load with either.
"""

from .convert import (
    LoadedIn4bit,
    clamped_weight_names,
    ddp_skip_nf4_buffers,
    dequantize_model,
    kept_dense_names,
    mark_loaded_in_4bit,
    prepare_for_kbit_training,
    quantize_model,
    router_names,
)
from .experts import Experts4bit, quantize_experts
from .host_embeddings import HostEmbedding, hold_embeddings_on_host, host_table_names
from .linear4bit import Linear4bit, NF4WeightHandle, NonFiniteWeightError, linear4bit_bytes
from .loading import ModelFileError, NonFiniteCheckpointError, load_pretrained_causal_lm, random_causal_lm
from .lora import (
    LLAMA_TARGET_MODULES,
    LoraLinear4bit,
    add_lora,
    load_lora,
    register_peft_custom_module,
    resolve_target_modules,
)

__all__ = [
    "Linear4bit",
    "Experts4bit",
    "quantize_experts",
    "NF4WeightHandle",
    "LoadedIn4bit",
    "linear4bit_bytes",
    "mark_loaded_in_4bit",
    "prepare_for_kbit_training",
    "quantize_model",
    "router_names",
    "clamped_weight_names",
    "kept_dense_names",
    "dequantize_model",
    "ddp_skip_nf4_buffers",
    "add_lora",
    "load_lora",
    "LoraLinear4bit",
    "LLAMA_TARGET_MODULES",
    "register_peft_custom_module",
    "resolve_target_modules",
    "load_pretrained_causal_lm",
    "random_causal_lm",
    "ModelFileError",
    "NonFiniteWeightError",
    "NonFiniteCheckpointError",
    "HostEmbedding",
    "host_table_names",
    "hold_embeddings_on_host",
]
