import json

import pytest

from modeling_grin import bench


def test_bench_rows_and_json_at_a_tiny_shape(tmp_path, capsys):
    path = tmp_path / "bench.json"
    implementations = ["fused", "grouped_mm", "batched_mm", "eager", "dense"]
    argv = ["--shape", "tiny", "--repeats", "1", "--in-process", "--json", str(path)]
    rows = bench.main([*argv, "--implementations", *implementations])
    assert [row["implementation"] for row in rows] == implementations
    by_name = {row["implementation"]: row for row in rows}
    for row in rows:
        for phase in ("forward", "forward+backward"):
            # tokens/s is the 16 tokens over the median time; the ratios are tokens/s over the baseline's
            assert 0 < row[f"{phase} ms min"] <= row[f"{phase} ms"]
            assert row[f"{phase} tokens/s"] == pytest.approx(16 / (row[f"{phase} ms"] / 1e3), rel=1e-9)
            for reference in ("dense", "grouped_mm"):
                expected = row[f"{phase} tokens/s"] / by_name[reference][f"{phase} tokens/s"]
                assert row[f"{phase} vs {reference}"] == pytest.approx(expected, rel=1e-12)
        assert row["peak extra MiB"] >= 0
    assert all(by_name[name][f"{phase} vs {name}"] == 1.0 for name in ("dense", "grouped_mm")
               for phase in ("forward", "forward+backward"))
    # Saved for backward, from the shapes (rows = 16 tokens x top-2, H=32, I=48, fp32): dense keeps the up
    # projection's output (2I), SiLU's output (I) and the product (I) per row; fused keeps gate_up's output (2I)
    # plus routing metadata, less than dense; batched_mm at least its per-row copies of the three weight matrices.
    rows_routed, hidden, intermediate, mib = 32, 32, 48, 2**20
    saved_bytes = {row["implementation"]: row["saved for backward MiB"] * mib for row in rows}
    assert saved_bytes["dense"] == rows_routed * 4 * intermediate * 4
    assert rows_routed * 2 * intermediate * 4 <= saved_bytes["fused"] < saved_bytes["dense"]
    assert saved_bytes["batched_mm"] >= rows_routed * 3 * hidden * intermediate * 4
    assert saved_bytes["fused"] < saved_bytes["grouped_mm"] < saved_bytes["eager"]  # gate_up only, vs autograd's saves

    saved = json.loads(path.read_text())
    assert saved["sizes"] == {"hidden": 32, "intermediate": 48, "experts": 4, "top_k": 2, "tokens": 16}
    assert saved["rows"] == json.loads(json.dumps(rows))
    table = capsys.readouterr().out
    assert "| fused |" in table and "H=32 I=48 E=4 k=2 tokens=16 float32" in table


def test_shape_presets_and_overrides():
    parser = bench.build_parser()
    assert bench.resolve_shape(parser.parse_args([])) == bench.SHAPES["cpu"]
    grin = bench.resolve_shape(parser.parse_args(["--shape", "grin", "--tokens", "4096"]))
    assert grin == {"hidden": 4096, "intermediate": 6400, "experts": 16, "top_k": 2, "tokens": 4096}
    args = parser.parse_args(["--shape", "grin", "--device", "cuda", "--dtype", "bfloat16"])
    assert bench.batched_mm_bytes(args) > args.memory_budget_gib * 2**30  # skipped at GRIN's shape
    argv = bench._subprocess_argv(parser.parse_args(["--top-k", "3"]), "fused")
    assert argv[argv.index("--top-k") + 1] == "3" and argv[argv.index("--only") + 1] == "fused"


def test_bench_command(tmp_path, capsys):
    from modeling_grin.cli import main

    path = tmp_path / "bench.json"
    argv = ["bench", "--shape", "tiny", "--repeats", "1", "--in-process", "--implementations", "fused", "dense",
            "--json", str(path)]
    assert main(argv) == 0
    assert [row["implementation"] for row in json.loads(path.read_text())["rows"]] == ["fused", "dense"]
    assert "| fused |" in capsys.readouterr().out
