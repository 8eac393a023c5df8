"""The whole-model benchmark (`grin-moe bench --whole-model`): its contestants are what it says they are, and its
ratios are computed from its own per-round times."""

import json
import statistics

import pytest
import torch

from modeling_grin import model_bench
from modeling_grin.cli import main as cli_main


def tiny_args(*extra):
    return model_bench.build_parser().parse_args(
        ["--model-shape", "tiny", "--rounds", "2", "--batch", "2", "--length", "16", *extra])


def test_contestants_are_the_same_model_except_the_dense_one():
    contestants = {c.name: c.model.eval() for c in model_bench.build_contestants(tiny_args())}
    assert list(contestants) == ["GrinMoe grouped_mm", "GrinMoe eager", "GrinMoe fused", "Phimoe eager",
                                 "Phimoe grouped_mm", "dense"]
    input_ids = torch.randint(3, model_bench.VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {name: model(input_ids).logits for name, model in contestants.items()}
    for name, model in contestants.items():
        if name != "dense":  # same weights: transformers' Phimoe and every implementation give GRIN's logits
            assert model.config._experts_implementation == name.split()[1]
            assert (logits[name] - logits["GrinMoe eager"]).abs().max() <= 1e-5, name
    dense = contestants["dense"]
    config = dense.config
    for layer in dense.model.layers:  # a SwiGLU FFN of the activated size, top_k x expert size
        assert layer.mlp.gate_proj.weight.shape == (config.num_experts_per_tok * config.intermediate_size,
                                                    config.hidden_size)
    assert not torch.equal(logits["dense"], logits["GrinMoe eager"])


def test_mh_moe_shape_builds_its_flops_parity_dense_twin():
    args = model_bench.build_parser().parse_args(["--model-shape", "mhmoe", "--experts-implementations", "fused"])
    names = [c.name for c in model_bench.build_contestants(args)]
    assert names == ["MhMoe fused", "dense"]
    config, dense = model_bench._configs(model_bench.MODEL_SHAPES["mhmoe"])
    assert (config.moe_heads, config.sub_token_size, dense.moe_layer_frequency) == (3, 64, 0)
    # the dense FFN of the FLOPs-parity formula: k x I + 2d/3 (head and merge projections) = 3 x 128 + 128
    assert dense.dense_intermediate_size == config.num_experts_per_tok * config.intermediate_size + 2 * 192 // 3


def test_summary_ratios_are_medians_of_per_round_ratios(tmp_path, capsys):
    path = tmp_path / "speed.json"
    summary = model_bench.main(["--model-shape", "tiny", "--rounds", "2", "--batch", "2", "--length", "16",
                                "--workloads", "train", "decode1", "--json", str(path)])
    rows = {(row["workload"], row["contestant"]): row for row in summary["rows"]}
    assert len(rows) == 2 * 6
    for workload in ("train", "decode1"):
        phimoe = [min(pair) for pair in zip(rows[workload, "Phimoe eager"]["times_s"],
                                            rows[workload, "Phimoe grouped_mm"]["times_s"], strict=True)]
        dense = rows[workload, "dense"]["times_s"]
        for (kind, _), row in rows.items():
            if kind != workload:
                continue
            times = row["times_s"]
            assert len(times) == 2 and all(t > 0 for t in times)
            per_round = zip(phimoe, dense, times, strict=True)
            assert row["vs_phimoe_best"] == pytest.approx(statistics.median(p / t for p, _, t in per_round))
            assert row["vs_dense"] == pytest.approx(statistics.median(d / t for d, t in zip(dense, times, strict=True)))
            tokens = 2 * 16 if workload == "train" else model_bench.NEW_TOKENS
            assert row["tokens_per_s"] == pytest.approx(tokens / statistics.median(times))
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(summary["rows"]))
    assert "| decode1 | GrinMoe fused |" in capsys.readouterr().out


def test_cli_runs_the_whole_model_benchmark(capsys):
    assert cli_main(["bench", "--whole-model", "--model-shape", "tiny", "--rounds", "1", "--batch", "1",
                     "--length", "8", "--workloads", "prefill", "--experts-implementations", "fused"]) == 0
    table = capsys.readouterr().out
    assert "whole model, shape tiny" in table and "| prefill | GrinMoe fused |" in table
