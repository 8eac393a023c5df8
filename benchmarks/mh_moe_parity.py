"""Per-token MoE-layer FLOPs and parameters of the MH-MoE paper presets, from `MhMoeConfig.moe_layer_cost()`.

    python benchmarks/mh_moe_parity.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling_grin.configuration_mh_moe import mh_moe_parity  # noqa: E402
from modeling_grin.presets import load_preset  # noqa: E402


def with_router(cost) -> int:
    return cost.flops_per_token + cost.router_flops_per_token


def main() -> None:
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| preset | heads | experts × size | top-k | shared | MoE FLOPs/token | vs SMoE | MoE params | vs SMoE |"
          " router params | router FLOPs/token | with router, vs SMoE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for suffix in ("", "-shared"):
        reference = load_preset(f"mh-moe-paper-smoe{suffix}").moe_layer_cost()
        for setup in ("smoe", "fine-grained", "h2", "h3"):
            name = f"mh-moe-paper-{setup}{suffix}"
            config = load_preset(name)
            cost = config.moe_layer_cost()
            print(
                f"| {name} | {config.moe_heads} | {config.num_local_experts} × {config.intermediate_size} | "
                f"{config.num_experts_per_tok} | {config.shared_expert_intermediate_size or '-'} | "
                f"{cost.flops_per_token:,} | {cost.flops_per_token / reference.flops_per_token - 1:+.1%} | "
                f"{cost.parameters:,} | {cost.parameters / reference.parameters - 1:+.1%} | "
                f"{cost.router_parameters:,} | {cost.router_flops_per_token:,} | "
                f"{with_router(cost) / with_router(reference) - 1:+.2%} |"
            )
    print("\nParity rule for d=768 against SMoE 8 × 2048, top-1 (exact expert count before rounding):")
    for heads, top_k in ((2, 2), (3, 3)):
        result = mh_moe_parity(768, 2048, 8, 1, heads, top_k, experts_multiple_of=8)
        print(
            f"- h={heads}, top-{top_k}: expert size {result.expert_size}, experts {result.exact_num_experts:.2f} -> "
            f"{result.num_experts}, FLOPs ratio {result.flops_ratio:.3f}, parameter ratio {result.parameter_ratio:.4f}"
        )


if __name__ == "__main__":
    main()
