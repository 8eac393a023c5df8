import json

from modeling_grin import bench


def test_bench_rows_and_json_at_a_tiny_shape(tmp_path, capsys):
    path = tmp_path / "bench.json"
    implementations = ["fused", "grouped_mm", "batched_mm", "eager", "dense"]
    argv = ["--shape", "tiny", "--repeats", "1", "--in-process", "--json", str(path)]
    rows = bench.main([*argv, "--implementations", *implementations])
    assert [row["implementation"] for row in rows] == implementations
    for row in rows:
        for phase in ("forward", "forward+backward"):
            assert row[f"{phase} tokens/s"] > 0 and row[f"{phase} ms"] > 0
            assert row[f"{phase} vs dense"] > 0 and row[f"{phase} vs grouped_mm"] > 0
        assert "peak extra MiB" in row and row["saved for backward MiB"] > 0
    dense = rows[-1]
    saved_mib = {row["implementation"]: row["saved for backward MiB"] for row in rows}
    assert saved_mib["fused"] < saved_mib["grouped_mm"] < saved_mib["eager"]  # gate_up only, vs autograd's saves
    assert dense["forward+backward vs dense"] == 1.0

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
