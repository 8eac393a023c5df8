"""The folders `grin-moe train` writes, and the checks that keep them from losing or mixing anything.

- A checkpoint is `checkpoint-N/` (N a positive integer) holding `training_state.json`, written last. That file also
  records the size of every other file and the *fingerprint* of the run (model config, tokenizer, data), so a damaged
  or foreign checkpoint is recognised before any training starts.
- Replacing a folder (the final model, a checkpoint) deletes only the files `train` writes; anything else stays.
- Output folders are proven writable before the work starts.
"""

import fnmatch
import hashlib
import json
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}([1-9][0-9]*)")

# Every file `train` writes into a model folder or a checkpoint (transformers' model and tokenizer files, the model
# card and plots, the optimizer and training state): the only entries it deletes when it replaces such a folder.
WRITTEN_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "README.md", "loss_curve.png", "expert_load.png",
    OPTIMIZER_TENSORS, OPTIMIZER_STATE, STATE_FILE,
)
# The files that make up a tokenizer folder, hashed into the fingerprint when a tokenizer is given.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "vocab.json", "merges.txt")
# Where each part of the fingerprint comes from, for the message that names what differs.
_FINGERPRINT_SOURCES = {
    "model config": "--preset / --config / --model",
    "tokenizer": "--tokenizer / --vocab-size",
    "data": "--data / --text-field",
}


def written_by_train(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WRITTEN_FILES)


# ----- fingerprint ---------------------------------------------------------------------------------------------------


def _sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] and ["a", "bc"] differ
        digest.update(part)
    return digest.hexdigest()


def run_fingerprint(source_config, tokenizer_folder: Path | None, vocab_size: int, texts: list[str]) -> dict:
    """What makes a run this run: the config it starts from, its tokenizer, its text (digests, so it stays small)."""
    config = {key: value for key, value in source_config.to_dict().items()
              if key not in ("_name_or_path", "transformers_version")}
    if tokenizer_folder is None:  # trained on the data: the data's digest covers the rest
        tokenizer = _sha256(f"trained, vocab_size {vocab_size}".encode())
    else:
        files = sorted(path for path in Path(tokenizer_folder).iterdir() if path.name in _TOKENIZER_FILES)
        tokenizer = _sha256(*(part for path in files for part in (path.name.encode(), path.read_bytes())))
    return {
        "model config": _sha256(json.dumps(config, sort_keys=True, default=str).encode()),
        "tokenizer": tokenizer,
        "data": _sha256(*(text.encode("utf-8", "surrogatepass") for text in texts)),
    }


# ----- reading checkpoints -------------------------------------------------------------------------------------------


class DamagedCheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or unreadable."""

    def __init__(self, file: Path, reason: str):
        super().__init__(f"{file} {reason}")
        self.file = file


@dataclass(frozen=True)
class ResumePoint:
    folder: Path
    step: int
    losses: list[float]
    fingerprint: dict | None  # None: written before checkpoints carried one


def checkpoint_step(folder: Path) -> int | None:
    """N of a `checkpoint-N` folder name; None for any other name (`checkpoint-final`, `checkpoint-2.bak`)."""
    match = _CHECKPOINT_NAME.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-N/` folders holding a training state, newest (largest N) first."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if checkpoint_step(path) and (path / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step, reverse=True)


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpointError(file, "is missing") from None
    except (OSError, ValueError) as error:
        raise DamagedCheckpointError(file, f"is not readable JSON ({error})") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_state(folder: Path) -> dict:
    state_file = folder / STATE_FILE
    state = _read_json(state_file)
    step = state.get("step") if isinstance(state, dict) else None
    if not (isinstance(step, int) and not isinstance(step, bool) and step == checkpoint_step(folder)):
        raise DamagedCheckpointError(state_file, f"holds step {step!r}, not the folder's {checkpoint_step(folder)}")
    losses = state.get("losses")
    if not (isinstance(losses, list) and len(losses) == step and all(map(_is_number, losses))):
        raise DamagedCheckpointError(state_file, f"does not hold {step} losses, one per step")
    return state


def _check_files(folder: Path, recorded_sizes: dict | None) -> None:
    """Sizes as recorded when the checkpoint was written (catches truncation), and every file parses."""
    for name, size in (recorded_sizes or {}).items():
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpointError(path, "is missing")
        if path.stat().st_size != size:
            raise DamagedCheckpointError(path, f"has {path.stat().st_size} bytes, {size} were written")
    for name in ("config.json", OPTIMIZER_STATE, OPTIMIZER_TENSORS):
        if not (folder / name).is_file():
            raise DamagedCheckpointError(folder / name, "is missing")
    for path in sorted(folder.glob("*.json")):
        _read_json(path)
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):  # reads the header and checks that the file covers every tensor in it
                pass
        except (OSError, SafetensorError) as error:
            raise DamagedCheckpointError(path, f"is not a complete safetensors file ({error})") from None


def read_checkpoint(folder: Path) -> ResumePoint:
    """The resume point a checkpoint holds; `DamagedCheckpointError` naming the file when it is damaged."""
    state = _read_state(folder)
    _check_files(folder, state.get("files"))
    return ResumePoint(folder, state["step"], state["losses"], state.get("fingerprint"))


def find_resume_point(output_dir: Path, warn: bool = True) -> ResumePoint:
    """The newest undamaged checkpoint; a damaged newer one is skipped with a warning naming the damaged file."""
    damaged = []
    for folder in complete_checkpoints(output_dir):
        try:
            point = read_checkpoint(folder)
        except DamagedCheckpointError as error:
            damaged.append(str(error))
            continue
        if damaged and warn:
            warnings.warn(f"resuming from {folder.name}: newer checkpoints are damaged ({'; '.join(damaged)})",
                          stacklevel=3)
        return point
    reason = f": {'; '.join(damaged)}" if damaged else ""
    raise ValueError(f"resume requested but {output_dir} holds no complete {CHECKPOINT_PREFIX}N folder{reason}")


def check_resume_point(point: ResumePoint, fingerprint: dict, steps: int, warn: bool = True) -> None:
    """Refuse (`ValueError`, one line) a checkpoint of another run, or one that already reached `steps`."""
    if point.fingerprint is None:
        if warn:
            warnings.warn(f"{point.folder} carries no run fingerprint (written by an older version): cannot check "
                          "that it belongs to this run", stacklevel=3)
    else:
        differing = [key for key in _FINGERPRINT_SOURCES if point.fingerprint.get(key) != fingerprint[key]]
        if differing:
            what = ", ".join(f"{key} ({_FINGERPRINT_SOURCES[key]})" for key in differing)
            raise ValueError(f"--resume: {point.folder} belongs to another run; its {what} differ from this run's. "
                             "Rerun with that run's arguments, or train into a new --output-dir")
    if steps <= point.step:
        raise ValueError(f"--resume: {point.folder} has trained {point.step} steps already; pass --steps above "
                         f"{point.step} to train further (got {steps}; nothing was trained or written)")


def state_record(folder: Path, step: int, losses: list[float], fingerprint: dict) -> dict:
    """The content of `training_state.json`, given the folder's other files (already written)."""
    sizes = {path.name: path.stat().st_size for path in sorted(folder.iterdir())
             if path.is_file() and path.name != STATE_FILE}
    return {"step": step, "losses": losses, "fingerprint": fingerprint, "files": sizes}


# ----- writing folders -----------------------------------------------------------------------------------------------


def require_writable_folder(folder: Path, what: str) -> None:
    """Fail now, in one line, when `folder` could not be written at the end of the run. Creates nothing: the check
    probes the folder, or the nearest existing folder above it, with a temporary file."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f" ({existing} is a file)"
        raise NotADirectoryError(f"{what} {folder} is not a folder{where}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PermissionError(f"{what} {folder} is not writable ({existing}: {error.strerror or error})") from None


def replace_folder(temporary: Path, folder: Path) -> None:
    """Put the freshly written `temporary` folder in `folder`'s place.

    A new folder is renamed into place whole. An existing one loses only the files `train` writes (older weights,
    shards of another layout), then receives the new files, `config.json` last, so it does not look loadable before
    it is; anything else in it (a user's notes, a sub-folder) is kept.
    """
    if not folder.exists():
        temporary.rename(folder)
        return
    for entry in folder.iterdir():
        if written_by_train(entry.name) and (entry.is_file() or entry.is_symlink()):
            entry.unlink()
    for entry in sorted(temporary.iterdir(), key=lambda path: path.name == "config.json"):
        entry.replace(folder / entry.name)
    temporary.rmdir()
