"""Peak memory and throughput of `grin-moe convert` on a synthetic checkpoint several times larger than one shard.

Writes a GRIN-MoE-format checkpoint of `--layers` shards (one layer of per-expert tensors each), converts it to the
Phimoe format with `--max-shard-size` equal to one source shard, in a child process, and reports the child's peak
resident memory above its resident memory after imports, next to the shard and checkpoint sizes.

    python benchmarks/conversion_memory.py --layers 6 --hidden 1024 --intermediate 2048 --experts 16
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
from modeling_grin.conversion import convert_checkpoint
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], to="phimoe", max_shard_size=int(sys.argv[3]))
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "baseline_rss_mib": baseline / 1024, "peak_rss_mib": peak / 1024}))
"""


VOCAB = 1000


def non_expert_tensors(layer: int, args) -> dict[str, torch.Tensor]:
    """Attention and norms of `layer`, plus the embeddings (first shard) and final norm and LM head (last shard):
    the converter refuses a checkpoint that lacks any tensor its config implies."""
    hidden, prefix = args.hidden, f"model.layers.{layer}"
    tensors = {}
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):  # 8 heads and 8 key-value heads: all hidden x hidden
        tensors[f"{prefix}.self_attn.{projection}.weight"] = torch.randn(hidden, hidden)
        tensors[f"{prefix}.self_attn.{projection}.bias"] = torch.randn(hidden)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"{prefix}.{norm}.weight"], tensors[f"{prefix}.{norm}.bias"] = torch.ones(hidden), torch.zeros(hidden)
    if layer == 0:
        tensors["model.embed_tokens.weight"] = torch.randn(VOCAB, hidden)
    if layer == args.layers - 1:
        tensors["model.norm.weight"], tensors["model.norm.bias"] = torch.ones(hidden), torch.zeros(hidden)
        tensors["lm_head.weight"], tensors["lm_head.bias"] = torch.randn(VOCAB, hidden), torch.zeros(VOCAB)
    return tensors


def write_synthetic(folder: Path, args) -> int:
    hidden, intermediate, experts = args.hidden, args.intermediate, args.experts
    weight_map, total = {}, 0
    for layer in range(args.layers):
        shard = {}
        for expert in range(experts):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
            shard[f"{prefix}.w1.weight"] = torch.randn(intermediate, hidden)
            shard[f"{prefix}.w3.weight"] = torch.randn(intermediate, hidden)
            shard[f"{prefix}.w2.weight"] = torch.randn(hidden, intermediate)
        shard[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = torch.randn(experts, hidden)
        shard.update(non_expert_tensors(layer, args))
        name = f"model-{layer + 1:05d}-of-{args.layers:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config = {"model_type": "grinmoe", "hidden_size": hidden, "intermediate_size": intermediate,
              "num_local_experts": experts, "num_experts_per_tok": 2, "num_hidden_layers": args.layers,
              "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": VOCAB}
    (folder / "config.json").write_text(json.dumps(config))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "source"
        source.mkdir()
        started = time.perf_counter()
        total = write_synthetic(source, args)
        shard = total // args.layers
        print(f"synthetic checkpoint: {total / 2**20:,.0f} MiB in {args.layers} shards of {shard / 2**20:,.0f} MiB "
              f"(written in {time.perf_counter() - started:.1f}s)", file=sys.stderr)
        child = subprocess.run([sys.executable, "-c", CHILD, str(source), str(Path(work) / "out"), str(shard),
                                str(ROOT)], capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
    growth = result["peak_rss_mib"] - result["baseline_rss_mib"]
    print(f"command: python {' '.join(sys.argv)}")
    print("| checkpoint MiB | shards | shard MiB | peak RSS above imports, MiB | ÷ shard | seconds | MiB/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {total / 2**20:,.0f} | {args.layers} | {shard / 2**20:,.0f} | {growth:,.0f} | "
          f"{growth * 2**20 / shard:.2f} | {result['seconds']:.1f} | {total / 2**20 / result['seconds']:,.0f} |")


if __name__ == "__main__":
    main()
