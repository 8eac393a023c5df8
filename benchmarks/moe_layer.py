"""Experts of one MoE layer: forward and forward+backward speed and peak memory of every experts implementation.

Compares this package's `fused` with transformers' `eager`, `grouped_mm` and `batched_mm` (when its per-token weight
copies fit in memory) and with `dense`: plain GEMMs doing the same FLOPs (a SwiGLU MLP over the tokens x top_k routed
rows). All run in one invocation, each in its own subprocess so peak memory is its own; ratios are to be read within
one run. Routing is uniform random top-k (distinct experts per token), fixed by the seed; the router is not timed.

    python benchmarks/moe_layer.py                                     # CPU shape: H=512, I=800, E=16, k=2, 2048 tokens
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 6400 --tokens 8192
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling_grin import GrinMoeConfig  # noqa: E402
from modeling_grin.modeling_grin_moe import GrinMoeExperts  # noqa: E402

IMPLEMENTATIONS = ("fused", "grouped_mm", "batched_mm", "eager", "dense")


def build(args, implementation: str):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    rows = args.tokens * args.top_k
    hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(device, dtype)
    if implementation == "dense":
        up = torch.nn.Linear(args.hidden, 2 * args.intermediate, bias=False).to(device, dtype)
        down = torch.nn.Linear(args.intermediate, args.hidden, bias=False).to(device, dtype)
        inputs = torch.randn(rows, args.hidden, generator=generator).to(device, dtype)

        def step(x):
            gate, value = up(x).chunk(2, dim=-1)
            return down(torch.nn.functional.silu(gate) * value)

        return step, inputs
    config = GrinMoeConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_attention_heads=1,
        num_key_value_heads=1,
        experts_implementation=implementation,
    )
    experts = GrinMoeExperts(config).to(device, dtype)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(0, 0.02)
    scores = torch.rand(args.tokens, args.experts, generator=generator)
    index = scores.topk(args.top_k, dim=-1).indices.to(device)
    weights = torch.rand(args.tokens, args.top_k, generator=generator).to(device)

    def step(x):
        return experts(x, index, weights)

    return step, hidden


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args, implementation: str) -> dict:
    torch.manual_seed(args.seed)
    step, inputs = build(args, implementation)
    synchronize(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    baseline_memory = torch.cuda.memory_allocated() if args.device.startswith("cuda") else None
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def forward():
        with torch.no_grad():
            step(inputs)

    def training():
        x = inputs.detach().requires_grad_(True)
        step(x).float().pow(2).mean().backward()

    result = {"implementation": implementation}
    for name, function in (("forward", forward), ("forward+backward", training)):
        function()  # warm-up
        times = []
        for _ in range(args.repeats):
            synchronize(args.device)
            started = time.perf_counter()
            function()
            synchronize(args.device)
            times.append(time.perf_counter() - started)
        result[f"{name} ms"] = statistics.median(times) * 1e3
        result[f"{name} tokens/s"] = args.tokens / statistics.median(times)
    if args.device.startswith("cuda"):
        result["peak extra MiB"] = (torch.cuda.max_memory_allocated() - baseline_memory) / 2**20
    else:  # growth of the process's high-water mark after the model and inputs were built
        result["peak extra MiB"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    return result


def batched_mm_bytes(args) -> int:
    """batched_mm copies every routed row's expert weights: rows x 3 x H x I elements, once, plus their gradient."""
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    return 2 * args.tokens * args.top_k * 3 * args.hidden * args.intermediate * element


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=800)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-budget-gib", type=float, default=8.0, help="skip batched_mm above this estimate")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)  # one measurement, JSON to stdout
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if args.only:
        print(json.dumps(measure(args, args.only)))
        return

    results = []
    for implementation in args.implementations:
        if implementation == "batched_mm" and batched_mm_bytes(args) > args.memory_budget_gib * 2**30:
            print(f"  batched_mm skipped: needs about {batched_mm_bytes(args) / 2**30:.0f} GiB", file=sys.stderr)
            continue
        command = [sys.executable, __file__, *sys.argv[1:], "--only", implementation]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            print(f"  {implementation} failed:\n{completed.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(f"  {implementation}: done", file=sys.stderr)

    dense = next((r for r in results if r["implementation"] == "dense"), None)
    grouped = next((r for r in results if r["implementation"] == "grouped_mm"), None)
    print(f"command: python {' '.join(sys.argv)}")
    on_gpu = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"H={args.hidden} I={args.intermediate} E={args.experts} k={args.top_k} tokens={args.tokens} {args.dtype} "
          f"on {device_name}, torch {torch.__version__}")
    print("| implementation | fwd tokens/s | fwd+bwd tokens/s | fwd+bwd vs dense | fwd+bwd vs grouped_mm "
          "| peak extra MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        speed = r["forward+backward tokens/s"]
        vs_dense = f"{speed / dense['forward+backward tokens/s']:.2f}x" if dense else "-"
        vs_grouped = f"{speed / grouped['forward+backward tokens/s']:.2f}x" if grouped else "-"
        print(f"| {r['implementation']} | {r['forward tokens/s']:,.0f} | {speed:,.0f} | {vs_dense} | {vs_grouped} | "
              f"{r['peak extra MiB']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
