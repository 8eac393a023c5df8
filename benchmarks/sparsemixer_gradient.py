"""How well router gradient estimators point along the exact gradient of the expected loss (enumerable problems).

Prints, per top-k, the mean cosine similarity (± standard error over random problems) between each estimator's
Monte-Carlo mean gradient and the exact gradient of the two objectives described in `modeling_grin.router_analysis`.

    python benchmarks/sparsemixer_gradient.py --problems 20 --samples 20000 100000 --json results.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling_grin.router_analysis import ESTIMATORS, OBJECTIVES, compare_estimators  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--problems", type=int, default=20, help="random problems per setting")
    parser.add_argument("--samples", type=int, nargs="+", default=[20000, 100000], help="tokens per Monte-Carlo mean")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--jitter-eps", type=float, default=1.0, help=">= 1 masks nothing")
    parser.add_argument("--output-scale", type=float, nargs="+", default=[1.0, 0.25], help="size of expert outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    print(f"command: python {' '.join(sys.argv)}")
    rows = []
    for output_scale in args.output_scale:
        for top_k in args.top_k:
            for samples in args.samples:
                started = time.perf_counter()
                summary = compare_estimators(
                    top_k, args.problems, args.experts, args.dim, samples, args.jitter_eps,
                    output_scale=output_scale, seed=args.seed,
                )
                for estimator in ESTIMATORS:
                    row = {"output_scale": output_scale, "top_k": top_k, "samples": samples, "estimator": estimator}
                    for objective in OBJECTIVES:
                        row[f"cos_{objective}"], row[f"se_{objective}"] = summary[estimator, objective]
                    rows.append(row)
                seconds = time.perf_counter() - started
                print(f"  scale {output_scale}, top-{top_k}, {samples} samples: {seconds:.1f}s", file=sys.stderr)

    print(f"\n{args.problems} problems, {args.experts} experts, dim {args.dim}, jitter_eps {args.jitter_eps}")
    print("| output scale | top-k | samples | estimator | cos vs exact ∇, sampling objective (v2) "
          "| cos vs exact ∇, full objective (v2*) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['output_scale']} | {row['top_k']} | {row['samples']} | {row['estimator']} | "
            f"{row['cos_sampling']:.3f} ± "
            f"{row['se_sampling']:.3f} | {row['cos_full']:.3f} ± {row['se_full']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
