"""BitNet b1.58 export: file size, in-memory size and greedy-decoding speed of the packed ternary model against the
same architecture in fp32 and bf16 (not quantized) and the BitNet model with its latent fp32 weights.

    python benchmarks/bitnet_export.py                        # shape "small": 4 layers, H=256, I=400, E=16, k=2
    python benchmarks/bitnet_export.py --model-shape mhmoe --rounds 5

Contestants (interleaved round by round, order rotated; medians of per-round ratios to fp32):
- `fp32`, `bf16`: `bitnet=False`, the same sizes;
- `bitnet latent`: `bitnet=True` as trained (fake quantization each forward, fp32 latent weights);
- `bitnet packed`: `load_ternary` of `export_ternary`: 2-bit codes in memory, unpacked in every forward.
Decoding: batch 1, a 32-token prompt, 48 new tokens (`--new-tokens`), eval mode, default experts implementation.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from transformers import AutoModelForCausalLM  # noqa: E402

from modeling_grin.bitnet_export import TERNARY_FILE, export_ternary, load_ternary  # noqa: E402
from modeling_grin.model_bench import MODEL_SHAPES, NEW_TOKENS, PROMPT_LENGTH, VOCAB_SIZE, _configs  # noqa: E402

CONTESTANTS = ("fp32", "bf16", "bitnet latent", "bitnet packed")


def in_memory_bytes(model) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in [*model.parameters(), *model.buffers()])


def build(shape: str, folder: Path) -> tuple[dict, dict]:
    """-> (models by contestant, file bytes by contestant)."""
    models, file_bytes = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_configs(MODEL_SHAPES[shape])[0], dtype=dtype).eval()
        model.save_pretrained(folder / name)
        file_bytes[name] = (folder / name / "model.safetensors").stat().st_size
        models[name] = model
    config = _configs(MODEL_SHAPES[shape])[0]
    config.bitnet = True
    torch.manual_seed(0)
    latent = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    latent.save_pretrained(folder / "latent")
    file_bytes["bitnet latent"] = (folder / "latent" / "model.safetensors").stat().st_size
    export_ternary(latent, folder / "packed")
    file_bytes["bitnet packed"] = (folder / "packed" / TERNARY_FILE).stat().st_size
    models["bitnet latent"], models["bitnet packed"] = latent, load_ternary(folder / "packed")
    return models, file_bytes


@torch.no_grad()
def decode(model, input_ids, new_tokens: int) -> None:
    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens decoded per round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        models, file_bytes = build(args.model_shape, Path(folder))
    times = {name: [] for name in CONTESTANTS}
    prompt = torch.randint(3, VOCAB_SIZE, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    for name in CONTESTANTS:  # warm-up (transformers' unpack_weights compiles on its first calls)
        decode(models[name], prompt, args.new_tokens)
    for round_index in range(args.rounds):
        order = CONTESTANTS[round_index % 4:] + CONTESTANTS[:round_index % 4]
        for name in order:
            started = time.perf_counter()
            decode(models[name], prompt, args.new_tokens)
            times[name].append(time.perf_counter() - started)
    rows = []
    for name in CONTESTANTS:
        ratio = statistics.median(times["fp32"][i] / times[name][i] for i in range(args.rounds))
        rows.append({
            "contestant": name,
            "file_bytes": file_bytes[name],
            "in_memory_bytes": in_memory_bytes(models[name]),
            "decode_tokens_per_s": args.new_tokens / statistics.median(times[name]),
            "decode_speed_vs_fp32": ratio,
        })
    print(f"shape {args.model_shape}, greedy decoding of {args.new_tokens} tokens after {PROMPT_LENGTH}, batch 1, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads\n")
    print("| model | file | vs fp32 | in memory | tokens/s | speed vs fp32 |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['contestant']} | {row['file_bytes'] / 2**20:.2f} MiB | "
              f"{row['file_bytes'] / rows[0]['file_bytes']:.3f} | {row['in_memory_bytes'] / 2**20:.2f} MiB | "
              f"{row['decode_tokens_per_s']:.1f} | {row['decode_speed_vs_fp32']:.2f}× |")
    result = {"shape": args.model_shape, "rounds": args.rounds, "rows": rows, "times": times}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
