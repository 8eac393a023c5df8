"""Router cost against the expert computation of one MoE layer, at GRIN-MoE's layer shape, on this machine.

GRIN's shape is kept (hidden 4096, expert size 6400, 16 experts, top-2) so the ratio is the model's; only the number of
tokens is CPU-sized. Times are medians of `--repeats` runs; the ratio (router / experts) is what to read, since both
are measured in the same run.

    python benchmarks/router_cost.py --tokens 128 --json router_cost.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling_grin import GrinMoeConfig  # noqa: E402
from modeling_grin.modeling_grin_moe import GrinMoeExperts  # noqa: E402
from modeling_grin.sparsemixer import GrinMoeRouter  # noqa: E402


def median_seconds(function, repeats: int, device: torch.device) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=6400)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts-implementation", default="grouped_mm", choices=["eager", "grouped_mm"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    config = GrinMoeConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_attention_heads=1,
        num_key_value_heads=1,
        experts_implementation=args.experts_implementation,
    )
    experts = GrinMoeExperts(config).to(device, dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    routers = {}
    for router_type in ("sparsemixer_v2", "softmax_topk"):
        config.router_type = router_type
        routers[router_type] = GrinMoeRouter(config).to(device, dtype)
        torch.nn.init.normal_(routers[router_type].weight, std=0.02)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    _, weights, indices = routers["sparsemixer_v2"].eval()(hidden)

    def experts_forward():
        with torch.no_grad():
            experts(hidden, indices, weights)

    def experts_training():
        x = hidden.clone().requires_grad_(True)
        experts(x, indices, weights.detach().requires_grad_(True)).sum().backward()

    results = {"experts/forward": median_seconds(experts_forward, args.repeats, device)}
    results["experts/forward+backward"] = median_seconds(experts_training, args.repeats, device)
    for name, router in routers.items():
        router.eval()

        def router_forward(router=router):
            with torch.no_grad():
                router(hidden)

        def router_training(router=router):
            router.train()
            x = hidden.clone().requires_grad_(True)
            logits, w, _ = router(x)
            (w.sum() + logits.sum() * 0).backward()

        results[f"{name}/forward"] = median_seconds(router_forward, args.repeats, device)
        results[f"{name}/forward+backward"] = median_seconds(router_training, args.repeats, device)

    print(f"command: python {' '.join(sys.argv)}")
    print(f"shape: hidden {args.hidden}, expert size {args.intermediate}, {args.experts} experts, top-{args.top_k}, "
          f"{args.tokens} tokens, experts implementation {args.experts_implementation}, {args.dtype} on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}")
    print("| part | pass | median ms | router / experts |")
    print("|---|---|---|---|")
    for key, seconds in results.items():
        part, mode = key.split("/")
        ratio = "" if part == "experts" else f"{seconds / results['experts/' + mode]:.2%}"
        print(f"| {part} | {mode} | {seconds * 1e3:.2f} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "seconds": results}, indent=2))


if __name__ == "__main__":
    main()
