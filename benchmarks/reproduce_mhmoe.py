"""MH-MoE paper (arXiv 2411.16205, Table 1) at small scale: SMoE vs fine-grained SMoE vs MH-MoE h=2 and h=3 at
equal per-token FLOPs, trained on the embedded corpus over several seeds.

    python benchmarks/reproduce_mhmoe.py --seeds 0 1 2 --steps 100 --threads 1 --plot docs/images/reproduce_mhmoe.png

With `--bitnet` every variant trains as BitNet b1.58 (`bitnet=True`: ternary attention, dense FFN and experts, int8
activations; head/merge layers, routers, embeddings in full precision), the paper's Table 3.

The variants are the paper presets `mh-moe-paper-{smoe,fine-grained,h2,h3}` scaled down: hidden size d (default 96),
`--layers` layers with an MoE block every second one, dense FFN 8d/3 (2048 at d=768), and

- SMoE: 8 experts of 8d/3, top-1, no head/merge layers;
- fine-grained SMoE: 16 experts of 4d/3, top-2;
- MH-MoE h=2 / h=3: head and merge layers, top-2 / top-3, expert size and count from `mh_moe_parity` (FLOPs parity
  exact, expert count the nearest multiple of 8 to parameter parity, as the paper: 40 × d and 96 × 2d/3).

Everything else (RMSNorm, softmax top-k on raw probabilities, aux-loss weight 0.01, no jitter) is the presets'.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce_common as common  # noqa: E402

from modeling_grin.configuration_mh_moe import mh_moe_parity  # noqa: E402
from modeling_grin.presets import load_preset  # noqa: E402

REFERENCE = "SMoE"
PAPER_PPL_100K = {"SMoE": 10.90, "fine-grained": 10.74, "MH-MoE h=2": 10.70, "MH-MoE h=3": 10.51}  # RedPajama
PAPER_PPL_100K_BITNET = {"SMoE": 26.78, "fine-grained": 26.68, "MH-MoE h=2": 26.59, "MH-MoE h=3": 26.47}  # Table 3


def variant_configs(
    hidden_size: int, layers: int, attention_heads: int, block_size: int, bitnet: bool = False
) -> tuple[dict, dict]:
    """The four configs, and per variant the shape and per-token MoE-layer cost that show FLOPs parity."""
    if hidden_size % 6:
        raise ValueError(f"hidden size must be a multiple of 6 (h=2 and h=3 heads, 8d/3 expert), got {hidden_size}")
    if hidden_size % attention_heads:
        raise ValueError(f"attention heads ({attention_heads}) must divide the hidden size ({hidden_size})")
    d = hidden_size
    smoe_size = 8 * d // 3  # paper: 2048 at d = 768
    shapes = {
        "SMoE": ("mh-moe-paper-smoe", 1, smoe_size, 8, 1),
        "fine-grained": ("mh-moe-paper-fine-grained", 1, smoe_size // 2, 16, 2),
    }
    parity = {}
    for heads, preset in ((2, "mh-moe-paper-h2"), (3, "mh-moe-paper-h3")):
        result = mh_moe_parity(d, smoe_size, 8, 1, heads=heads, top_k=heads, experts_multiple_of=8)
        shapes[f"MH-MoE h={heads}"] = (preset, heads, result.expert_size, result.num_experts, heads)
        parity[f"MH-MoE h={heads}"] = result.exact_num_experts
    corpus = common.prepare_corpus(block_size)
    configs, description = {}, {}
    for name, (preset, heads, expert_size, experts, top_k) in shapes.items():
        config = load_preset(
            preset,
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=attention_heads,
            num_key_value_heads=attention_heads,
            dense_intermediate_size=smoe_size,
            intermediate_size=expert_size,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            max_position_embeddings=max(block_size, 64),
            bitnet=bitnet,
            **corpus.token_overrides,
        )
        assert config.moe_heads == heads, (name, config.moe_heads)
        cost = config.moe_layer_cost()
        configs[name] = config
        description[name] = {
            "preset": preset,
            "heads": heads,
            "experts": experts,
            "expert_size": expert_size,
            "top_k": top_k,
            "head_merge": bool(config.use_head_projection and config.use_merge_projection),
            "moe_layers": common.moe_layer_count(config),
            "moe_flops_per_token": cost.flops_per_token,
            "moe_parameters": cost.parameters,
            "router_parameters": cost.router_parameters,
            "exact_parity_experts": parity.get(name),
            "bitnet": bitnet,
        }
    return configs, description


def describe(description: dict) -> str:
    reference = description[REFERENCE]
    lines = [
        "| variant | heads | experts × size | top-k | MoE FLOPs/token/layer | vs SMoE | MoE params/layer | vs SMoE |"
        " model params (active / total) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in description.items():
        lines.append(
            f"| {name} | {row['heads']} | {row['experts']} × {row['expert_size']} | {row['top_k']} | "
            f"{row['moe_flops_per_token']:,} | {row['moe_flops_per_token'] / reference['moe_flops_per_token'] - 1:+.1%}"
            f" | {row['moe_parameters']:,} | {row['moe_parameters'] / reference['moe_parameters'] - 1:+.1%} | "
            f"{row.get('active_parameters', 0):,} / {row.get('total_parameters', 0):,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    common.add_common_arguments(parser, steps=100, plot="reproduce_mhmoe.png")
    parser.add_argument("--hidden-size", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--attention-heads", type=int, default=4)
    parser.add_argument("--bitnet", action="store_true", help="train every variant as BitNet b1.58 (Table 3)")
    parser.set_defaults(script="benchmarks/reproduce_mhmoe.py")
    args = parser.parse_args(argv)
    common.apply_threads(args)
    started = time.perf_counter()

    configs, description = variant_configs(args.hidden_size, args.layers, args.attention_heads, args.block_size,
                                           args.bitnet)
    runs = common.run_variants(
        configs, args.seeds, args.steps, args.batch_size, args.block_size, args.lr, progress=not args.no_progress,
        eval_fraction=args.eval_fraction,
    )
    common.record_parameter_counts(description, runs)
    print(f"\nVariants (d={args.hidden_size}, {args.layers} layers, MoE every second layer; FLOPs = 2 × "
          "multiply-accumulates of experts + head/merge, router excluded):\n")
    print(describe(description))
    paper_ppl = PAPER_PPL_100K_BITNET if args.bitnet else PAPER_PPL_100K
    title = "MH-MoE vs SMoE at FLOPs parity" + (", BitNet b1.58" if args.bitnet else "")
    result = common.finish(
        args, argv, title, {"variants": description, "paper_ppl_100k": paper_ppl}, runs, REFERENCE, started,
    )
    ranking = [row["variant"] for row in sorted(result["summary"], key=lambda row: row["heldout_ppl_mean"])]
    paper = sorted(paper_ppl, key=paper_ppl.get)
    result["ranking"] = ranking
    result["ordering_matches_paper"] = ranking == paper
    print(f"\nmeasured order (best first): {' < '.join(ranking)}; paper: {' < '.join(paper)} -> "
          f"{'same' if ranking == paper else 'different'}")
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
