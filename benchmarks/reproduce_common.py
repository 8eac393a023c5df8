"""Shared pieces of the small-scale paper reproductions (`reproduce_mhmoe.py`, `reproduce_sparsemixer.py`,
`reproduce_bitnet.py`).

Every run goes through the package's training loop, `modeling_grin.training.loop.train` (the loop `grin-moe train`
runs): AdamW (weight decay 0.01), warmup 20 steps then cosine decay, clip 1.0, batches drawn by (seed, step), on the
embedded corpus (Python standard-library sources); the held-out last `eval_fraction` of the blocks is scored with the
language-modelling loss alone (no router loss). The tokenizer is trained once per process and handed to every run.
"""

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling_grin.data import embedded_corpus, token_blocks, train_tokenizer  # noqa: E402
from modeling_grin.training.evaluation import _pyplot  # noqa: E402
from modeling_grin.training.loop import train  # noqa: E402

WARMUP_STEPS = 20
EVAL_FRACTION = 0.1


@dataclass(frozen=True)
class Corpus:
    tokenizer: object
    tokenizer_folder: Path  # the saved tokenizer every run loads
    train_blocks: int
    heldout_blocks: int

    @property
    def token_overrides(self) -> dict:
        """Config fields that must match the tokenizer."""
        return {
            "vocab_size": len(self.tokenizer),
            "pad_token_id": self.tokenizer.pad_token_id,
            "bos_token_id": self.tokenizer.bos_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }


@functools.cache
def _tokenizer(vocab_size: int) -> tuple[object, Path]:
    tokenizer = train_tokenizer(embedded_corpus(), vocab_size=vocab_size)
    folder = Path(tempfile.mkdtemp(prefix="reproduce-tokenizer-"))
    tokenizer.save_pretrained(folder)
    return tokenizer, folder


@functools.cache
def prepare_corpus(block_size: int, eval_fraction: float = EVAL_FRACTION, vocab_size: int = 2048) -> Corpus:
    """The tokenizer (trained once per vocabulary size) and how many blocks the loop will train on and hold out."""
    tokenizer, folder = _tokenizer(vocab_size)
    blocks = len(token_blocks(tokenizer, embedded_corpus(), block_size))
    heldout = max(1, int(blocks * eval_fraction))  # the loop's split
    return Corpus(tokenizer, folder, blocks - heldout, heldout)


def moe_layer_count(config) -> int:
    is_moe = getattr(config, "is_moe_layer", None)
    return sum(1 for layer in range(config.num_hidden_layers) if is_moe is None or is_moe(layer))


def parameter_counts(model) -> dict:
    """Total parameters and the parameters one token can use (all but the experts it is not routed to)."""
    config = model.config
    total = sum(parameter.numel() for parameter in model.parameters())
    experts = [module for name, module in model.named_modules() if name.endswith(".experts")]
    inactive = 0
    for experts_module in experts:
        per_expert = sum(parameter.numel() for parameter in experts_module.parameters()) // experts_module.num_experts
        reachable = min(experts_module.num_experts, getattr(config, "moe_heads", 1) * config.num_experts_per_tok)
        inactive += (experts_module.num_experts - reachable) * per_expert
    return {"total_parameters": total, "active_parameters": total - inactive}


