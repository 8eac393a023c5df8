"""Whole-model speed: training step, prefill and greedy decoding of our models against transformers' Phimoe and a dense
decoder, every contestant timed once per round, rounds interleaved in one process (the machines are shared and
noisy: read the medians of per-round ratios, not absolute times).

Contestants at a GRIN shape: `GrinMoeForCausalLM` under each experts implementation, transformers'
`PhimoeForCausalLM` (the same architecture, the same weights) with eager and grouped_mm experts, and `dense`: the
same decoder with a dense SwiGLU FFN of the activated size (top_k x expert size) in place of every MoE block. At an
MH-MoE shape: `MhMoeForCausalLM` under each experts implementation and the same model with every MoE layer replaced
by its FLOPs-parity dense FFN (`moe_layer_frequency=0`).

Workloads: `train` (forward + backward + AdamW on batch x length tokens, training-mode routing), `prefill` (one
no-grad forward of batch x length tokens filling a cache), `decode1` / `decode8` (greedy `generate`, batch 1 / 8,
a 32-token prompt, 48 new tokens, always 48), and on request `decode1_compiled` (`decode1` with a static cache and
the decoding step compiled by inductor, fullgraph=True).

    grin-moe bench --whole-model                               # shape "small", every workload, 5 rounds
    grin-moe bench --whole-model --model-shape h512 --workloads train decode1
    grin-moe bench --whole-model --workloads decode1 decode1_compiled --experts-implementations grouped_mm
    python benchmarks/model_speed.py --model-shape mhmoe --rounds 7
"""

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager", "fused")
WORKLOADS = ("train", "prefill", "decode1", "decode8", "decode1_compiled")
DEFAULT_WORKLOADS = WORKLOADS[:4]  # decode1_compiled: opt-in, inductor compiles every contestant in the warm-up
# family, decoder sizes and the MoE layer; "mhmoe" is the paper's h=3 preset scaled down 4x (sub-tokens of 64)
MODEL_SHAPES = {
    "small": dict(family="grin", hidden_size=256, intermediate_size=400, num_local_experts=16,
                  num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "h512": dict(family="grin", hidden_size=512, intermediate_size=800, num_local_experts=16,
                 num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8),
    "mhmoe": dict(family="mh_moe", preset="mh-moe-paper-h3", hidden_size=192, intermediate_size=128,
                  num_local_experts=24, num_experts_per_tok=3, dense_intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=3, num_key_value_heads=3),
    "tiny": dict(family="grin", hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
}
VOCAB_SIZE = 4096
PROMPT_LENGTH, NEW_TOKENS = 32, 48


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the whole-model options to `parser`; `--seed` and `--json` are shared with a parser that has them already
    (`grin-moe bench`, where they mean the same)."""

    def add(name, **options):
        if name not in parser._option_string_actions:
            parser.add_argument(name, **options)

    add("--model-shape", choices=sorted(MODEL_SHAPES), default="small",
        help="whole-model preset (default: small = 4 layers, H=256, I=400, E=16, k=2)")
    add("--workloads", nargs="+", choices=WORKLOADS, default=list(DEFAULT_WORKLOADS),
        help="default: all but decode1_compiled (greedy batch-1 decoding with a static cache and the decoding step "
        "compiled by inductor with fullgraph=True; its compilation happens in the warm-up round)")
    add("--experts-implementations", nargs="+", choices=EXPERTS_IMPLEMENTATIONS,
        default=list(EXPERTS_IMPLEMENTATIONS), help="our models' experts implementations to time")
    add("--rounds", type=int, default=5, help="timed rounds after one warm-up round (default: 5)")
    add("--batch", type=int, default=8, help="train/prefill batch (default: 8)")
    add("--length", type=int, default=256, help="train/prefill sequence length (default: 256)")
    add("--threads", type=int, help="torch threads (default: torch's)")
    add("--seed", type=int, default=0)
    add("--json", type=Path, help="also write the per-round times and the summary here")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))


@dataclass
class Contestant:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    times: dict = field(default_factory=dict)  # workload -> seconds per round

    def runs(self, workload: str) -> bool:
        # eager experts (ours, the readable reference, and transformers') branch on the routing: no full graph
        return workload != "decode1_compiled" or not self.name.endswith("eager")


def _configs(shape: dict):
    from . import GrinMoeConfig
    from .presets import load_preset

    sizes = {key: value for key, value in shape.items() if key not in ("family", "preset")}
    if shape["family"] == "mh_moe":
        config = load_preset(shape["preset"], vocab_size=VOCAB_SIZE, **sizes)
        dense = load_preset(shape["preset"], vocab_size=VOCAB_SIZE, **{**sizes, "moe_layer_frequency": 0})
        return config, dense
    config = GrinMoeConfig(vocab_size=VOCAB_SIZE, pad_token_id=0, eos_token_id=2, **sizes)
    return config, None


def _dense_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The GRIN model with every MoE block replaced by a dense SwiGLU FFN of the activated size (top_k x I)."""
    from types import SimpleNamespace

    from .modeling_mh_moe import MhMoeMLP

    dense = copy.deepcopy(model)
    config = dense.config
    fields = SimpleNamespace(hidden_size=config.hidden_size, hidden_act=config.hidden_act, mlp_bias=False)
    for layer in dense.model.layers:
        layer.mlp = MhMoeMLP(fields, config.num_experts_per_tok * config.intermediate_size)
        with torch.no_grad():
            for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                linear.weight.normal_(0, config.initializer_range)
    return dense


def _phimoe_twin(model: torch.nn.Module, experts_implementation: str) -> torch.nn.Module:
    """transformers' PhimoeForCausalLM with the same config and weights."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from .conversion import translate_config

    settings = translate_config(model.config.to_dict(), "phimoe")
    config = PhimoeConfig.from_dict(settings)  # a new config object per twin
    config._experts_implementation = experts_implementation
    twin = PhimoeForCausalLM(config)
    twin.load_state_dict(model.state_dict())
    return twin


def build_contestants(args) -> list[Contestant]:
    from . import GrinMoeForCausalLM, MhMoeForCausalLM

    shape = MODEL_SHAPES[args.model_shape]
    config, dense_config = _configs(shape)
    model_class = MhMoeForCausalLM if shape["family"] == "mh_moe" else GrinMoeForCausalLM
    torch.manual_seed(args.seed)
    reference = model_class(config)
    contestants = []
    for implementation in args.experts_implementations:
        # a config of its own: the experts implementation is a config field, shared by every model built from it
        model = model_class(copy.deepcopy(config))
        model.load_state_dict(reference.state_dict())
        model.set_experts_implementation(implementation)
        contestants.append(Contestant(f"{model_class.__name__.removesuffix('ForCausalLM')} {implementation}", model))
    if shape["family"] == "grin":
        for implementation in ("eager", "grouped_mm"):
            contestants.append(Contestant(f"Phimoe {implementation}", _phimoe_twin(reference, implementation)))
        contestants.append(Contestant("dense", _dense_twin(reference)))
    else:
        torch.manual_seed(args.seed)
        contestants.append(Contestant("dense", model_class(dense_config)))
    for contestant in contestants:
        contestant.optimizer = torch.optim.AdamW(contestant.model.parameters(), lr=1e-4)
    return contestants


def _inputs(args, batch: int, length: int, round_index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed * 1000 + round_index)
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=generator)


def _run(contestant: Contestant, workload: str, input_ids: torch.Tensor) -> None:
    model = contestant.model
    if workload == "train":
        model.train()
        contestant.optimizer.zero_grad(set_to_none=True)
        model(input_ids, labels=input_ids).loss.backward()
        contestant.optimizer.step()
        return
    model.eval()
    with torch.no_grad():
        if workload == "prefill":
            model(input_ids, use_cache=True)
            return
        compiled = {}
        if workload == "decode1_compiled":
            from transformers import CompileConfig

            compile_config = CompileConfig(fullgraph=True, mode="default")
            compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
            compiled = dict(cache_implementation="static", compile_config=compile_config)
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None, **compiled)


def _workload_inputs(args, workload: str, round_index: int) -> torch.Tensor:
    if workload in ("train", "prefill"):
        return _inputs(args, args.batch, args.length, round_index)
    return _inputs(args, 8 if workload == "decode8" else 1, PROMPT_LENGTH, round_index)


def workload_tokens(args, workload: str) -> int:
    """Tokens one run of `workload` processes (generated tokens for decoding)."""
    if workload in ("train", "prefill"):
        return args.batch * args.length
    return (8 if workload == "decode8" else 1) * NEW_TOKENS


def run(args, progress=print) -> dict:
    """Time every contestant on every workload for `args.rounds` rounds (after a warm-up one); -> the summary."""
    if args.threads:
        torch.set_num_threads(args.threads)
    contestants = build_contestants(args)
    for round_index in range(args.rounds + 1):
        for workload in args.workloads:
            input_ids = _workload_inputs(args, workload, round_index)
            # rotate the order each round, so no contestant always runs right after the same one
            shift = round_index % len(contestants)
            for contestant in contestants[shift:] + contestants[:shift]:
                if not contestant.runs(workload):
                    continue
                torch.manual_seed(args.seed + round_index)  # the same training-mode routing samples for everyone
                start = time.perf_counter()
                _run(contestant, workload, input_ids)
                elapsed = time.perf_counter() - start
                if round_index > 0:
                    contestant.times.setdefault(workload, []).append(elapsed)
        progress(f"round {round_index}/{args.rounds} done" + (" (warm-up)" if round_index == 0 else ""))
    return summarize(args, contestants)


def _ratios(times: list[float], baseline: list[float]) -> float:
    """Median over rounds of baseline time / contestant time: > 1 means the contestant is faster."""
    return statistics.median(base / own for own, base in zip(times, baseline, strict=True))


def summarize(args, contestants: list[Contestant]) -> dict:
    rows = []
    by_name = {contestant.name: contestant for contestant in contestants}
    phimoe = [name for name in by_name if name.startswith("Phimoe")]
    for workload in args.workloads:
        # per round, the faster of transformers' Phimoe implementations
        timed = [contestant for contestant in contestants if contestant.runs(workload)]
        phimoe_times = [c.times[workload] for c in timed if c.name in phimoe]
        phimoe_best = [min(times) for times in zip(*phimoe_times, strict=True)] if phimoe_times else None
        for contestant in timed:
            times = contestant.times[workload]
            rows.append({
                "workload": workload,
                "contestant": contestant.name,
                "median_s": statistics.median(times),
                "tokens_per_s": workload_tokens(args, workload) / statistics.median(times),
                "vs_phimoe_best": _ratios(times, phimoe_best) if phimoe_best else None,
                "vs_dense": _ratios(times, by_name["dense"].times[workload]),
                "times_s": times,
            })
    return {"settings": describe(args), "rows": rows}


def describe(args) -> dict:
    return {
        "model_shape": args.model_shape, **MODEL_SHAPES[args.model_shape], "vocab_size": VOCAB_SIZE,
        "batch": args.batch, "length": args.length, "prompt": PROMPT_LENGTH, "new_tokens": NEW_TOKENS,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def print_table(summary: dict, file=None) -> None:
    settings = summary["settings"]
    print(f"whole model, shape {settings['model_shape']}: " + ", ".join(
        f"{key}={value}" for key, value in settings.items() if key not in ("model_shape", "family")), file=file)
    print("| workload | contestant | median s | tokens/s | vs Phimoe's best | vs dense |", file=file)
    print("|---|---|---|---|---|---|", file=file)
    for row in summary["rows"]:
        versus = "—" if row["vs_phimoe_best"] is None else f"{row['vs_phimoe_best']:.2f}×"
        print(f"| {row['workload']} | {row['contestant']} | {row['median_s']:.3f} | {row['tokens_per_s']:,.0f} | "
              f"{versus} | {row['vs_dense']:.2f}× |", file=file)


def report(args) -> dict:
    summary = run(args)
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> dict:
    return report(build_parser().parse_args(argv))
