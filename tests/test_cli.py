import json

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_grin.cli import main
from modeling_grin.data import embedded_corpus, token_blocks, train_tokenizer


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: grin-moe" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--batch-size", "x"], ["no-such-command"]])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_mh_moe_demo(tmp_path):
    argv = ["demo", "--arch", "mh-moe", "--output-dir", str(tmp_path), "--steps", "2", "--batch-size", "16",
            "--block-size", "32", "--seed", "3"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "MhMoeForCausalLM"
    assert main([*argv[:-1], "3"]) == 0  # the same seed gives the same run
    assert json.loads((tmp_path / "demo_summary.json").read_text())["heldout_loss"] == summary["heldout_loss"]


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "out"), "--preset", "nope", "--steps", "1"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_embedded_corpus_and_tokenizer_round_trip():
    texts = embedded_corpus()
    assert len(texts) >= 10 and sum(map(len, texts)) > 500_000
    tokenizer = train_tokenizer(texts[:3], vocab_size=400)
    sample = "def f(x):\n    return x ** 2  # ünïcode"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    blocks = token_blocks(tokenizer, texts[:2], block_size=64)
    assert blocks.shape[1] == 64 and blocks.dtype == torch.long


def test_demo_trains_saves_and_reloads(tmp_path, capsys):
    output_dir = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(output_dir), "--steps", "3", "--batch-size", "16", "--block-size", "32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out loss / ppl" in printed and "sample:" in printed
    summary = json.loads((output_dir / "demo_summary.json").read_text())
    assert summary["heldout_perplexity"] > 1 and summary["sample"].startswith("def ")
    assert (output_dir / "loss_curve.png").stat().st_size > 1000
    assert (output_dir / "expert_load.png").stat().st_size > 1000
    card = (output_dir / "README.md").read_text()
    assert "library_name: transformers" in card and "perplexity" in card and "expert_load.png" in card
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert type(model).__name__ == "GrinMoeForCausalLM" and len(tokenizer) == model.config.vocab_size


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["card", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr().err
    assert captured.startswith("grin-moe card: error: ") and captured.count("\n") == 1 and "Traceback" not in captured
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        main(["--debug", "card", str(tmp_path / "missing")])


def test_card_replaces_an_existing_readme_only_with_force(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("my own notes")
    assert main(["card", str(tmp_path)]) == 2
    assert "README.md exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == "my own notes"
    assert main(["card", str(tmp_path), "--force"]) == 0
    assert "library_name: transformers" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_card_rejects_non_finite_metrics(tmp_path, capsys, value):
    tiny_model().save_pretrained(tmp_path)
    assert main(["card", str(tmp_path), "--metric", f"perplexity={value}"]) == 2
    assert "finite number" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()
