"""Experts of one MoE layer: forward and forward+backward speed and peak memory of every experts implementation.

Compares this package's `fused` with transformers' `eager`, `grouped_mm` and `batched_mm` (when its per-token weight
copies fit in memory) and with `dense`: plain GEMMs doing the same FLOPs (a SwiGLU MLP over the tokens x top_k routed
rows). All run in one invocation, each in its own subprocess so peak memory is its own; ratios are to be read within
one run. Routing is uniform random top-k (distinct experts per token), fixed by the seed; the router is not timed.
The forward+backward step is `experts(x).float().pow(2).mean().backward()` after setting the parameters' gradients
to None (what `optimizer.zero_grad()` does), so each step stores fresh weight gradients.

    grin-moe bench                                     # CPU shape: H=512, I=800, E=16, k=2, 2048 tokens, fp32
    grin-moe bench --device cuda --dtype bfloat16 --shape grin   # GRIN: H=4096, I=6400, E=16, k=2, 8192 tokens

Library use (what the `grin-moe bench` subcommand calls):
    parser = build_parser()            # or add_arguments(subparser)
    args = parser.parse_args([...])
    rows = run(args)                   # list of dicts, one per implementation
    print_table(rows, args); write_json(rows, args, path)
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

IMPLEMENTATIONS = ("fused", "grouped_mm", "batched_mm", "eager", "dense")
# hidden, intermediate, experts, top_k, tokens
SHAPES = {
    "cpu": {"hidden": 512, "intermediate": 800, "experts": 16, "top_k": 2, "tokens": 2048},
    "grin": {"hidden": 4096, "intermediate": 6400, "experts": 16, "top_k": 2, "tokens": 8192},
    "tiny": {"hidden": 32, "intermediate": 48, "experts": 4, "top_k": 2, "tokens": 16},
}
SIZE_FIELDS = ("hidden", "intermediate", "experts", "top_k", "tokens")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to `parser` (a subcommand's parser, for instance) and return it."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu", help="size preset (default: cpu)")
    parser.add_argument("--hidden", type=int, help="override the preset's hidden size H")
    parser.add_argument("--intermediate", type=int, help="override the preset's expert size I")
    parser.add_argument("--experts", type=int, help="override the preset's number of experts E")
    parser.add_argument("--top-k", type=int, help="override the preset's experts per token k")
    parser.add_argument("--tokens", type=int, help="override the preset's number of tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-budget-gib", type=float, default=8.0, help="skip batched_mm above this estimate")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument(
        "--in-process", action="store_true", help="measure all in this process (faster start; peak memory shared)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows and settings here")
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)  # one measurement, JSON to stdout
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))


def resolve_shape(args) -> dict:
    """The sizes in effect: the `--shape` preset with any explicit size flag on top."""
    sizes = dict(SHAPES[getattr(args, "shape", None) or "cpu"])
    for field in SIZE_FIELDS:
        if getattr(args, field, None) is not None:
            sizes[field] = getattr(args, field)
    return sizes


def _build(args, sizes: dict, implementation: str):
    from . import GrinMoeConfig  # here, so that `--help` stays fast
    from .modeling_grin_moe import GrinMoeExperts

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    hidden, intermediate, experts, top_k, tokens = (sizes[field] for field in SIZE_FIELDS)
    inputs = torch.randn(tokens, hidden, generator=generator).to(device, dtype)
    if implementation == "dense":
        up = torch.nn.Linear(hidden, 2 * intermediate, bias=False).to(device, dtype)
        down = torch.nn.Linear(intermediate, hidden, bias=False).to(device, dtype)
        rows = torch.randn(tokens * top_k, hidden, generator=generator).to(device, dtype)

        def dense_step(x):
            gate, value = up(x).chunk(2, dim=-1)
            return down(torch.nn.functional.silu(gate) * value)

        dense_step.parameters = lambda: [*up.parameters(), *down.parameters()]
        return dense_step, rows
    config = GrinMoeConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        num_attention_heads=1,
        num_key_value_heads=1,
        experts_implementation=implementation,
    )
    module = GrinMoeExperts(config).to(device, dtype)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.02)
    scores = torch.rand(tokens, experts, generator=generator)
    index = scores.topk(top_k, dim=-1).indices.to(device)
    weights = torch.rand(tokens, top_k, generator=generator).to(device)

    if implementation == "grouped_mm":
        # transformers' own (the peer): our models' `grouped_mm` runs our CPU path, the one `fused` runs there
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        transformers_grouped_mm = ALL_EXPERTS_FUNCTIONS["grouped_mm"]

        def step(x):
            return transformers_grouped_mm(module, x, index, weights)
    else:

        def step(x):
            return module(x, index, weights)

    step.parameters = module.parameters
    return step, inputs


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def saved_for_backward_bytes(step, inputs: torch.Tensor) -> int:
    """Bytes of the tensors one forward keeps for its backward, beyond the input and the parameters (which exist
    anyway): the activation memory a layer adds per step, exact and independent of the allocator."""
    known = {inputs.data_ptr(), *(parameter.data_ptr() for parameter in step.parameters())}
    storages = {}

    def pack(tensor):
        if tensor.data_ptr() not in known:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(inputs.detach().requires_grad_(True))
    return sum(storages.values())


def measure(args, implementation: str) -> dict:
    """Time one implementation in this process: median (and min) of `--repeats` runs after one warm-up."""
    sizes = resolve_shape(args)
    on_gpu = args.device.startswith("cuda")
    torch.manual_seed(args.seed)
    step, inputs = _build(args, sizes, implementation)
    _synchronize(args.device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    baseline_memory = torch.cuda.memory_allocated() if on_gpu else None
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def forward():
        with torch.no_grad():
            step(inputs)

    parameters = [p for p in getattr(step, "parameters", list)() if p.requires_grad]

    def training():
        for parameter in parameters:  # optimizer.zero_grad() (set_to_none): gradients are stored, not accumulated
            parameter.grad = None
        x = inputs.detach().requires_grad_(True)
        step(x).float().pow(2).mean().backward()

    row = {"implementation": implementation}
    for name, function in (("forward", forward), ("forward+backward", training)):
        function()  # warm-up
        times = []
        for _ in range(args.repeats):
            _synchronize(args.device)
            started = time.perf_counter()
            function()
            _synchronize(args.device)
            times.append(time.perf_counter() - started)
        row[f"{name} ms"] = statistics.median(times) * 1e3
        row[f"{name} ms min"] = min(times) * 1e3
        row[f"{name} tokens/s"] = sizes["tokens"] / statistics.median(times)
    if on_gpu:
        row["peak extra MiB"] = (torch.cuda.max_memory_allocated() - baseline_memory) / 2**20
    else:  # growth of the process's high-water mark after the model and inputs were built
        row["peak extra MiB"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    row["saved for backward MiB"] = saved_for_backward_bytes(step, inputs) / 2**20
    return row


def batched_mm_bytes(args) -> int:
    """batched_mm copies every routed row's expert weights: rows x 3 x H x I elements, once, plus their gradient."""
    sizes = resolve_shape(args)
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    return 2 * sizes["tokens"] * sizes["top_k"] * 3 * sizes["hidden"] * sizes["intermediate"] * element


