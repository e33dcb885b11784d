"""How many tokens an MoE router sends elsewhere when its weights are rounded to bf16.

transformers keeps the routers of DeepSeek-V2/V3, GLM-4.5, ERNIE 4.5 MoE and Nemotron-H in fp32 whatever the load
dtype (``_keep_in_fp32_modules_strict``); our NF4 load and full fine-tune build cast them to bf16 before
``lowmem_lightning.kept_fp32``. This measures what that rounding changes on a DeepSeek-V2-Lite-shaped model (64 routed
experts, 6 per token, 2 shared; random weights from transformers' initialisation, a smaller hidden size and depth):
the share of tokens whose set of experts differs, per MoE layer, and the largest logit difference. Random weights are
not a trained router: the figure says the effect is not zero, not what a released model loses.

Second, what NF4 does to a router that is a linear layer (Gemma 4's ``router.proj``, which transformers' bitsandbytes
path quantizes and ``quantize_model`` now keeps dense: ``lowmem_lightning.quant.router_names``): a Gemma-4-26B-A4B-
shaped MoE stack (64 experts, 8 per token, hidden 1024; random weights), the routers alone in NF4. The first layer's
figure is the router's own; later layers add the first one's changed output.

    python benchmarks/router_precision.py [--tokens 4096] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch


def _model(seed: int):
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    torch.manual_seed(seed)
    config = DeepseekV2Config(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=3,
                              num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64, num_experts_per_tok=6,
                              n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=128,
                              qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, vocab_size=1000)
    return AutoModelForCausalLM.from_config(config).eval()


def measure(tokens: int, seed: int) -> tuple[dict[str, float], float]:
    """``({router name: share of tokens routed to another expert set}, largest logit difference)`` between the fp32
    router and the same router's weights rounded to bf16 (computed in fp32 both times)."""
    model = _model(seed)
    routers = [(name, module) for name, module in model.named_modules() if name.endswith("mlp.gate")]
    picked: dict[str, list[torch.Tensor]] = {}
    for name, module in routers:
        module.register_forward_hook(lambda m, i, out, name=name: picked.setdefault(name, []).append(out[2]))
    ids = torch.randint(0, model.config.vocab_size, (max(tokens // 256, 1), 256),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        exact = model(input_ids=ids).logits
        first = {name: torch.sort(picks[0], -1).values for name, picks in picked.items()}
        picked.clear()
        for _, module in routers:
            module.weight.data = module.weight.data.bfloat16().float()
        rounded = model(input_ids=ids).logits
    moved = {name: float((torch.sort(picked[name][0], -1).values != first[name]).any(-1).float().mean())
             for name in first}
    return moved, float((exact - rounded).abs().max())


def measure_nf4_router(tokens: int, seed: int) -> dict[str, float]:
    """``{router name: share of tokens routed to another expert set}`` between a Gemma-4-shaped MoE stack in bf16 and
    the same stack with each router's linear layer in NF4 (blocks of 64, double quantization)."""
    from transformers import AutoModelForCausalLM, Gemma4TextConfig

    from lowmem_lightning.quant import Linear4bit

    torch.manual_seed(seed)
    config = Gemma4TextConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=128, global_head_dim=128, vocab_size=1000,
                              hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=64, top_k_experts=8,
                              moe_intermediate_size=256, layer_types=["sliding_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)
    routers = [(name, module) for name, module in model.named_modules() if name.endswith(".router")]
    picked: dict[str, list[torch.Tensor]] = {}
    for name, module in routers:
        module.register_forward_hook(lambda m, i, out, name=name: picked.setdefault(name, []).append(out[2]))
    ids = torch.randint(0, config.vocab_size, (max(tokens // 256, 1), 256),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(input_ids=ids)
        first = {name: torch.sort(picks[0], -1).values for name, picks in picked.items()}
        picked.clear()
        for _, module in routers:
            module.proj = Linear4bit._quantized_copy(module.proj, 64, True, None)
        model(input_ids=ids)
    return {name: float((torch.sort(picked[name][0], -1).values != first[name]).any(-1).float().mean())
            for name in first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    moved, logits = measure(args.tokens, args.seed)
    print("| router | tokens routed to another expert set |")
    print("|---|---:|")
    for name, share in moved.items():
        print(f"| {name} | {share:.2%} |")
    print(f"\nlargest logit difference: {logits:.4f}\n")
    print("| Gemma-4-shaped router in NF4 | tokens routed to another expert set |")
    print("|---|---:|")
    for name, share in measure_nf4_router(args.tokens, args.seed).items():
        print(f"| {name} | {share:.2%} |")


if __name__ == "__main__":
    main()
