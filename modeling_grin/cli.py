"""The `grin-moe` command."""

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(
        output_dir=args.output_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        preset=args.preset,
        seed=args.seed,
    )
    print(f"parameters:          {summary['parameters']:,}")
    print(f"training loss:       {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}")
    print(f"held-out loss / ppl: {summary['heldout_loss']:.3f} / {summary['heldout_perplexity']:.1f}")
    print(f"saved to:            {summary['output_dir']} (reloaded with AutoModelForCausalLM)")
    print(f"sample:\n{summary['sample']}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grin-moe", description="GRIN-MoE and MH-MoE for Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small GRIN-MoE on the embedded corpus, save, reload and generate",
        description="Train a small GRIN-MoE on Python's own standard-library sources (no download), evaluate "
        "held-out perplexity, save a model folder with tokenizer and loss curve, reload it through "
        "AutoModelForCausalLM and print a generated sample.",
    )
    demo.add_argument("--output-dir", default="grin-moe-demo", help="folder to write (default: %(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per step (default: %(default)s)")
    demo.add_argument(
        "--block-size", type=_positive_int, default=128, help="tokens per sequence (default: %(default)s)"
    )
    demo.add_argument("--preset", default="grin-moe-tiny", help="model preset (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"grin-moe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