def _subprocess_argv(args, implementation: str) -> list[str]:
    argv = [sys.executable, "-m", "modeling_grin.bench", "--shape", args.shape or "cpu", "--only", implementation]
    for field in SIZE_FIELDS:
        if getattr(args, field, None) is not None:
            argv += [f"--{field.replace('_', '-')}", str(getattr(args, field))]
    argv += ["--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats), "--seed", str(args.seed)]
    return argv


def run(args) -> list[dict]:
    """Measure every selected implementation (each in its own subprocess unless `--in-process`) -> one row each.

    Rows carry the medians, mins and tokens/s of forward and forward+backward, the peak memory growth, the bytes
    saved for the backward (`saved_for_backward_bytes`), and the
    forward+backward speed relative to `dense` and `grouped_mm` when those were measured.
    """
    rows = []
    for implementation in args.implementations:
        if implementation == "batched_mm" and batched_mm_bytes(args) > args.memory_budget_gib * 2**30:
            print(f"  batched_mm skipped: needs about {batched_mm_bytes(args) / 2**30:.0f} GiB", file=sys.stderr)
            continue
        if args.in_process:
            rows.append(measure(args, implementation))
        else:
            package_root = str(Path(__file__).resolve().parent.parent)
            completed = subprocess.run(
                _subprocess_argv(args, implementation), capture_output=True, text=True, cwd=package_root
            )
            if completed.returncode != 0:
                print(f"  {implementation} failed:\n{completed.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(f"  {implementation}: done", file=sys.stderr)
    for reference in ("dense", "grouped_mm"):
        baseline = next((row for row in rows if row["implementation"] == reference), None)
        for row in rows:
            for phase in ("forward", "forward+backward"):
                ratio = row[f"{phase} tokens/s"] / baseline[f"{phase} tokens/s"] if baseline else None
                row[f"{phase} vs {reference}"] = ratio
    return rows


def describe(args) -> str:
    sizes = resolve_shape(args)
    on_gpu = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    return (
        f"H={sizes['hidden']} I={sizes['intermediate']} E={sizes['experts']} k={sizes['top_k']} "
        f"tokens={sizes['tokens']} {args.dtype} on {device_name}, torch {torch.__version__}, "
        f"median of {args.repeats}"
    )


def print_table(rows: list[dict], args, file=None) -> None:
    """A Markdown table of the rows (the format of docs/benchmarks.md)."""

    def ratio(value):
        return "-" if value is None else f"{value:.2f}x"

    print(describe(args), file=file)
    print(
        "| implementation | fwd tokens/s | fwd+bwd tokens/s | fwd vs dense | fwd+bwd vs dense | fwd+bwd vs grouped_mm "
        "| fwd+bwd ms (min) | peak extra MiB | saved for backward MiB |",
        file=file,
    )
    print("|---|---|---|---|---|---|---|---|---|", file=file)
    for row in rows:
        print(
            f"| {row['implementation']} | {row['forward tokens/s']:,.0f} | {row['forward+backward tokens/s']:,.0f} "
            f"| {ratio(row['forward vs dense'])} | {ratio(row['forward+backward vs dense'])} "
            f"| {ratio(row['forward+backward vs grouped_mm'])} "
            f"| {row['forward+backward ms']:,.1f} ({row['forward+backward ms min']:,.1f}) "
            f"| {row['peak extra MiB']:,.0f} | {row['saved for backward MiB']:,.1f} |",
            file=file,
        )


def write_json(rows: list[dict], args, path: Path) -> None:
    settings = {  # the command line's options (a subcommand's handler function is not one)
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items()
        if not callable(value)
    }
    payload = {
        "settings": settings,
        "sizes": resolve_shape(args),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device},
        "rows": rows,
    }
    Path(path).write_text(json.dumps(payload, indent=1))


def main(argv=None) -> list[dict] | None:
    args = build_parser().parse_args(argv)
    if args.only:  # child process: one measurement, one JSON line
        print(json.dumps(measure(args, args.only)))
        return None
    return report(args)


def report(args) -> list[dict]:
    """Run every measurement, print the table and write `--json` if given; returns the rows."""
    rows = run(args)
    print_table(rows, args)
    if args.json:
        write_json(rows, args, args.json)
    return rows


if __name__ == "__main__":
    main()
