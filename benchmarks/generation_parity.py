"""How closely generation follows transformers' Phimoe and uncached decoding, per `generate` feature, in figures.

The comparisons of tests/test_generation.py (same informative tiny models, same prompts), with the largest per-step
logit difference printed instead of checked against the 1e-4 bound. GRIN-MoE runs against `PhimoeForCausalLM` holding
the same weights; both families run against their own `use_cache=False` decoding.

    python benchmarks/generation_parity.py --json generation_parity.json
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a checkout; the tests' models and helpers

from conftest import LONGROPE_SCALING, left_padded, peak_weights_, rewrite_as_phimoe  # noqa: E402
from test_generation import GREEDY, build, generate, prompt  # noqa: E402
from transformers import PhimoeForCausalLM  # noqa: E402

CACHED_ONLY = ("cache_implementation", "assistant_model", "prompt_lookup_num_tokens")


def as_phimoe(model, folder: Path) -> PhimoeForCausalLM:
    model.save_pretrained(folder)
    rewrite_as_phimoe(folder)
    return PhimoeForCausalLM.from_pretrained(folder).eval()


def difference(first, second) -> tuple[bool, float]:
    """(identical tokens, largest per-step logit difference) of two `generate` results."""
    (tokens_a, logits_a), (tokens_b, logits_b) = first, second
    return torch.equal(tokens_a, tokens_b), (logits_a - logits_b).abs().max().item()


def features(family: str):
    """Name -> (prompt, `generate` settings) of the features that run the same way on every model."""
    padded, mask = left_padded(prompt())
    repeated = prompt(batch=1, length=4).repeat(1, 3)
    assistant = peak_weights_(build(family), seed=1)
    return {
        "greedy, left padding, across the sliding window": (padded, dict(attention_mask=mask)),
        "seeded sampling (T=1.5)": (padded, dict(attention_mask=mask, do_sample=True, top_k=0, temperature=1.5)),
        "static cache": (padded, dict(attention_mask=mask, cache_implementation="static")),
        "assisted decoding": (prompt(batch=1), dict(assistant_model=assistant)),
        "prompt-lookup decoding": (repeated, dict(prompt_lookup_num_tokens=3)),
    }


def run_feature(model, input_ids, settings, seed=7):
    torch.manual_seed(seed)
    return generate(model, input_ids, **settings)


def measure(family: str, folder: Path) -> list[dict]:
    model = build(family)
    phimoe = as_phimoe(model, folder / "phimoe") if family == "grin" else None
    rows = []
    for name, (input_ids, settings) in features(family).items():
        ours = run_feature(model, input_ids, settings)
        # Assisted and prompt-lookup decoding need a cache: their reference is plain uncached decoding.
        uncached_settings = {key: value for key, value in settings.items() if key not in CACHED_ONLY}
        row = {"family": family, "feature": name}
        row["uncached_tokens_equal"], row["uncached_max_diff"] = difference(
            ours, run_feature(model, input_ids, {**uncached_settings, "use_cache": False})
        )
        if phimoe is not None:
            row["phimoe_tokens_equal"], row["phimoe_max_diff"] = difference(
                ours, run_feature(phimoe, input_ids, settings)
            )
        rows.append(row)

    embeds_input, mask = left_padded(prompt())
    from_ids = generate(model, embeds_input, attention_mask=mask)
    with torch.no_grad():
        out = model.generate(inputs_embeds=model.get_input_embeddings()(embeds_input), attention_mask=mask,
                             output_logits=True, return_dict_in_generate=True, **GREEDY)
    same, diff = difference((out.sequences, torch.stack(out.logits)), (from_ids[0][:, embeds_input.shape[1]:],
                                                                       from_ids[1]))
    rows.append({"family": family, "feature": "inputs_embeds (vs input_ids)", "uncached_tokens_equal": same,
                 "uncached_max_diff": diff})

    if family == "grin":
        long_model = build("grin", rope_scaling=LONGROPE_SCALING, sliding_window=None)
        long_phimoe = as_phimoe(long_model, folder / "longrope")
        short_prompt = prompt(batch=2, length=5)
        ours = generate(long_model, short_prompt)
        row = {"family": family, "feature": "longrope past the original context"}
        row["uncached_tokens_equal"], row["uncached_max_diff"] = difference(
            ours, generate(long_model, short_prompt, use_cache=False)
        )
        row["phimoe_tokens_equal"], row["phimoe_max_diff"] = difference(ours, generate(long_phimoe, short_prompt))
        rows.append(row)

        with torch.no_grad():
            beams = [
                network.generate(embeds_input, attention_mask=mask, num_beams=3, num_return_sequences=2,
                                 output_scores=True, return_dict_in_generate=True, **GREEDY, **extra)
                for network, extra in ((model, {}), (phimoe, {}), (model, {"use_cache": False}))
            ]
        row = {"family": family, "feature": "beam search (3 beams; sequence scores)"}
        for key, other in (("phimoe", beams[1]), ("uncached", beams[2])):
            row[f"{key}_tokens_equal"] = torch.equal(beams[0].sequences, other.sequences)
            row[f"{key}_max_diff"] = (beams[0].sequences_scores - other.sequences_scores).abs().max().item()
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    def cell(row, key):
        if f"{key}_max_diff" not in row:
            return "—"
        tokens = "same tokens" if row[f"{key}_tokens_equal"] else "TOKENS DIFFER"
        return f"{row[f'{key}_max_diff']:.1e}, {tokens}"

    print("| family | feature | vs Phimoe (same weights) | vs uncached decoding |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['feature']} | {cell(row, 'phimoe')} | {cell(row, 'uncached')} |")
    print(f"\ncommand: python {' '.join(sys.argv)}; torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for family in ("grin", "mh_moe") for row in measure(family, Path(folder))]
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
