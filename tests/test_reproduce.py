"""Smoke tests of the small-scale paper reproductions in benchmarks/ (a minimal budget: 2 steps, 1 seed)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BUDGET = ["--seeds", "0", "--steps", "2", "--batch-size", "2", "--block-size", "64", "--eval-fraction", "0.005",
          "--no-progress"]


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import reproduce_common as a sibling
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_common(result: dict, variants: list[str], reference: str, json_path: Path, plot_path: Path) -> None:
    assert plot_path.is_file() and plot_path.stat().st_size > 0
    assert json.loads(json_path.read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    assert [row["variant"] for row in result["summary"]] == variants
    for row in result["summary"]:
        assert row["seeds"] == 1 and row["heldout_loss_std"] == 0.0
        assert row["heldout_ppl_mean"] == pytest.approx(2.718281828 ** row["heldout_loss_mean"], rel=1e-6)
    assert next(r for r in result["summary"] if r["variant"] == reference)["delta_loss_vs_reference_mean"] == 0.0
    reference_loss = result["runs"][reference][0]["heldout_loss"]
    for name in variants:
        (run,) = result["runs"][name]
        assert len(run["loss_curve"]) == 2 and run["seconds"] > 0
        assert 0 < run["active_parameters"] < run["total_parameters"]
        row = next(row for row in result["summary"] if row["variant"] == name)  # one seed: the run's own numbers
        assert row["heldout_loss_mean"] == run["heldout_loss"]
        assert row["delta_loss_vs_reference_mean"] == pytest.approx(run["heldout_loss"] - reference_loss, abs=1e-12)
    table = result["table"].splitlines()
    assert len(table) == 2 + len(variants) and all(" ± " in line for line in table[2:])
    assert result["budget"]["tokens_per_run"] == 2 * 2 * 64


def test_reproduce_mhmoe(tmp_path):
    module = _load("reproduce_mhmoe")
    json_path, plot_path = tmp_path / "mhmoe.json", tmp_path / "mhmoe.png"
    result = module.main([*BUDGET, "--hidden-size", "24", "--layers", "2", "--plot", str(plot_path),
                          "--json", str(json_path)])
    variants = ["SMoE", "fine-grained", "MH-MoE h=2", "MH-MoE h=3"]
    _check_common(result, variants, "SMoE", json_path, plot_path)
    # FLOPs parity: every variant's MoE layer costs the same per token
    assert len({result["variants"][name]["moe_flops_per_token"] for name in variants}) == 1
    assert [result["variants"][name]["heads"] for name in variants] == [1, 1, 2, 3]
    # The ranking is the measured one (best perplexity first), compared with the paper's order (h=3 best, SMoE last).
    measured = sorted(result["summary"], key=lambda row: row["heldout_ppl_mean"])
    assert result["ranking"] == [row["variant"] for row in measured]
    paper = ["MH-MoE h=3", "MH-MoE h=2", "fine-grained", "SMoE"]
    assert sorted(module.PAPER_PPL_100K, key=module.PAPER_PPL_100K.get) == paper
    assert result["ordering_matches_paper"] is (result["ranking"] == paper)


def test_reproduce_mhmoe_under_bitnet(tmp_path, monkeypatch):
    """--bitnet: the same four variants at the same FLOPs, each config with bitnet=True, ranked against Table 3.
    (Training BitNet models is tested in tests/test_bitnet.py; the runs here are recorded, not trained.)"""
    module = _load("reproduce_mhmoe")
    trained = {}

    def record_runs(configs, seeds, *args, **kwargs):
        trained.update(configs)
        return {name: [{"seed": 0, "heldout_loss": 6.0 - 0.1 * index, "heldout_ppl": 2.718281828 ** (6.0 - 0.1 * index),
                        "seconds": 1.0, "loss_curve": [7.0, 6.5], "total_parameters": 2, "active_parameters": 1}]
                for index, name in enumerate(configs)}

    monkeypatch.setattr(module.common, "run_variants", record_runs)
    result = module.main([*BUDGET, "--hidden-size", "24", "--layers", "2", "--bitnet", "--plot",
                          str(tmp_path / "bitnet.png")])
    variants = ["SMoE", "fine-grained", "MH-MoE h=2", "MH-MoE h=3"]
    assert list(trained) == variants and all(config.bitnet for config in trained.values())
    assert all(result["variants"][name]["bitnet"] is True for name in variants)
    assert result["paper_ppl_100k"] == module.PAPER_PPL_100K_BITNET
    assert result["ranking"] == variants[::-1] and result["ordering_matches_paper"] is True


def test_reproduce_sparsemixer(tmp_path):
    module = _load("reproduce_sparsemixer")
    json_path, plot_path = tmp_path / "sm.json", tmp_path / "sm.png"
    result = module.main([*BUDGET, "--plot", str(plot_path), "--json", str(json_path)])
    _check_common(result, ["SparseMixer-v2", "softmax top-2", "softmax top-2, not renormalised"], "softmax top-2",
                  json_path, plot_path)
    routing = {name: (v["router_type"], v["router_renormalize"]) for name, v in result["variants"].items()}
    assert routing["softmax top-2"] == ("softmax_topk", True)
    assert routing["softmax top-2, not renormalised"] == ("softmax_topk", False)  # the gate-scale control
    assert routing["SparseMixer-v2"][0] == "sparsemixer_v2"
    comparison = result["sparsemixer_minus_softmax"]
    sparsemixer, softmax = (result["runs"][name][0]["heldout_loss"] for name in ("SparseMixer-v2", "softmax top-2"))
    assert comparison["delta_loss_mean"] == pytest.approx(sparsemixer - softmax, abs=1e-12)
    assert comparison["delta_loss_std"] == 0.0 and comparison["largest_seed_std"] == 0.0
    assert comparison["exceeds_seed_std"] is None  # one seed: no spread to compare with
