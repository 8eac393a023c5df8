"""`grin-moe train` loses nothing, refuses clearly and fails before the work starts (issue 14).

One short run (5 steps, checkpoints at 2 and 4) of a one-layer model is trained once; each test works on a copy of
its output folder. Runs hold out a single block, so evaluating costs one forward.
"""

import json
import os
import random
import re
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

import modeling_grin.data as data_module
from modeling_grin.cli import main
from modeling_grin.data import LONGEST_TRAINING_RUN, _training_pieces, load_texts, train_tokenizer
from modeling_grin.presets import load_preset
from modeling_grin.training.checkpoints import STATE_FILE
from modeling_grin.training.loop import latest_checkpoint, train


@dataclass(frozen=True)
class Runs:
    """The run every test repeats or varies: a one-layer GRIN-MoE (`config`), a 300-token tokenizer, fused experts."""

    config: Path

    def train(self, output_dir: Path, text: Path, steps: int, **options):
        return train(output_dir, config=self.config, data=[text], steps=steps, vocab_size=300, batch_size=2,
                     block_size=32, save_steps=2, eval_fraction=0.001, experts_implementation="fused", **options)

    def cli(self, output_dir: Path, text: Path, steps: int, *extra: str) -> list[str]:
        return ["train", "--output-dir", str(output_dir), "--config", str(self.config), "--data", str(text),
                "--vocab-size", "300", "--batch-size", "2", "--block-size", "32", "--save-steps", "2",
                "--steps", str(steps), "--experts-implementation", "fused", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    folder = tmp_path_factory.mktemp("config")
    load_preset("grin-moe-tiny", num_hidden_layers=1).save_pretrained(folder)
    return Runs(folder / "config.json")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("texts")
    (folder / "a.txt").write_text(Path(textwrap.__file__).read_text(encoding="utf-8"))
    (folder / "b.txt").write_text(Path(shutil.__file__).read_text(encoding="utf-8")[:40_000])
    return {"a": folder / "a.txt", "b": folder / "b.txt"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, runs, texts) -> Path:
    output_dir = tmp_path_factory.mktemp("run") / "out"
    runs.train(output_dir, texts["a"], 5)
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return output_dir


@pytest.fixture
def run_copy(tmp_path, finished_run) -> Path:
    shutil.copytree(finished_run, tmp_path / "out")
    return tmp_path / "out"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("grin-moe train: error: ") and "\n" not in error, error
    return error


# ----- --resume ------------------------------------------------------------------------------------------------------


def test_resume_refuses_a_checkpoint_of_another_run(runs, run_copy, texts, capsys):
    """Other data and vocabulary in the same --output-dir: the first run's checkpoint is not taken for this one's."""
    before = snapshot(run_copy)
    arguments = runs.cli(run_copy, texts["b"], 6, "--resume")
    arguments[arguments.index("--vocab-size") + 1] = "400"
    assert main(arguments) == 2
    error = one_line_error(capsys)
    assert "checkpoint-4 belongs to another run" in error
    assert "tokenizer (--tokenizer / --vocab-size), data (--data / --text-field) differ" in error
    assert "model config" not in error
    assert snapshot(run_copy) == before  # nothing trained, nothing written


def test_resume_refuses_steps_the_checkpoint_has_already_trained(runs, run_copy, texts, capsys):
    before = snapshot(run_copy)
    assert main([*runs.cli(run_copy, texts["a"], 1), "--resume"]) == 2
    assert "checkpoint-4 has trained 4 steps already; pass --steps above 4" in one_line_error(capsys)
    assert snapshot(run_copy) == before  # it printed "-64 tokens" and replaced model/ before


DAMAGES = {
    "negative step": (STATE_FILE, lambda path: path.write_text(json.dumps({"step": -5, "losses": []}))),
    "truncated weights": ("model.safetensors", lambda path: path.write_bytes(path.read_bytes()[:-100])),
    "truncated optimizer": ("optimizer.safetensors", lambda path: path.write_bytes(path.read_bytes()[:1000])),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(runs, run_copy, texts, damage):
    name, spoil = DAMAGES[damage]
    spoil(run_copy / "checkpoint-4" / name)
    with pytest.warns(UserWarning, match=f"resuming from checkpoint-2: .*checkpoint-4/{name}"):
        result = runs.train(run_copy, texts["a"], 3, resume=True)
    assert result.summary["resumed_from_step"] == 2


def test_no_undamaged_checkpoint_is_a_one_line_error_naming_the_files(runs, run_copy, texts, capsys):
    for step in (2, 4):
        path = run_copy / f"checkpoint-{step}" / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
    assert main([*runs.cli(run_copy, texts["a"], 6), "--resume"]) == 2
    error = one_line_error(capsys)
    assert "holds no complete checkpoint-N folder" in error
    for step in (4, 2):  # the size recorded with each checkpoint catches the truncation
        assert f"checkpoint-{step}/model.safetensors has " in error


def test_folders_that_are_not_checkpoint_n_are_ignored(run_copy):
    for name in ("checkpoint-final", "checkpoint-7.bak", "checkpoint-0"):
        shutil.copytree(run_copy / "checkpoint-2", run_copy / name)
    assert latest_checkpoint(run_copy).name == "checkpoint-4"  # it stopped with `invalid literal for int()`


def test_a_checkpoint_without_fingerprint_resumes_with_a_warning(runs, run_copy, texts):
    state_file = run_copy / "checkpoint-4" / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["fingerprint"], state["files"]  # as written before checkpoints carried them
    state_file.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="carries no run fingerprint"):
        assert runs.train(run_copy, texts["a"], 5, resume=True).summary["resumed_from_step"] == 4


def test_writing_the_model_folder_keeps_files_train_did_not_write(runs, run_copy, texts):
    model = run_copy / "model"
    (model / "notes.txt").write_text("mine")
    (model / "evaluation").mkdir()
    (model / "model-00001-of-00002.safetensors").write_bytes(b"a stale shard train wrote in another layout")
    runs.train(run_copy, texts["a"], 5, resume=True)
    assert (model / "notes.txt").read_text() == "mine" and (model / "evaluation").is_dir()
    assert not (model / "model-00001-of-00002.safetensors").exists()
    assert load_file(model / "model.safetensors") and (model / "config.json").is_file()


# ----- output folders ------------------------------------------------------------------------------------------------


def _output_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file")
    return tmp_path / "taken"


def _output_below_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file")
    return tmp_path / "taken" / "out"


@pytest.mark.parametrize("make_output", [_output_that_is_a_file, _output_below_a_file])
def test_an_output_dir_that_cannot_be_a_folder_fails_before_training(runs, tmp_path, texts, make_output):
    steps_trained = []
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        runs.train(make_output(tmp_path), texts["a"], 2,
                   on_before_optimizer_step=lambda step, model: steps_trained.append(step))
    assert steps_trained == []  # every step trained before, then the save crashed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_fails_before_training(runs, tmp_path, texts, capsys):
    (tmp_path / "read-only").mkdir(mode=0o555)
    assert main(runs.cli(tmp_path / "read-only" / "out", texts["a"], 2)) == 2
    error = one_line_error(capsys)
    assert "--output-dir" in error and "is not writable" in error


def test_an_output_dir_that_is_a_file_is_a_one_line_cli_error(runs, tmp_path, texts, capsys):
    assert main(runs.cli(_output_that_is_a_file(tmp_path), texts["a"], 2)) == 2
    assert "--output-dir" in one_line_error(capsys)


# ----- configs and data given to train -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_experts_per_tok", "2", "Validation error for field 'num_experts_per_tok'"),  # a type error: traceback
        ("rope_parameters", {"rope_type": "bogus", "rope_theta": 1e4}, "`rope_parameters['rope_type']`"),  # KeyError
        ("initializer_range", -0.02, "`initializer_range`"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": -1.0}, "`rope_theta`"),  # "router logits NaN"
    ],
)
def test_a_bad_config_is_a_one_line_error_naming_the_file(runs, tmp_path, texts, capsys, field, value, message):
    config = json.loads(runs.config.read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    arguments = runs.cli(tmp_path / "out", texts["a"], 2)
    arguments[arguments.index("--config") + 1] = str(tmp_path / "config.json")
    assert main(arguments) == 2
    error = one_line_error(capsys)
    assert f"config {tmp_path / 'config.json'}: " in error and message in error
    assert not (tmp_path / "out").exists()


def test_non_utf8_data_names_the_file_and_line(runs, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("first line\ncafé\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:2 is not UTF-8 text \(byte 0xe9"):
        load_texts([tmp_path / "latin1.txt"])
    assert main(runs.cli(tmp_path / "out", tmp_path / "latin1.txt", 2)) == 2
    assert "latin1.txt:2 is not UTF-8" in one_line_error(capsys)


# ----- tokenizer training on long lines ------------------------------------------------------------------------------


def test_a_2mb_line_without_whitespace_trains_a_tokenizer_in_seconds():
    """It ran for more than 180 s (quadratic in the line: 200 k characters took 13.6 s)."""
    line = "".join(random.Random(0).choices("ACGT", k=2_000_000))
    started = time.perf_counter()
    tokenizer = train_tokenizer([line], vocab_size=300)
    assert time.perf_counter() - started < 30  # about 2.5 s on the 2-core test machine
    assert len(tokenizer) == 300 and tokenizer.decode(tokenizer(line[:5000])["input_ids"]) == line[:5000]


def test_only_long_runs_are_cut_for_training():
    ordinary = Path(textwrap.__file__).read_text(encoding="utf-8")
    assert list(_training_pieces(ordinary)) == [ordinary]  # ordinary text trains exactly as before
    text = "x" * 2500 + " word " + " " * 1500 + "y" * 10
    pieces = list(_training_pieces(text))
    assert "".join(pieces) == text and len(pieces) == 4
    assert max(len(chars) for piece in pieces for chars in re.findall(r"\S+|\s+", piece)) == LONGEST_TRAINING_RUN


def test_long_inputs_show_the_trainers_progress(monkeypatch):
    shown = []
    real_trainer = data_module.trainers.BpeTrainer

    def recording_trainer(**kwargs):
        shown.append(kwargs["show_progress"])
        return real_trainer(**kwargs)

    monkeypatch.setattr(data_module.trainers, "BpeTrainer", recording_trainer)
    monkeypatch.setattr(data_module, "PROGRESS_FROM_CHARACTERS", 1000)
    train_tokenizer(["short text"], vocab_size=270)
    train_tokenizer(["long text " * 200], vocab_size=270)
    train_tokenizer(["long text " * 200], vocab_size=270, show_progress=False)
    assert shown == [False, True, False]
