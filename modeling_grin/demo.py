"""`grin-moe demo`: train a small GRIN-MoE or MH-MoE on the embedded corpus, save a Hub-ready folder, reload it."""

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .training.loop import train

ARCH_PRESETS = {"grin": "grin-moe-tiny", "mh-moe": "mh-moe-tiny"}


def run_demo(
    output_dir: str | Path = "grin-moe-demo",
    steps: int = 300,
    batch_size: int = 16,
    block_size: int = 128,
    learning_rate: float = 3e-3,
    vocab_size: int = 2048,
    arch: str = "grin",
    preset: str | None = None,
    seed: int = 0,
    prompt: str = "def ",
    max_new_tokens: int = 48,
) -> dict:
    """Train (with `grin-moe train`'s loop, on the embedded corpus), evaluate, save, reload and sample; returns (and
    writes to `demo_summary.json`) the figures. The Hub-ready folder is `output_dir` itself."""
    if arch not in ARCH_PRESETS:
        raise ValueError(f"`arch` must be one of {', '.join(ARCH_PRESETS)}, got {arch!r}")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    result = train(
        output_dir, preset=preset or ARCH_PRESETS[arch], vocab_size=vocab_size, steps=steps, batch_size=batch_size,
        block_size=block_size, learning_rate=learning_rate, seed=seed, eval_fraction=0.1, save_dir=output_dir,
    )

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    torch.manual_seed(seed)  # the sample is part of what --seed reproduces
    generated = reloaded.generate(
        **tokenizer(prompt, return_tensors="pt"), max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
        top_k=40, pad_token_id=tokenizer.pad_token_id,
    )
    summary = {
        **{key: value for key, value in result.summary.items() if key not in ("processes", "distributed_type")},
        "sample": tokenizer.decode(generated[0], skip_special_tokens=True),
        "seconds": time.perf_counter() - started,
    }
    (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