def train_and_evaluate(
    config,
    steps: int,
    batch_size: int,
    block_size: int,
    lr: float,
    seed: int,
    eval_fraction: float = EVAL_FRACTION,
    desc: str = "training",
    progress: bool = True,
) -> dict:
    """Train a causal LM built from `config` for `steps` steps with `train` and evaluate it on the held-out blocks.

    Returns heldout_loss (LM loss only, eval-mode routing), heldout_ppl, seconds (the whole `train` call: training,
    evaluation, saving), loss_curve (the optimised loss per step: LM loss plus the router losses), and the parameter
    counts. The seed fixes the initial weights, the batch order and the routing noise.
    """
    corpus = prepare_corpus(block_size, eval_fraction)
    with tempfile.TemporaryDirectory(prefix="reproduce-run-") as output_dir:
        result = train(
            output_dir, config=config, tokenizer=corpus.tokenizer_folder, steps=steps, batch_size=batch_size,
            block_size=block_size, learning_rate=lr, warmup_steps=WARMUP_STEPS, weight_decay=0.01, max_grad_norm=1.0,
            seed=seed, eval_fraction=eval_fraction, progress=progress,
        )
        curve = json.loads((Path(output_dir) / "train_summary.json").read_text())["losses"]
    summary = result.summary
    return {
        "seed": seed,
        "heldout_loss": summary["heldout_loss"],
        "heldout_ppl": math.exp(summary["heldout_loss"]),
        "seconds": summary["seconds"],
        "final_train_loss": curve[-1],
        "loss_curve": curve,
        **parameter_counts(result.accelerator.unwrap_model(result.model)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Running several variants over several seeds, summarising, printing, plotting.


def run_variants(
    configs: dict,
    seeds: list[int],
    steps: int,
    batch_size: int,
    block_size: int,
    lr: float,
    progress: bool = True,
    eval_fraction: float = EVAL_FRACTION,
) -> dict[str, list[dict]]:
    """Every variant for every seed (seed-major, so an interrupted run still covers every variant)."""
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    jobs = [(seed, name) for seed in seeds for name in configs]
    for seed, name in tqdm(jobs, desc="runs", unit="run", disable=not progress):
        result = train_and_evaluate(
            configs[name], steps, batch_size, block_size, lr, seed, eval_fraction, desc=f"{name} seed {seed}",
            progress=progress,
        )
        runs[name].append(result)
        if progress:
            tqdm.write(
                f"{name} seed {seed}: held-out loss {result['heldout_loss']:.4f} "
                f"(ppl {result['heldout_ppl']:.2f}), {result['seconds']:.0f} s"
            )
    return runs


def record_parameter_counts(description: dict[str, dict], runs: dict[str, list[dict]]) -> None:
    """Copy each variant's active/total parameter counts (the same for every seed) into its description."""
    for name, variant_runs in runs.items():
        for key in ("total_parameters", "active_parameters"):
            description[name][key] = variant_runs[0][key]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict[str, list[dict]], reference: str) -> list[dict]:
    """Per variant: mean ± std over seeds of held-out loss and perplexity, and the per-seed difference of the held-out
    loss to `reference` (paired by seed: same batches, same routing-noise stream)."""
    reference_loss = {run["seed"]: run["heldout_loss"] for run in runs[reference]}
    rows = []
    for name, variant_runs in runs.items():
        loss = mean_std([run["heldout_loss"] for run in variant_runs])
        ppl = mean_std([run["heldout_ppl"] for run in variant_runs])
        delta = mean_std([run["heldout_loss"] - reference_loss[run["seed"]] for run in variant_runs])
        rows.append({
            "variant": name,
            "seeds": len(variant_runs),
            "heldout_loss_mean": loss[0],
            "heldout_loss_std": loss[1],
            "heldout_ppl_mean": ppl[0],
            "heldout_ppl_std": ppl[1],
            "delta_loss_vs_reference_mean": delta[0],
            "delta_loss_vs_reference_std": delta[1],
            "seconds_mean": statistics.fmean(run["seconds"] for run in variant_runs),
        })
    return rows


def format_table(rows: list[dict], reference: str) -> str:
    lines = [
        f"| variant | seeds | held-out loss | held-out perplexity | Δ loss vs {reference} (paired) | s / run |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['seeds']} | {row['heldout_loss_mean']:.4f} ± {row['heldout_loss_std']:.4f} | "
            f"{row['heldout_ppl_mean']:.2f} ± {row['heldout_ppl_std']:.2f} | "
            f"{row['delta_loss_vs_reference_mean']:+.4f} ± {row['delta_loss_vs_reference_std']:.4f} | "
            f"{row['seconds_mean']:.0f} |"
        )
    return "\n".join(lines)


def _smooth(values: list[float], weight: float) -> list[float]:
    smoothed, last = [], values[0]
    for value in values:
        last = weight * last + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def save_plot(runs: dict[str, list[dict]], rows: list[dict], path: str | Path, title: str) -> Path:
    """Left: the optimised training loss (smoothed, mean over seeds, band = min..max seed); right: held-out
    perplexity per variant, mean ± std over seeds with every seed as a dot."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, variant_runs) in enumerate(runs.items()):
        color = colors[index % len(colors)]
        smoothed = torch.tensor([_smooth(run["loss_curve"], 0.9) for run in variant_runs])
        steps = range(1, smoothed.shape[1] + 1)
        curves.plot(steps, smoothed.mean(0), color=color, label=name, linewidth=1.2)
        if len(variant_runs) > 1:
            curves.fill_between(steps, smoothed.min(0).values, smoothed.max(0).values, color=color, alpha=0.15)
    last = min(len(run["loss_curve"]) for variant_runs in runs.values() for run in variant_runs)
    tail = [v for variant_runs in runs.values() for run in variant_runs for v in run["loss_curve"][last // 3:]]
    if len(tail) > 1:
        curves.set_ylim(min(tail) - 0.1, max(tail) + 0.1)
    curves.set(xlabel="step", ylabel="training loss, LM + router (EMA 0.9)", title=title)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    for index, row in enumerate(rows):
        color = colors[index % len(colors)]
        bars.errorbar(index, row["heldout_ppl_mean"], yerr=row["heldout_ppl_std"], fmt="o", color=color, capsize=5,
                      markersize=7)
        seeds = [run["heldout_ppl"] for run in runs[row["variant"]]]
        bars.scatter([index + 0.15] * len(seeds), seeds, color=color, s=10, alpha=0.6)
    bars.set_xticks(range(len(rows)))
    bars.set_xticklabels([row["variant"] for row in rows], rotation=20, fontsize=8)
    bars.set(ylabel="held-out perplexity")
    bars.set_title("held-out perplexity: mean ± std, dots = seeds", fontsize=10)
    bars.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def add_common_arguments(parser: argparse.ArgumentParser, steps: int, plot: str) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-fraction", type=float, default=EVAL_FRACTION,
                        help="fraction of the blocks held out for evaluation (the last ones)")
    parser.add_argument("--plot", default=plot, help="where to write the PNG")
    parser.add_argument("--json", default=None, help="also write every run and the summary to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def budget(args, wall_seconds: float) -> dict:
    tokens = args.steps * args.batch_size * args.block_size
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "lr": args.lr,
        "eval_fraction": args.eval_fraction,
        "heldout_blocks": prepare_corpus(args.block_size, args.eval_fraction).heldout_blocks,
        "seeds": list(args.seeds),
        "tokens_per_run": tokens,
        "wall_seconds": wall_seconds,
        "torch_threads": torch.get_num_threads(),
    }


def finish(
    args, argv: list[str] | None, title: str, description: dict, runs: dict, reference: str, started: float
) -> dict:
    """Summary table and plot; returns what the JSON will hold (see `write_json`)."""
    rows = summarize(runs, reference)
    table = format_table(rows, reference)
    plot = save_plot(runs, rows, args.plot, title)
    result = {
        "command": " ".join(["python", args.script, *(sys.argv[1:] if argv is None else argv)]),
        "budget": budget(args, time.perf_counter() - started),
        **description,
        "summary": rows,
        "table": table,
        "plot": str(plot),
        "runs": runs,
    }
    corpus = prepare_corpus(args.block_size, args.eval_fraction)
    print(f"\n{title}: {args.steps} steps × {args.batch_size} × {args.block_size} tokens "
          f"({result['budget']['tokens_per_run']:,} tokens per run; {corpus.train_blocks} training blocks, "
          f"{corpus.heldout_blocks} held-out blocks), seeds {list(args.seeds)}, "
          f"wall {result['budget']['wall_seconds']:.0f} s\n")
    print(table)
    print(f"\nplot: {plot}")
    return result


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
        print(f"json: {path}")
