"""What `grin-moe convert` / `upcycle` guarantee about the files around them (issue 14, docs/conversion.md): `--force`
deletes only a previous output of ours and swaps it atomically, every tensor is checked before anything is written,
leftovers of killed runs are cleaned by the next run, nothing outside the source is read, and a user error is one
line on stderr. The dense-model side of upcycling is in test_upcycling.py."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_conversion import tensors

import modeling_grin.conversion as conversion
from modeling_grin.cli import main
from modeling_grin.conversion import ConversionError, convert_checkpoint


def hidden_entries(folder):
    return sorted(entry.name for entry in folder.iterdir() if entry.name.startswith("."))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def one_line_error(capsys, command="convert") -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("converting shards")]
    assert len(lines) == 1 and lines[0].startswith(f"grin-moe {command}: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture(scope="module")
def grin(tmp_path_factory):
    """A tiny GRIN-MoE checkpoint in several shards (not to be modified: copy it first)."""
    folder = tmp_path_factory.mktemp("source") / "grin"
    tiny_model(num_hidden_layers=1).save_pretrained(folder, max_shard_size="20KB")
    return folder


@pytest.fixture
def single_file(tmp_path):
    """A tiny GRIN-MoE checkpoint in one `model.safetensors`, free to edit."""
    folder = tmp_path / "single"
    tiny_model(num_hidden_layers=1).save_pretrained(folder)
    return folder


def edit_weights(folder, edit):
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def old_output(grin, tmp_path):
    """`tmp_path / "out"`: a previous output of `grin-moe convert` (phimoe format) and its tensors."""
    convert_checkpoint(grin, tmp_path / "out", to="phimoe")
    return tmp_path / "out", tensors(tmp_path / "out")


def assert_is_output(folder, expected_tensors, model_type):
    assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    written = tensors(folder)
    assert written.keys() == expected_tensors.keys()
    assert all(torch.equal(written[name], expected_tensors[name]) for name in written)


# ---------------------------------------------------------------------------------------------------------------------
# 1. --force deletes nothing but a previous output of ours, and replaces it by renames


@pytest.mark.parametrize("destination", [".", "..", "CWD"])
def test_the_current_directory_is_never_a_destination(grin, tmp_path, monkeypatch, capsys, destination):
    work = tmp_path / "work"
    work.mkdir()
    (work / "important.txt").write_text("keep me")
    monkeypatch.chdir(work)
    destination = str(work) if destination == "CWD" else destination
    assert main(["convert", str(grin), destination, "--to", "grinmoe", "--force"]) == 2
    assert "current directory" in one_line_error(capsys)
    assert sorted(os.listdir(work)) == ["important.txt"] and (work / "important.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["work"]


@pytest.mark.parametrize("destination, message", [
    ("work/src", "is the source"), ("work", "holds the source"), ("work/src/sub", "inside the source"),
])
def test_the_source_and_folders_around_or_inside_it_are_refused(grin, tmp_path, destination, message):
    source = tmp_path / "work" / "src"
    shutil.copytree(grin, source)
    before = sorted(path.name for path in source.iterdir())
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(source, tmp_path / destination, to="grinmoe", force=True)
    assert sorted(path.name for path in source.iterdir()) == before
    assert sorted(os.listdir(tmp_path / "work")) == ["src"]


@pytest.mark.parametrize("kind, reason", [
    ("foreign file", "it holds important.txt"),
    ("our output plus a file", "it holds README.md"),
    ("untagged checkpoint", "{first_shard} has no written_by=modeling_grin.conversion metadata"),
    ("unreadable shard", "model.safetensors has no written_by=modeling_grin.conversion metadata"),
    ("subfolder", "notes is not a regular file"),
    ("link to a file", "config.json is not a regular file"),
])  # fmt: skip
def test_force_refuses_a_folder_it_did_not_write(grin, old_output, tmp_path, kind, reason):
    destination, _ = old_output
    if kind == "foreign file":
        shutil.rmtree(destination)
        destination.mkdir()
        (destination / "important.txt").write_text("keep me")
    elif kind == "our output plus a file":
        (destination / "README.md").write_text("keep me")
    elif kind == "untagged checkpoint":  # a model saved by transformers, not by a conversion
        shutil.rmtree(destination)
        shutil.copytree(grin, destination)
    elif kind == "unreadable shard":  # a shard of ours cut short: no longer proof that the folder is ours
        shard = destination / "model.safetensors"
        (tmp_path / "cut").write_bytes(shard.read_bytes()[:100])
        os.replace(tmp_path / "cut", shard)  # (a new file: the fixture's tensors still map the old one)
    elif kind == "subfolder":
        (destination / "notes").mkdir()
    else:  # a name we write, but a link to someone's file
        (destination / "config.json").rename(tmp_path / "their-config.json")
        (destination / "config.json").symlink_to(tmp_path / "their-config.json")
    before = {path.name: path.read_bytes() for path in destination.iterdir() if path.is_file()}
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(grin, destination, to="grinmoe", force=True)
    reason = reason.format(first_shard=min(path.name for path in grin.glob("model-*.safetensors")))
    assert str(error.value) == (f"{destination} is not an output of grin-moe convert or upcycle ({reason}); --force "
                                "replaces only those: move it away or choose another destination")
    assert {path.name: path.read_bytes() for path in destination.iterdir() if path.is_file()} == before
    assert hidden_entries(tmp_path) == []


def test_force_replaces_a_previous_output_or_an_empty_folder(grin, old_output, tmp_path):
    destination, phimoe_tensors = old_output
    convert_checkpoint(grin, destination, to="grinmoe", force=True)
    assert_is_output(destination, phimoe_tensors, "grinmoe")
    assert hidden_entries(tmp_path) == []
    (tmp_path / "empty").mkdir()
    convert_checkpoint(grin, tmp_path / "empty", to="grinmoe", force=True)
    assert (tmp_path / "empty" / "config.json").is_file()


def test_a_failure_while_moving_the_new_output_in_puts_the_old_one_back(grin, old_output, tmp_path, monkeypatch):
    destination, phimoe_tensors = old_output
    rename = os.rename

    def failing_rename(source, target):  # the second rename of the swap: new output into place
        if os.path.basename(source).startswith(".out.converting-"):
            assert not destination.exists()  # the old output is aside by now
            raise KeyboardInterrupt("simulated crash")
        rename(source, target)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(grin, destination, to="grinmoe", force=True)
    monkeypatch.undo()
    assert_is_output(destination, phimoe_tensors, "phimoe")
    assert hidden_entries(tmp_path) == []


def test_a_kill_while_deleting_the_old_output_leaves_the_new_one_and_the_next_run_cleans(grin, old_output, tmp_path,
                                                                                          monkeypatch):
    destination, phimoe_tensors = old_output

    def killed_midway(path):
        next(path.iterdir()).unlink()  # part of the old output is gone when the kill comes
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(conversion, "_delete_folder", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(grin, destination, to="grinmoe", force=True)
    monkeypatch.undo()
    assert_is_output(destination, phimoe_tensors, "grinmoe")
    assert [name.rsplit("-", 1)[0] for name in hidden_entries(tmp_path)] == [".out.removing"]
    convert_checkpoint(grin, tmp_path / "other", to="phimoe")  # another destination leaves it alone
    assert len(hidden_entries(tmp_path)) == 1
    convert_checkpoint(grin, destination, to="phimoe", force=True)
    assert_is_output(destination, phimoe_tensors, "phimoe")
    assert hidden_entries(tmp_path) == []


def test_a_kill_between_the_two_renames_is_undone_by_the_next_run(grin, old_output, tmp_path, caplog):
    destination, phimoe_tensors = old_output
    pid = dead_pid()
    # The state a kill leaves after the old output was renamed aside and before the new one was renamed in.
    destination.rename(tmp_path / f".out.replaced-{pid}")
    convert_checkpoint(grin, tmp_path / "new", to="grinmoe")
    (tmp_path / "new").rename(tmp_path / f".out.converting-{pid}")
    with caplog.at_level("WARNING", logger="modeling_grin.conversion"), pytest.raises(ConversionError,
                                                                                      match="exists; pass --force"):
        convert_checkpoint(grin, destination, to="grinmoe")  # the old output is back, so it is not replaced
    assert f"restored {destination} from .out.replaced-{pid} (a conversion was killed while replacing it)" in (
        caplog.messages)
    assert_is_output(destination, phimoe_tensors, "phimoe")
    assert hidden_entries(tmp_path) == []


APPEARED = " (it appeared or changed while converting; it was left alone)"


@pytest.mark.parametrize("force, appears, message", [
    (False, "folder", "{destination} exists; pass --force to replace it (only a previous output of grin-moe convert or "
                      "upcycle can be replaced)" + APPEARED),
    (True, "folder", "{destination} is not an output of grin-moe convert or upcycle (it holds theirs.txt); --force "
                     "replaces only those: move it away or choose another destination" + APPEARED),
    (True, "link", "{destination} is a symbolic link; choose another destination" + APPEARED),
    (True, "file", "{destination} exists and is not a folder; choose another destination" + APPEARED),
])  # fmt: skip
def test_a_destination_that_appears_during_the_run_is_left_alone(grin, tmp_path, monkeypatch, force, appears,
                                                                   message):
    destination = tmp_path / "out"
    write_shards = conversion._write_shards

    def someone_else_creates_it(*args, **kwargs):
        manifest = write_shards(*args, **kwargs)
        if appears == "folder":
            destination.mkdir()
            (destination / "theirs.txt").write_text("keep me")
        elif appears == "link":
            (tmp_path / "theirs").mkdir()
            destination.symlink_to(tmp_path / "theirs")
        else:
            destination.write_text("keep me")
        return manifest

    monkeypatch.setattr(conversion, "_write_shards", someone_else_creates_it)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(grin, destination, to="grinmoe", force=force)
    assert str(error.value) == message.format(destination=destination)
    assert hidden_entries(tmp_path) == []
    if appears == "folder":
        assert os.listdir(destination) == ["theirs.txt"]


# ---------------------------------------------------------------------------------------------------------------------
# 2. Every tensor the config implies is checked (presence, shape, dtype) before anything is written


@pytest.fixture
def nothing_written(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a shard was written before the checks failed")

    monkeypatch.setattr(conversion, "save_file", fail)


def test_a_shard_of_non_expert_tensors_missing_from_index_and_disk(single_file, tmp_path, nothing_written):
    weights = load_file(single_file / "model.safetensors")
    experts = {name: tensor for name, tensor in weights.items() if ".experts." in name}
    (single_file / "model.safetensors").unlink()
    save_file(experts, single_file / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(experts, "model-00001-of-00002.safetensors")}
    (single_file / "model.safetensors.index.json").write_text(json.dumps(index))
    missing = set(weights) - set(experts)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "deep" / "out", to="grinmoe", verify=True)
    assert str(error.value) == (f"model.embed_tokens.weight (and {len(missing) - 1} more) is missing from the source; "
                                "the config implies it with shape (96, 32) (1 layers x 4 experts)")
    assert not (tmp_path / "deep").exists() and hidden_entries(tmp_path) == []


@pytest.mark.parametrize("dropped, message", [
    (["model.norm.weight"], "model.norm.weight is missing"),
    (["model.norm.weight", "lm_head.weight"], "model.norm.weight (and 1 more) is missing"),
])  # fmt: skip
def test_missing_tensors_are_named_and_counted(single_file, tmp_path, nothing_written, dropped, message):
    edit_weights(single_file, lambda weights: [weights.pop(name) for name in dropped])
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert str(error.value) == (f"{message} from the source; the config implies it with shape (32,) (1 layers x 4 "
                                "experts)")


def test_only_a_tied_lm_head_may_be_absent(tmp_path):
    tied = tmp_path / "tied"
    tiny_model(num_hidden_layers=1, tie_word_embeddings=True).save_pretrained(tied)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    convert_checkpoint(tied, tmp_path / "out", to="phimoe", verify=True)
    untied = tmp_path / "untied"
    tiny_model(num_hidden_layers=1).save_pretrained(untied)
    edit_weights(untied, lambda weights: weights.pop("lm_head.weight"))
    with pytest.raises(ConversionError, match="^lm_head.weight is missing from the source"):
        convert_checkpoint(untied, tmp_path / "out2", to="phimoe")


def test_an_integer_expert_tensor_names_its_source(single_file, tmp_path, nothing_written):
    model = tiny_model(num_hidden_layers=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, single_file / "model.safetensors")
    edit_weights(single_file, lambda weights: weights.update(
        {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 48, 32, dtype=torch.int32)}))
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert str(error.value) == ("model.layers.0.block_sparse_moe.experts.0.w1.weight (from "
                                "model.layers.0.mlp.experts.gate_up_proj) has dtype torch.int32; weights must be "
                                "floating point")


@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.self_attn.q_proj.weight", (32, 30)),
    ("model.norm.weight", (31,)),
    ("lm_head.weight", (95, 32)),
    ("model.layers.0.block_sparse_moe.gate.weight", (5, 32)),
])
def test_a_wrong_shape_is_named_with_the_expected_one(single_file, tmp_path, nothing_written, name, shape):
    right = tuple(load_file(single_file / "model.safetensors")[name].shape)
    edit_weights(single_file, lambda weights: weights.update({name: torch.zeros(shape)}))
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "out", to="phimoe", verify=True)
    assert str(error.value) == f"{name} has shape {shape}, the config implies {right}"
    assert hidden_entries(tmp_path) == []


def test_fused_experts_with_a_wrong_shape_name_their_source(single_file, tmp_path, nothing_written):
    model = tiny_model(num_hidden_layers=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, single_file / "model.safetensors")
    edit_weights(single_file, lambda weights: weights.update(
        {"model.layers.0.mlp.experts.down_proj": torch.zeros(4, 32, 20)}))
    with pytest.raises(ConversionError, match=r"experts.0.w2.weight \(from model.layers.0.mlp.experts.down_proj\) "
                                              r"has shape \(32, 20\), the config implies \(32, 24\)"):
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")


@pytest.mark.parametrize("name, shape, message", [
    ("model.layers.0.mlp.experts.gate_up_proj", (5, 48, 32),
     "model.layers.0.block_sparse_moe.experts.4.w1.weight (from model.layers.0.mlp.experts.gate_up_proj): expert 4 "
     "but the config has num_local_experts=4"),
    ("model.layers.1.mlp.experts.down_proj", (4, 32, 24),
     "model.layers.1.block_sparse_moe.experts.0.w2.weight (from model.layers.1.mlp.experts.down_proj): layer 1 but "
     "the config has num_hidden_layers=1"),
])  # fmt: skip
def test_fused_experts_beyond_the_config_name_their_source(single_file, tmp_path, nothing_written, name, shape,
                                                           message):
    model = tiny_model(num_hidden_layers=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, single_file / "model.safetensors")
    edit_weights(single_file, lambda weights: weights.update({name: torch.zeros(shape)}))
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert str(error.value) == message


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.update({"model.norm.weight": torch.ones(32, dtype=torch.int64)}), "must be floating point"),
    (lambda w: w.update({"model.extra.weight": torch.ones(2)}), "model.extra.weight is not a tensor of the model"),
    (lambda w: w.update({"model.layers.1.input_layernorm.weight": torch.ones(32)}), "num_hidden_layers=1"),
])
def test_wrong_dtypes_and_unknown_tensors_are_refused(single_file, tmp_path, nothing_written, edit, message):
    edit_weights(single_file, edit)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")


def test_saved_rotary_frequencies_are_skipped(single_file, tmp_path):
    edit_weights(single_file, lambda w: w.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert not any("inv_freq" in name for name in tensors(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------------------------------
# 3. Leftovers: dead runs' temporary folders are cleaned, live ones and foreign files are not; no empty parents


def test_leftovers_of_dead_runs_are_removed_by_the_next_run(grin, tmp_path, caplog):
    dead = [dead_pid() for _ in range(3)]
    leftovers = {
        f".out.converting-{dead[0]}": ["part-00001.safetensors", "config.json"],
        f".out.removing-{dead[1]}": ["model.safetensors"],
        ".out.converting-1": ["part-00001.safetensors"],  # pid 1 is alive: its run may still be writing
        f".out.converting-{dead[2]}": ["notes.txt"],  # a file we never write: not ours to delete
    }
    for name, files in leftovers.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_text("partial")
    with caplog.at_level("WARNING", logger="modeling_grin.conversion"):
        convert_checkpoint(grin, tmp_path / "out", to="grinmoe")
    assert hidden_entries(tmp_path) == sorted([".out.converting-1", f".out.converting-{dead[2]}"])
    assert sorted(caplog.messages) == sorted([
        f"removed {tmp_path / f'.out.converting-{dead[0]}'}, left by a conversion that did not finish",
        f"removed {tmp_path / f'.out.removing-{dead[1]}'}, left by a conversion that did not finish",
        f"left {tmp_path / f'.out.converting-{dead[2]}'} alone: it holds files a conversion does not write",
    ])  # fmt: skip


def test_the_newest_old_output_of_killed_runs_is_put_back_and_the_others_removed(grin, old_output, tmp_path):
    destination, phimoe_tensors = old_output
    older, newer = sorted(dead_pid() for _ in range(2))[::-1]  # the newer leftover has the smaller pid: names mislead
    convert_checkpoint(grin, tmp_path / "grin-format", to="grinmoe")
    (tmp_path / "grin-format").rename(tmp_path / f".out.replaced-{older}")
    destination.rename(tmp_path / f".out.replaced-{newer}")
    os.utime(tmp_path / f".out.replaced-{older}", (1_000_000, 1_000_000))
    with pytest.raises(ConversionError, match="exists; pass --force"):
        convert_checkpoint(grin, destination, to="grinmoe")
    assert_is_output(destination, phimoe_tensors, "phimoe")
    assert hidden_entries(tmp_path) == []


def test_a_set_aside_folder_that_is_not_a_finished_output_of_ours_is_left_alone(grin, old_output, tmp_path):
    """Beside an existing destination, a dead run's `replaced` folder is deleted only when it is a finished output of
    ours (our metadata in every shard): a checkpoint saved by transformers under that name stays."""
    leftover = tmp_path / f".out.replaced-{dead_pid()}"
    shutil.copytree(grin, leftover)
    convert_checkpoint(grin, tmp_path / "out", to="grinmoe", force=True)
    assert hidden_entries(tmp_path) == [leftover.name]
    assert sorted(path.name for path in leftover.iterdir()) == sorted(path.name for path in grin.iterdir())


@pytest.mark.parametrize("kind", ["file", "link to a folder"])
def test_entries_named_like_leftovers_that_are_not_folders_are_left_alone(grin, tmp_path, kind):
    leftover = tmp_path / f".out.replaced-{dead_pid()}"
    if kind == "file":
        leftover.write_text("keep me")
    else:
        shutil.copytree(grin, tmp_path / "theirs")
        leftover.symlink_to(tmp_path / "theirs")
    convert_checkpoint(grin, tmp_path / "out", to="phimoe")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "phimoe"
    assert not (tmp_path / "out").is_symlink() and hidden_entries(tmp_path) == [leftover.name]


def test_a_run_counts_as_alive_unless_its_process_is_gone(monkeypatch):
    """A leftover is deleted only when its process is gone for sure: alive, another user's (no permission to signal
    it) or on a system without a harmless liveness probe, it is left alone; the probe itself signals nothing."""
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert conversion._pid_is_alive(running.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # still running: probed with signal 0, not hung up or killed
            running.wait(timeout=0.5)
    finally:
        running.kill()
        running.wait()
    assert not conversion._pid_is_alive(running.pid)

    def not_permitted(pid, signal):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_permitted)
    assert conversion._pid_is_alive(running.pid)
    monkeypatch.undo()
    monkeypatch.setattr(os, "name", "nt")
    assert conversion._pid_is_alive(running.pid)


def test_an_old_output_that_cannot_be_deleted_is_left_for_the_next_run(grin, old_output, tmp_path, monkeypatch,
                                                                         caplog):
    destination, phimoe_tensors = old_output
    unlink = os.unlink

    def undeletable(path, *args, **kwargs):
        if os.path.basename(path) == "config.json" and kwargs.get("dir_fd") is not None:  # (inside rmtree only)
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", undeletable)
    with caplog.at_level("WARNING", logger="modeling_grin.conversion"):
        convert_checkpoint(grin, destination, to="grinmoe", force=True)
    monkeypatch.undo()
    assert_is_output(destination, phimoe_tensors, "grinmoe")
    (removing,) = hidden_entries(tmp_path)
    assert removing == f".out.removing-{os.getpid()}" and os.listdir(tmp_path / removing) == ["config.json"]
    assert caplog.messages == [f"could not remove all of {tmp_path / removing}; the next conversion to this "
                               "destination tries again"]
    convert_checkpoint(grin, destination, to="phimoe", force=True)
    assert_is_output(destination, phimoe_tensors, "phimoe")
    assert hidden_entries(tmp_path) == []


def test_a_kill_between_the_two_renames_is_undone_by_the_same_process(grin, old_output, tmp_path, monkeypatch):
    """While set aside, the old output is in use (no other conversion takes it for a dead run's); after a kill that
    leaves it aside, the next conversion to the destination puts it back."""
    destination, phimoe_tensors = old_output
    rename = os.rename

    def killed_at_the_second_rename(source, target):
        if os.path.basename(target) == "out":  # the new output moving in, or the old one put back: neither happens
            assert conversion._leftovers(destination) == []
            raise KeyboardInterrupt("simulated kill")
        rename(source, target)

    monkeypatch.setattr(os, "rename", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(grin, destination, to="grinmoe", force=True)
    monkeypatch.undo()
    assert not destination.exists()
    assert [name.rsplit("-", 1)[0] for name in hidden_entries(tmp_path)] == [".out.replaced"]
    with pytest.raises(ConversionError, match="exists; pass --force"):
        convert_checkpoint(grin, destination, to="grinmoe")  # the old output is back, so it is not replaced
    assert_is_output(destination, phimoe_tensors, "phimoe")
    assert hidden_entries(tmp_path) == []


def test_a_failed_run_removes_the_parents_it_created_and_only_those(grin, tmp_path, monkeypatch):
    (tmp_path / "existing").mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(conversion, "save_file", disk_full)
    with pytest.raises(ConversionError, match="cannot write .*No space left on device"):
        convert_checkpoint(grin, tmp_path / "existing" / "a" / "b" / "out", to="grinmoe")
    assert os.listdir(tmp_path) == ["existing"] and os.listdir(tmp_path / "existing") == []

    def disk_full_after_someone_wrote_beside(*args, **kwargs):
        (tmp_path / "existing" / "a" / "theirs.txt").write_text("keep me")
        disk_full()

    monkeypatch.setattr(conversion, "save_file", disk_full_after_someone_wrote_beside)
    with pytest.raises(ConversionError, match="cannot write .*No space left on device"):  # (not the cleanup's error)
        convert_checkpoint(grin, tmp_path / "existing" / "a" / "b" / "out", to="grinmoe")
    assert os.listdir(tmp_path / "existing" / "a") == ["theirs.txt"]  # b removed, a kept with what it holds


# ---------------------------------------------------------------------------------------------------------------------
# 4. Nothing outside the source is read


@pytest.mark.parametrize("entry", ["tokenizer.model", "config.json", "model.safetensors"])
def test_links_that_leave_the_source_are_refused(single_file, tmp_path, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / entry
    if entry == "tokenizer.model":
        target.write_text("a secret")
    else:
        (single_file / entry).rename(target)
    (single_file / entry).symlink_to(target)
    with pytest.raises(ConversionError, match=f"{entry} in .* leads outside it"):
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_entries_outside_the_source_are_refused(single_file, tmp_path, entry):
    (single_file / "model.safetensors").rename(tmp_path / "outside.safetensors")
    entry = str(tmp_path / "outside.safetensors") if entry == "ABSOLUTE" else entry
    weights = load_file(tmp_path / "outside.safetensors")
    (single_file / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(weights, entry)}))
    with pytest.raises(ConversionError, match="model.safetensors.index.json entry .* is not a file name inside"):
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")


@pytest.mark.parametrize("entry", [5, "", None])
def test_index_entries_that_are_not_file_names_are_refused(single_file, tmp_path, entry):
    weights = load_file(single_file / "model.safetensors")
    index = single_file / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": dict.fromkeys(weights, entry)}))
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert str(error.value) == f"model.safetensors.index.json entry {entry!r} is not a file name inside {single_file}"


@pytest.mark.parametrize("text, error", [
    ("{", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ('{"metadata": {}}', "'weight_map'"),
    ("[]", "list indices must be integers or slices, not str"),
])  # fmt: skip
def test_an_index_that_is_not_a_weight_map_is_refused(single_file, tmp_path, text, error):
    index = single_file / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(ConversionError) as raised:
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert str(raised.value) == f"{index} is not a safetensors index (a JSON object with a weight_map): {error}"


def test_links_inside_the_source_and_a_hub_cache_snapshot_are_read(single_file, tmp_path):
    repository = tmp_path / "models--org--tiny"
    snapshot = repository / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repository / "blobs").mkdir()
    for file in single_file.iterdir():  # the Hub cache layout: snapshot files link to ../../blobs/HASH
        file.rename(repository / "blobs" / f"hash-{file.name}")
        (snapshot / file.name).symlink_to(f"../../blobs/hash-{file.name}")
    (snapshot / "tokenizer.model").symlink_to("config.json")
    convert_checkpoint(snapshot, tmp_path / "out", to="grinmoe")
    assert (tmp_path / "out" / "tokenizer.model").is_file() and not (tmp_path / "out" / "tokenizer.model").is_symlink()


# ---------------------------------------------------------------------------------------------------------------------
# 5. User errors are one line naming the field, file or flag; --debug shows the traceback


@pytest.mark.parametrize("field", ["num_local_experts", "intermediate_size", "num_hidden_layers", "vocab_size"])
def test_a_missing_size_field_names_it(single_file, tmp_path, capsys, field):
    config = json.loads((single_file / "config.json").read_text())
    del config[field]
    (single_file / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(single_file), str(tmp_path / "out"), "--to", "grinmoe"]) == 2
    assert f"config.json has no {field}" in one_line_error(capsys)


@pytest.mark.parametrize("text, message", [("[1, 2]", "must hold a JSON object, got a list"),
                                           ("{", "is not valid JSON")])
def test_a_config_that_is_not_an_object(single_file, tmp_path, capsys, text, message):
    (single_file / "config.json").write_text(text)
    assert main(["convert", str(single_file), str(tmp_path / "out"), "--to", "grinmoe"]) == 2
    assert message in one_line_error(capsys)


@pytest.mark.parametrize("kind, message", [
    ("file", "{destination} exists and is not a folder; choose another destination"),
    ("link to a folder", "{destination} is a symbolic link; give the folder it points to, or a new one"),
    ("dangling link", "{destination} is a symbolic link; give the folder it points to, or a new one"),
    ("parent is a file", "cannot write"),
])  # fmt: skip
def test_destinations_that_are_not_folders(grin, tmp_path, capsys, kind, message):
    destination = tmp_path / "out"
    if kind == "file":
        destination.write_text("keep me")
    elif kind == "link to a folder":
        (tmp_path / "real").mkdir()
        destination.symlink_to(tmp_path / "real")
    elif kind == "dangling link":
        destination.symlink_to(tmp_path / "nowhere")
    else:
        (tmp_path / "file").write_text("keep me")
        destination = tmp_path / "file" / "out"
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(grin), str(destination), "--to", "grinmoe", "--force"]) == 2
    error = one_line_error(capsys).removeprefix("grin-moe convert: error: ")
    assert error == message.format(destination=destination) if "{" in message else message in error
    assert sorted(os.listdir(tmp_path)) == before


def test_a_full_disk_is_one_line_and_debug_shows_the_traceback(grin, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(conversion, "save_file", disk_full)
    argv = ["convert", str(grin), str(tmp_path / "out"), "--to", "grinmoe"]
    assert main(argv) == 2
    assert "No space left on device" in one_line_error(capsys)
    with pytest.raises(ConversionError, match="No space left on device"):
        main(["--debug", *argv])
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# 6. Every refusal of a source names what is wrong, in full


def test_refusals_of_a_source_in_full(single_file, tmp_path):
    def refusal(source):
        with pytest.raises(ConversionError) as error:
            convert_checkpoint(source, tmp_path / "out", to="grinmoe")
        assert not (tmp_path / "out").exists()
        return str(error.value)

    assert refusal(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'} is not a folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refusal(empty) == f"{empty} has no config.json"
    shutil.copy(single_file / "config.json", empty / "config.json")
    assert refusal(empty) == f"{empty} has no safetensors weights"
    for pickled in ("weights.pt", "weights.pth"):
        (empty / pickled).write_bytes(b"not loaded")
        assert refusal(empty) == (f"{empty} holds only pickle weights, which are never loaded; save them as "
                                  "safetensors")
        (empty / pickled).unlink()
    weights = load_file(single_file / "model.safetensors")
    (single_file / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: f"model-0000{1 + number % 2}-of-00002.safetensors"
                        for number, name in enumerate(weights)}}))  # fmt: skip
    assert refusal(single_file) == (f"{single_file} is missing shard(s) listed in its index: "
                                    "model-00001-of-00002.safetensors, model-00002-of-00002.safetensors")


@pytest.mark.parametrize("entry", ["model.safetensors.index.json", "shard", "config.json", "tokenizer.json"])
def test_a_link_leading_outside_the_source_is_named_in_full(single_file, tmp_path, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    if entry == "shard":
        weights = load_file(single_file / "model.safetensors")
        (single_file / "model.safetensors").rename(outside / "model.safetensors")
        (single_file / "model.safetensors").symlink_to(outside / "model.safetensors")
        index = {"weight_map": dict.fromkeys(weights, "model.safetensors")}
        (single_file / "model.safetensors.index.json").write_text(json.dumps(index))
        named, target = "model.safetensors.index.json entry 'model.safetensors'", outside / "model.safetensors"
    else:
        if entry == "model.safetensors.index.json":
            index = {"weight_map": dict.fromkeys(load_file(single_file / "model.safetensors"), "model.safetensors")}
            (outside / entry).write_text(json.dumps(index))
        elif entry == "config.json":
            (single_file / entry).rename(outside / entry)
        else:
            (outside / entry).write_text("{}")
        (single_file / entry).symlink_to(outside / entry)
        named, target = entry, outside / entry
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert str(error.value) == (f"{named} in {single_file} leads outside it (to {target}); only files inside the "
                                "source are read")


def test_a_dangling_tokenizer_link_is_refused_not_skipped(single_file, tmp_path):
    (single_file / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(ConversionError, match=r"^tokenizer.json in .* leads outside it"):
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")


@pytest.mark.parametrize("layout", ["snapshots without blobs", "blobs without snapshots"])
def test_only_a_hub_cache_layout_lets_links_leave_the_source(tmp_path, layout):
    """Links may lead into `blobs` only from `snapshots/REV` with `blobs` two levels up (the cache layout)."""
    source = tmp_path / "repo" / ("snapshots" if layout.startswith("snapshots") else "models") / "rev"
    source.parent.mkdir(parents=True)
    tiny_model(num_hidden_layers=1).save_pretrained(source)
    target = tmp_path / "repo" / ("elsewhere" if layout.startswith("snapshots") else "blobs")
    target.mkdir()
    (source / "config.json").rename(target / "config.json")
    (source / "config.json").symlink_to(target / "config.json")
    with pytest.raises(ConversionError, match="^config.json in .* leads outside it"):
        convert_checkpoint(source, tmp_path / "out", to="grinmoe")


@pytest.mark.parametrize("value", [0, -1, True, "32", 32.0])
def test_size_fields_must_be_positive_integers(single_file, tmp_path, value):
    config = json.loads((single_file / "config.json").read_text())
    (single_file / "config.json").write_text(json.dumps({**config, "hidden_size": value}))
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert str(error.value) == f"config.json: hidden_size must be a positive integer, got {value!r}"


def test_a_tensor_of_an_unconverted_dtype_and_a_repeated_tensor_are_named(single_file, tmp_path):
    edit_weights(single_file, lambda weights: weights.update(
        {"model.norm.weight": torch.ones(32).to(torch.float8_e4m3fn)}))
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert str(error.value) == "model.norm.weight in model.safetensors has dtype F8_E4M3, which is not converted"
    edit_weights(single_file, lambda weights: weights.update({"model.norm.weight": torch.ones(32)}))
    weights = load_file(single_file / "model.safetensors")  # the norm in both shards, the index naming the second
    save_file(weights, single_file / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"model.norm.weight": weights["model.norm.weight"]}, single_file / "model-00002-of-00002.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    (single_file / "model.safetensors").unlink()
    index = {**dict.fromkeys(weights, "model-00001-of-00002.safetensors"),
             "model.norm.weight": "model-00002-of-00002.safetensors"}  # fmt: skip
    (single_file / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert str(error.value) == "tensor model.norm.weight appears twice in the source"


def test_a_tensor_the_mapping_cannot_take_is_named_with_its_shape(single_file, tmp_path):
    edit_weights(single_file, lambda weights: weights.update(
        {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(48)}))  # 1-D: no expert rows to split
    with pytest.raises(ConversionError, match=r"^model.layers.0.mlp.experts.gate_up_proj with shape \(48,\) cannot "
                                              r"be converted: "):
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")


def test_shard_headers_are_read_as_meta_tensors_and_no_run_stays_in_use(single_file, tmp_path):
    headers = list(conversion._read_tensors([single_file / "model.safetensors"], headers_only=True))
    assert headers and all(tensor.is_meta for _, tensor in headers)
    convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    with pytest.raises(ConversionError):
        convert_checkpoint(single_file, tmp_path / "out", to="grinmoe")
    assert conversion._IN_USE == set()
