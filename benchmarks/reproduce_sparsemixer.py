"""GRIN MoE (arXiv 2409.12136) at small scale: SparseMixer-v2 routing vs softmax top-2 routing, trained on the
embedded corpus over several seeds, everything else equal.

    python benchmarks/reproduce_sparsemixer.py --seeds 0 1 2 3 4 --steps 100 --threads 1 \
        --plot docs/images/reproduce_sparsemixer.png

All models are the `grin-moe-tiny` preset (d=128, 4 layers, an MoE block in every layer, 8 experts of 192, top-2,
input jitter 0.01, aux-loss weight 0.001); only the routing differs: `sparsemixer_v2` (masked-softmax sampling with
the Heun-corrected straight-through gradient, mask threshold 2 × 0.01), `softmax_topk` renormalised (Mixtral-style:
the two gate values sum to 1, gradient through them only), and the gate-scale control, `softmax_topk` *not*
renormalised: SparseMixer-v2's eval weights are about 1.0 per slot (sum about 2) where renormalised top-2 sums to 1,
so comparing only those two changes the estimator and the gate scale at once. Same seed = same initial weights and
batches for all, so the per-seed differences are paired.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce_common as common  # noqa: E402

from modeling_grin.presets import load_preset  # noqa: E402

REFERENCE = "softmax top-2"
# variant -> (router_type, router_renormalize); renormalisation only applies to softmax_topk
ROUTERS = {
    "SparseMixer-v2": ("sparsemixer_v2", True),
    "softmax top-2": ("softmax_topk", True),
    "softmax top-2, not renormalised": ("softmax_topk", False),
}


def variant_configs(preset: str, block_size: int) -> tuple[dict, dict]:
    corpus = common.prepare_corpus(block_size)
    configs, description = {}, {}
    for name, (router_type, renormalize) in ROUTERS.items():
        config = load_preset(preset, router_type=router_type, router_renormalize=renormalize,
                             max_position_embeddings=max(block_size, 64), **corpus.token_overrides)
        configs[name] = config
        description[name] = {
            "preset": preset,
            "router_type": router_type,
            "router_renormalize": config.router_renormalize,
            "experts": config.num_local_experts,
            "expert_size": config.intermediate_size,
            "top_k": config.num_experts_per_tok,
            "router_jitter_noise": config.router_jitter_noise,
            "input_jitter_noise": config.input_jitter_noise,
            "router_aux_loss_coef": config.router_aux_loss_coef,
        }
    return configs, description


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    common.add_common_arguments(parser, steps=100, plot="reproduce_sparsemixer.png")
    parser.add_argument("--preset", default="grin-moe-tiny")
    parser.set_defaults(script="benchmarks/reproduce_sparsemixer.py")
    args = parser.parse_args(argv)
    common.apply_threads(args)
    started = time.perf_counter()

    configs, description = variant_configs(args.preset, args.block_size)
    runs = common.run_variants(
        configs, args.seeds, args.steps, args.batch_size, args.block_size, args.lr, progress=not args.no_progress,
        eval_fraction=args.eval_fraction,
    )
    common.record_parameter_counts(description, runs)
    result = common.finish(
        args, argv, "SparseMixer-v2 vs softmax top-2", {"variants": description}, runs, REFERENCE, started
    )
    row = next(row for row in result["summary"] if row["variant"] == "SparseMixer-v2")
    seed_std = max(r["heldout_loss_std"] for r in result["summary"])
    result["sparsemixer_minus_softmax"] = {
        "delta_loss_mean": row["delta_loss_vs_reference_mean"],
        "delta_loss_std": row["delta_loss_vs_reference_std"],
        "largest_seed_std": seed_std,
        "exceeds_seed_std": abs(row["delta_loss_vs_reference_mean"]) > seed_std if row["seeds"] > 1 else None,
    }
    verdict = {True: "larger", False: "not larger", None: "one seed: no"}[
        result["sparsemixer_minus_softmax"]["exceeds_seed_std"]
    ]
    print(
        f"\nSparseMixer-v2 − softmax top-2 held-out loss: {row['delta_loss_vs_reference_mean']:+.4f} ± "
        f"{row['delta_loss_vs_reference_std']:.4f} (paired over seeds); largest seed std {seed_std:.4f} -> "
        f"{verdict} than the seed std"
    )
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
