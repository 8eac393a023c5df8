"""The `grin-moe` command."""

import argparse
import math
import sys
from pathlib import Path

# Errors a user can fix: bad input (ConversionError and the configs' validation errors are ValueErrors) or a file that
# is missing, exists already or cannot be written (OSErrors). `main` reports them in one line on stderr with exit
# status 2, no traceback (`grin-moe --debug ...` shows it). Any other exception is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(
        output_dir=args.output_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        arch=args.arch,
        preset=args.preset,
        seed=args.seed,
    )
    print(f"parameters:          {summary['parameters']:,}")
    print(f"training loss:       {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}")
    print(f"held-out loss / ppl: {summary['heldout_loss']:.3f} / {summary['heldout_perplexity']:.1f}")
    print(f"max expert load:     {summary['max_expert_load_over_uniform']:.2f}x uniform (expert_load.png)")
    print(f"saved to:            {summary['output_dir']} (reloaded with AutoModelForCausalLM)")
    print(f"sample:\n{summary['sample']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.loop import train

    result = train(
        output_dir=args.output_dir, preset=args.preset, config=args.config, model=args.model, data=args.data,
        text_field=args.text_field, tokenizer=args.tokenizer, vocab_size=args.vocab_size, steps=args.steps,
        batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        block_size=args.block_size, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed, save_steps=args.save_steps,
        resume=args.resume, experts_implementation=args.experts_implementation,
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
    )
    if result.accelerator.is_main_process:
        summary = result.summary
        print(f"trained:             {summary['family']}, {summary['processes']} process(es) "
              f"({summary['distributed_type']}), {summary['tokens_seen']:,} tokens")
        if summary["first_loss"] is not None:
            print(f"training loss:       {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}")
        print(f"held-out loss / ppl: {summary['heldout_loss']:.3f} / {summary['heldout_perplexity']:.1f}")
        print(f"saved to:            {summary['output_dir']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.whole_model:
        from .model_bench import report
    else:
        from .bench import report

    report(args)
    return 0


def _metric(item: str) -> tuple[str, float]:
    metric, _, text = item.partition("=")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--metric takes NAME=NUMBER, got {item!r}") from None
    if not metric or not math.isfinite(value):
        raise ValueError(f"--metric takes NAME=NUMBER with a finite number, got {item!r}")
    return metric, value


def _card(args: argparse.Namespace) -> int:
    from .hub import write_model_card

    results = dict(_metric(item) for item in args.metric)
    readme = Path(args.folder) / "README.md"
    if (readme.exists() or readme.is_symlink()) and not args.force:
        raise FileExistsError(f"{readme} exists; pass --force to replace it")
    path = write_model_card(
        args.folder, license=args.license, base_model=args.base_model, eval_results=results or None,
        eval_dataset=args.eval_dataset,
    )
    print(f"wrote {path}")
    return 0


def _print_written(destination: str, summary: dict) -> None:
    verified = ""
    if summary["verified"]:
        verified = ", verified (tensors"
        if summary["logits_difference"] is not None:
            verified += f"; logits within {summary['logits_difference']:.1e} of the source"
        verified += ")"
    print(f"wrote {destination}: {summary['tensors']} tensors, {summary['bytes'] / 2**20:,.1f} MiB in "
          f"{summary['shards']} shard(s){verified}")


def _convert(args: argparse.Namespace) -> int:
    from .conversion import convert_checkpoint

    summary = convert_checkpoint(
        args.source, args.destination, to=args.to, dtype=args.dtype, max_shard_size=args.max_shard_size,
        force=args.force, verify=args.verify,
    )
    _print_written(args.destination, summary)
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from .conversion import upcycle_checkpoint

    summary = upcycle_checkpoint(
        args.source, args.destination, num_experts=args.num_experts, top_k=args.top_k, router_type=args.router_type,
        noise_std=args.noise_std, router_init_std=args.router_init_std, seed=args.seed, dtype=args.dtype,
        max_shard_size=args.max_shard_size, force=args.force, verify=args.verify,
    )
    _print_written(args.destination, summary)
    return 0


def _export_ternary(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from .bitnet_export import export_ternary

    model = AutoModelForCausalLM.from_pretrained(args.model)
    summary = export_ternary(model, args.destination)
    print(f"wrote {args.destination}: {summary['file_bytes'] / 2**20:,.2f} MiB, {summary['ternary_values']:,} "
          f"ternary weights in 2 bits, {summary['full_precision_values']:,} values in full precision")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _finite_non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _add_output_options(command: argparse.ArgumentParser) -> None:
    """The options every checkpoint-writing command shares."""
    command.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast floating tensors")
    command.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: %(default)s)")
    command.add_argument("--force", action="store_true",
                         help="replace the destination if it is a previous output of grin-moe convert or upcycle")
    command.add_argument(
        "--verify", action="store_true",
        help="re-read the output (presence, shape, checksum) and compare logits with the source when it is small",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grin-moe", description="GRIN-MoE and MH-MoE for Hugging Face transformers.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small GRIN-MoE or MH-MoE on the embedded corpus, save, reload and generate",
        description="Train a small GRIN-MoE (or MH-MoE) on Python's own standard-library sources (no download), "
        "evaluate held-out perplexity, save a Hub-ready folder (weights, tokenizer, model card, loss curve, "
        "expert-load heatmap), reload it through AutoModelForCausalLM and print a generated sample.",
    )
    demo.add_argument("--output-dir", default="grin-moe-demo", help="folder to write (default: %(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per step (default: %(default)s)")
    demo.add_argument(
        "--block-size", type=_positive_int, default=128, help="tokens per sequence (default: %(default)s)"
    )
    demo.add_argument("--arch", choices=["grin", "mh-moe"], default="grin", help="model family (default: %(default)s)")
    demo.add_argument("--preset", help="model preset (default: grin-moe-tiny or mh-moe-tiny, by --arch)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(handler=_demo)

    train = commands.add_parser(
        "train",
        help="train or fine-tune either family on text files, JSONL or the embedded corpus (accelerate-launchable)",
        description="Train a GRIN-MoE or MH-MoE from a preset, a config or a saved model on text files, JSON Lines "
        "or the embedded corpus, with resumable checkpoints. Runs in one process, or under `accelerate launch` with "
        "a config from configuration/accelerate/ (DDP, FSDP2, DeepSpeed ZeRO-2/3). Writes OUTPUT_DIR/model (a "
        "Hub-ready folder with model card and plots) and OUTPUT_DIR/train_summary.json.",
    )
    train.add_argument("--output-dir", required=True, help="folder for checkpoints and the final model")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--preset", default="grin-moe-tiny", help="model preset to train from scratch "
                        "(default: %(default)s; see configuration/)")
    source.add_argument("--config", help="a config.json (or a folder holding one) to train from scratch")
    source.add_argument("--model", help="a saved model folder to fine-tune")
    train.add_argument("--data", nargs="+", metavar="PATH",
                       help="text files, .jsonl files or folders of them (default: the embedded corpus)")
    train.add_argument("--text-field", default="text", help="JSONL field holding the text (default: %(default)s)")
    train.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else one trained on the data)")
    train.add_argument("--vocab-size", type=_positive_int, default=2048, help="size of a trained tokenizer")
    train.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default: %(default)s)")
    train.add_argument("--batch-size", type=_positive_int, default=8,
                       help="sequences per process per micro-step (default: %(default)s)")
    train.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1)
    train.add_argument("--block-size", type=_positive_int, default=128, help="tokens per sequence")
    train.add_argument("--learning-rate", type=float, default=3e-3)
    train.add_argument("--warmup-steps", type=int, default=20)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 to disable")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--save-steps", type=int, default=0, help="write a resumable checkpoint every N steps")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest undamaged checkpoint in --output-dir; refused when it belongs to "
                       "another run (other config, tokenizer or data) or has reached --steps already")
    train.add_argument("--experts-implementation", choices=["eager", "grouped_mm", "batched_mm", "fused"])
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                       help="default: the accelerate config's, else no")
    train.set_defaults(handler=_train)

    bench_command = commands.add_parser(
        "bench",
        help="time one MoE layer's experts (fused vs transformers' eager/grouped_mm/batched_mm vs dense GEMMs), or "
        "whole models with --whole-model",
        description="Forward and forward+backward tokens/s and peak memory of every experts implementation at one "
        "layer shape, each in its own subprocess, in one run (read the ratios, not absolute times). --shape cpu is "
        "H=512, I=800, E=16, k=2, 2048 tokens; --shape grin is GRIN-MoE's layer (use with --device cuda).",
    )
    from .bench import add_arguments as add_bench_arguments  # light: argparse and torch only
    from .model_bench import add_arguments as add_model_bench_arguments

    add_bench_arguments(bench_command)
    bench_command.add_argument(
        "--whole-model", action="store_true",
        help="time whole models instead (modeling_grin.model_bench): training step, prefill and greedy decoding of "
        "GrinMoe/MhMoe under each experts implementation vs transformers' Phimoe and a dense decoder, interleaved "
        "round by round; options --model-shape, --workloads, --experts-implementations, --rounds, --batch, --length, "
        "--threads")
    add_model_bench_arguments(bench_command)
    bench_command.set_defaults(handler=_bench)

    card = commands.add_parser(
        "card",
        help="write a Hub model card (README.md) for a saved model folder",
        description="Write README.md for a saved GRIN-MoE or MH-MoE folder: Hub metadata, an architecture table "
        "computed from its config (total and active parameters), routing details, usage, and results.",
    )
    card.add_argument("folder", help="a folder written by save_pretrained")
    card.add_argument("--license", default="mit", help="license identifier for the metadata (default: %(default)s)")
    card.add_argument("--base-model", help="Hub id of the model this one was trained from")
    card.add_argument("--metric", action="append", default=[], metavar="NAME=VALUE", help="an evaluation result")
    card.add_argument("--eval-dataset", default="held-out text", help="what the metrics were measured on")
    card.add_argument("--force", action="store_true", help="replace an existing README.md")
    card.set_defaults(handler=_card)

    convert = commands.add_parser(
        "convert",
        help="convert a GRIN-MoE / Phi-3.5-MoE / Phimoe checkpoint folder to grinmoe or phimoe format",
        description="Stream a safetensors checkpoint shard by shard into a new folder for this package (grinmoe) or "
        "for transformers' PhimoeForCausalLM (phimoe). Every tensor the config implies is checked before anything "
        "is written; the output is written to a temporary folder and swapped in at the end, so an error or a kill "
        "leaves no partial output, and --force replaces only a previous output of grin-moe convert or upcycle.",
    )
    convert.add_argument("source", help="checkpoint folder (config.json + safetensors)")
    convert.add_argument("destination", help="folder to create")
    convert.add_argument("--to", required=True, choices=["grinmoe", "phimoe"], help="target format")
    _add_output_options(convert)
    convert.set_defaults(handler=_convert)

    upcycle = commands.add_parser(
        "upcycle",
        help="turn a dense Llama/Mistral/Phi-3 checkpoint into a GRIN-MoE whose experts start as its MLP",
        description="Sparse upcycling: copy each layer's MLP into every expert (optionally with noise), draw the "
        "router, keep everything else. With softmax_topk routing and no noise the result computes the dense model.",
    )
    upcycle.add_argument("source", help="dense checkpoint folder (config.json + safetensors)")
    upcycle.add_argument("destination", help="folder to create")
    upcycle.add_argument("--num-experts", type=_positive_int, required=True)
    upcycle.add_argument("--top-k", type=_positive_int, required=True)
    upcycle.add_argument("--router-type", choices=["softmax_topk", "sparsemixer_v2"], default="softmax_topk",
                         help="routing of the new model (default: %(default)s, which preserves the dense function)")
    upcycle.add_argument("--noise-std", type=_finite_non_negative, default=0.0,
                         help="expert noise, relative to each matrix's std (default: %(default)s)")
    upcycle.add_argument("--router-init-std", type=_finite_non_negative, default=0.02,
                         help="standard deviation of the new router's weights (default: %(default)s)")
    upcycle.add_argument("--seed", type=int, default=0)
    _add_output_options(upcycle)
    upcycle.set_defaults(handler=_upcycle)

    export = commands.add_parser(
        "export-ternary",
        help="write the 2-bit packed ternary form of a model trained with bitnet=True",
        description="Pack every ternary weight of a saved BitNet b1.58 model (attention, dense FFNs, experts) into 2 "
        "bits with its scale, the rest as it is: model.ternary.safetensors and config.json, loaded by "
        "modeling_grin.bitnet_export.load_ternary with the same logits. The destination must not exist or be empty.",
    )
    export.add_argument("model", help="a folder written by save_pretrained, with bitnet: true in its config")
    export.add_argument("destination", help="folder to create")
    export.set_defaults(handler=_export_ternary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the exception holds
        print(f"grin-moe {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
