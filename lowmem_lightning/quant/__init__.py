"""4-bit NF4 frozen weights (QLoRA) without bitsandbytes: ``Linear4bit``, ``quantize_model``, LoRA
adapters through peft (``add_lora``; or plain ``peft.get_peft_model`` with a config passed through
``register_peft_custom_module``), and shard-by-shard loading of Hugging Face checkpoints
(``load_pretrained_causal_lm``).
"""

from .linear4bit import Linear4bit, linear4bit_bytes, quantize_model
from .loading import load_pretrained_causal_lm, random_causal_lm
from .lora import LLAMA_TARGET_MODULES, LoraLinear4bit, add_lora, load_lora, register_peft_custom_module

__all__ = [
    "Linear4bit",
    "linear4bit_bytes",
    "quantize_model",
    "add_lora",
    "load_lora",
    "LoraLinear4bit",
    "LLAMA_TARGET_MODULES",
    "register_peft_custom_module",
    "load_pretrained_causal_lm",
    "random_causal_lm",
]
