"""Streaming checkpoint conversion between GRIN-MoE, Phi-3.5-MoE / transformers Phimoe and this package's format.

All three store the same tensors under the released per-expert names (`block_sparse_moe.experts.N.w1/w2/w3`,
`block_sparse_moe.gate`); what differs is the config (`model_type`, architectures, remote-code `auto_map`, RoPE
defaults). Checkpoints holding fused 3-D experts (`mlp.experts.gate_up_proj`, `mlp.router`) are split back to the
per-expert names. Tensors are read lazily shard by shard and written in shards of at most `max_shard_size`, so peak
memory is about one output shard. Only safetensors are read; pickles never are.

A conversion refuses bad input before it writes anything and loses nothing (docs/conversion.md lists the guarantees):

- Every tensor the config implies is checked for presence, shape and dtype from the shard headers alone, by running
  the same name/shape mapping on meta tensors and comparing with the target model built on the meta device.
- Only files inside the source folder are read: symbolic links and index entries that lead outside it are refused.
- The output is written to `.DST.converting-PID` beside the destination. An existing destination is replaced (with
  `force`) only if it is a previous output of this module, recognised by the `written_by` entry in its safetensors
  metadata; the swap renames the old folder aside, renames the new one into place, then deletes the old one, so a
  kill at any moment leaves the old or the new destination complete. Leftovers of dead runs are cleaned (or, for an
  old output set aside just before the kill, restored) by the next conversion to the same destination.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TARGETS = ("grinmoe", "phimoe")
_DEFAULT_ROPE_THETA = {"grinmoe": 10000.0, "phimoe": 1000000.0}  # each config class's default when the file has none
_OUR_ONLY_FIELDS = ("router_type", "router_renormalize", "experts_implementation", "router_precision", "aux_loss_type")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The sizes that decide the tensors' shapes must be spelled out in config.json: the config classes' defaults differ
# from each other and from the released model, so a missing one would silently describe another model.
_MOE_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_local_experts")
_DENSE_SIZE_FIELDS = _MOE_SIZE_FIELDS[:-1]
_EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model")


class ConversionError(ValueError):
    """A checkpoint or a request that cannot be converted; nothing was written."""


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '64KiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or a number of bytes")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** "_KMGT".index(unit or "_"))


def _require_sizes(config: dict, fields: tuple[str, ...]) -> None:
    for field in fields:
        if field not in config:
            raise ConversionError(f"config.json has no {field}; it decides the shapes of the tensors")
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"config.json: {field} must be a positive integer, got {value!r}")


def _config_object(config: dict):
    """The transformers config object of a config dict (its `model_type` picks the class, which validates it)."""
    from transformers import AutoConfig

    fields = {key: value for key, value in config.items() if key not in ("model_type", "architectures")}
    return AutoConfig.for_model(config["model_type"], **fields)


def _spell_out_defaults(output: dict, source_type: str, to: str) -> None:
    """Write into `output` the source class's default of every field the file leaves out and the target class
    defaults differently: GRIN's attention and LM-head biases, sliding window, context length, ... would otherwise
    change meaning on the way (Phimoe's defaults are no biases and no window)."""
    from transformers import CONFIG_MAPPING

    target_defaults = {field.name: field.default for field in dataclasses.fields(CONFIG_MAPPING[to])}
    for field in dataclasses.fields(CONFIG_MAPPING[source_type]):
        if field.name in target_defaults and field.name not in output and field.default != target_defaults[field.name]:
            output[field.name] = field.default


def translate_config(config: dict, to: str, dtype: str | None = None) -> dict:
    """The source `config.json` rewritten for the target format, validated by the target's config class."""
    if to not in TARGETS:
        raise ConversionError(f"--to must be one of {TARGETS}, got {to!r}")
    source_type = config.get("model_type")
    if source_type not in TARGETS:
        raise ConversionError(f"source model_type {source_type!r} is not a GRIN-MoE/Phi-3.5-MoE checkpoint ({TARGETS})")
    _require_sizes(config, _MOE_SIZE_FIELDS)
    output = {key: value for key, value in config.items() if key not in ("auto_map", "_name_or_path")}
    if "rope_theta" not in output and not output.get("rope_parameters") and not output.get("rope_scaling"):
        output["rope_theta"] = _DEFAULT_ROPE_THETA[source_type]  # keep the source's meaning explicit
    if source_type != to:
        _spell_out_defaults(output, source_type, to)
    if dtype is not None:
        output["dtype"] = dtype
        output.pop("torch_dtype", None)
    if to == "phimoe":
        if output.get("bitnet"):
            raise ConversionError("transformers' Phimoe has no ternary weights; this model was trained with "
                                  "bitnet=True (export it with modeling_grin.bitnet_export instead)")
        if output.get("router_type", "sparsemixer_v2") != "sparsemixer_v2":
            raise ConversionError("transformers' Phimoe routes only with SparseMixer; this model uses softmax_topk")
        if output.get("num_experts_per_tok", 2) != 2:
            raise ConversionError("transformers' Phimoe always routes to 2 experts; this model uses "
                                  f"num_experts_per_tok={output['num_experts_per_tok']}")
        for key in _OUR_ONLY_FIELDS:
            output.pop(key, None)
        if output.get("head_dim") is None:
            output.pop("head_dim", None)
        output.update(model_type="phimoe", architectures=["PhimoeForCausalLM"])
    else:
        output.update(model_type="grinmoe", architectures=["GrinMoeForCausalLM"])
    try:
        _config_object(output)
    except Exception as error:  # the target's own validation, reported as a conversion error
        raise ConversionError(f"the translated config is not a valid {to} config: {error}") from error
    return output


# ---------------------------------------------------------------------------------------------------------------------
# Reading the source: only files inside it, only safetensors


def _allowed_roots(source: Path) -> list[Path]:
    """Where the files of `source` may really live: the folder itself and, for a Hugging Face cache snapshot
    (`models--ORG--NAME/snapshots/REVISION`, whose files are links to `../../blobs/HASH`), that repository's blobs."""
    root = source.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append(root.parent.parent / "blobs")
    return roots


def _confined(source: Path, path: Path, entry: str) -> Path:
    """`path` itself, after checking that it (links resolved) lies inside `source`; `entry` names it in the error."""
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in _allowed_roots(source)):
        raise ConversionError(f"{entry} in {source} leads outside it (to {real}); only files inside the source are "
                              "read")
    return path


def _read_config(source: Path) -> dict:
    if not source.is_dir():
        raise ConversionError(f"{source} is not a folder")
    path = source / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source} has no config.json")
    _confined(source, path, "config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # invalid JSON or not UTF-8
        raise ConversionError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object, got a {type(config).__name__}")
    return config


def _index_shard_names(source: Path, index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConversionError(f"{index} is not a safetensors index (a JSON object with a weight_map): "
                              f"{error}") from None
    for name in names:
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConversionError(f"{index.name} entry {name!r} is not a file name inside {source}")
    return names


def _source_shards(source: Path) -> list[Path]:
    index = source / "model.safetensors.index.json"
    if index.is_file():
        _confined(source, index, index.name)
        shards = [_confined(source, source / name, f"{index.name} entry {name!r}")
                  for name in _index_shard_names(source, index)]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise ConversionError(f"{source} is missing shard(s) listed in its index: {', '.join(missing)}")
        return shards
    if (source / "model.safetensors").is_file():
        return [_confined(source, source / "model.safetensors", "model.safetensors")]
    if any(source.glob("*.bin")) or any(source.glob("*.pt")) or any(source.glob("*.pth")):
        raise ConversionError(f"{source} holds only pickle weights, which are never loaded; save them as safetensors")
    raise ConversionError(f"{source} has no safetensors weights")


def _extra_files(source: Path) -> list[Path]:
    """The tokenizer and generation files to copy along (regular files inside the source only)."""
    extras = []
    for name in _EXTRA_FILES:
        path = source / name
        if path.is_symlink() or path.exists():
            _confined(source, path, name)
            if path.is_file():
                extras.append(path)
    return extras


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
# Old checkpoints saved the rotary inverse frequencies; the model recomputes them from the config.
_RECOMPUTED_BUFFERS = re.compile(r"\.rotary_emb\.(original_)?inv_freq$")


def _read_tensors(shards: list[Path], headers_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the source, lazily, shard by shard; with `headers_only`, meta tensors of the same shape
    and dtype, read from the shard headers without loading any data. Unreadable shards become a `ConversionError`."""
    for shard in shards if headers_only else tqdm(shards, desc="converting shards", unit="shard"):
        try:
            with safe_open(shard, framework="pt") as reader:
                for name in list(reader.keys()):
                    if _RECOMPUTED_BUFFERS.search(name):
                        continue
                    if not headers_only:
                        yield name, reader.get_tensor(name)
                        continue
                    header = reader.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(header.get_dtype())
                    if dtype is None:
                        raise ConversionError(f"{name} in {shard.name} has dtype {header.get_dtype()}, which is not "
                                              "converted")
                    yield name, torch.empty(header.get_shape(), dtype=dtype, device="meta")
        except ConversionError:
            raise
        except Exception as error:  # truncated, corrupt or not safetensors
            raise ConversionError(f"cannot read {shard.name}: {error}") from error


def _released_tensors(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the released per-expert name(s) for one source tensor (fused 3-D experts are split)."""
    if name.endswith(".mlp.experts.gate_up_proj"):
        prefix = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts"
        for expert, weight in enumerate(tensor):
            gate, up = weight.chunk(2, dim=0)
            yield f"{prefix}.{expert}.w1.weight", gate.contiguous()
            yield f"{prefix}.{expert}.w3.weight", up.contiguous()
    elif name.endswith(".mlp.experts.down_proj"):
        prefix = name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts"
        for expert, weight in enumerate(tensor):
            yield f"{prefix}.{expert}.w2.weight", weight.contiguous()
    elif name.endswith(".mlp.router.weight"):
        yield name.replace(".mlp.router.weight", ".block_sparse_moe.gate.weight"), tensor
    else:
        yield name, tensor


# ---------------------------------------------------------------------------------------------------------------------
# Checking the whole output before writing any of it

# One source tensor -> the output tensors it becomes (the conversion's or the upcycling's mapping).
Transform = Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]
_EXPERT_KEY = re.compile(r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.")


def _cast(tensor: torch.Tensor, dtype: str | None) -> torch.Tensor:
    return tensor.to(_DTYPES[dtype]) if dtype is not None and tensor.is_floating_point() else tensor


def _planned_output(shards: list[Path], transform: Transform, dtype: str | None) -> dict:
    """What the conversion will write, from the shard headers alone: name -> (shape, dtype, source tensor name).

    The same `transform` runs on meta tensors here and on the real ones later, so the plan is what gets written.
    """
    plan = {}
    for source_name, meta in _read_tensors(shards, headers_only=True):
        try:
            outputs = list(transform(source_name, meta))
        except ConversionError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            raise ConversionError(f"{source_name} with shape {tuple(meta.shape)} cannot be converted: "
                                  f"{error}") from None
        for name, tensor in outputs:
            if name in plan:
                raise ConversionError(f"tensor {name} appears twice in the source")
            plan[name] = (tuple(tensor.shape), _cast(tensor, dtype).dtype, source_name)
    return plan


def _expected_tensors(config: dict) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Name -> shape of every tensor of the model `config` describes, in the released per-expert layout (its target
    class built on the meta device), and the names that may be absent (a tied `lm_head`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config_object(config))
    expected = {
        name: tuple(tensor.shape)
        for key, parameter in model.state_dict().items()
        for name, tensor in _released_tensors(key, parameter)
    }
    optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    return expected, optional


def _described(name: str, origin: str) -> str:
    return name if name == origin else f"{name} (from {origin})"


def _unexpected_tensor(name: str, origin: str, config: dict) -> str:
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    layer, expert = _LAYER_KEY.search(name), _EXPERT_KEY.search(name)
    if layer and int(layer.group(1)) >= layers:
        return f"{_described(name, origin)}: layer {layer.group(1)} but the config has num_hidden_layers={layers}"
    if expert and int(expert.group(2)) >= experts:
        return f"{_described(name, origin)}: expert {expert.group(2)} but the config has num_local_experts={experts}"
    return f"{_described(name, origin)} is not a tensor of the model the config describes"


def _check_plan(plan: dict, config: dict) -> None:
    """Every tensor the config implies is planned with its shape and a floating dtype, and nothing else is."""
    expected, optional = _expected_tensors(config)
    for name, (_, _, origin) in plan.items():
        if name not in expected:
            raise ConversionError(_unexpected_tensor(name, origin, config))
    for name, (shape, dtype, origin) in plan.items():
        if shape != expected[name]:
            raise ConversionError(f"{_described(name, origin)} has shape {shape}, the config implies {expected[name]}")
        if not dtype.is_floating_point:
            raise ConversionError(f"{_described(name, origin)} has dtype {dtype}; weights must be floating point")
    missing = [name for name in expected if name not in plan and name not in optional]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{missing[0]}{more} is missing from the source; the config implies it with shape "
                              f"{expected[missing[0]]} ({config['num_hidden_layers']} layers x "
                              f"{config['num_local_experts']} experts)")


# ---------------------------------------------------------------------------------------------------------------------
# The destination: what may be replaced, and how, so that nothing is ever lost

# Our outputs carry this entry in every shard's safetensors metadata: `force` replaces only folders that do.
_WRITTEN_BY = ("written_by", "modeling_grin.conversion")
# The names a conversion writes (`part-N` while it is still writing); a folder holding anything else is not ours.
_OUR_FILE_NAMES = re.compile(
    r"config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors|part-\d{5}\.safetensors|"
    + "|".join(re.escape(name) for name in _EXTRA_FILES)
)
# Hidden siblings of a destination DST that a run makes, each named `.DST.KIND-PID`:
#   converting: the new output being written;  replaced: the old output, complete, set aside for the swap;
#   removing: the old output being deleted after the swap.
_LEFTOVER_KINDS = ("converting", "replaced", "removing")
_IN_USE: set[Path] = set()  # this process's own leftovers that a conversion is using right now


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link exists too


def _sibling(destination: Path, kind: str) -> Path:
    return destination.parent / f".{destination.name}.{kind}-{os.getpid()}"


def _written_by_us(shard: Path) -> bool:
    try:
        with safe_open(shard, framework="pt") as reader:
            return (reader.metadata() or {}).get(_WRITTEN_BY[0]) == _WRITTEN_BY[1]
    except Exception:  # unreadable: not a shard we finished
        return False


def _why_not_ours(folder: Path, finished: bool = True) -> str | None:
    """None if `folder` holds only what a conversion writes (with our metadata, when `finished`), else the reason."""
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            return f"{entry.name} is not a regular file"
        if not _OUR_FILE_NAMES.fullmatch(entry.name):
            return f"it holds {entry.name}"
        if finished and entry.suffix == ".safetensors" and not _written_by_us(entry):
            return f"{entry.name} has no written_by={_WRITTEN_BY[1]} metadata"
    return None


def _pid_is_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would signal the process on Windows: never take a run for dead there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _leftovers(destination: Path) -> list[tuple[Path, str]]:
    """(path, kind) of the leftovers of dead runs beside `destination`, newest first."""
    pattern = re.compile(rf"\.{re.escape(destination.name)}\.({'|'.join(_LEFTOVER_KINDS)})-(\d+)")
    if not destination.parent.is_dir():
        return []
    found = []
    for entry in destination.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match.group(2))
        dead = entry not in _IN_USE if pid == os.getpid() else not _pid_is_alive(pid)
        if dead:
            found.append((entry, match.group(1)))
    return sorted(found, key=lambda item: item[0].stat().st_mtime, reverse=True)


def _delete_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if _exists(path):
        logger.warning("could not remove all of %s; the next conversion to this destination tries again", path)


def _clean_leftovers(destination: Path) -> None:
    """Finish what killed runs left beside `destination`: an old output set aside for a swap that never happened is
    put back when the destination is missing; partial outputs and half-deleted old ones are removed."""
    for path, kind in _leftovers(destination):
        if kind == "replaced" and not _exists(destination):
            os.rename(path, destination)
            logger.warning("restored %s from %s (a conversion was killed while replacing it)", destination, path.name)
        elif _why_not_ours(path, finished=kind == "replaced") is None:
            _delete_folder(path)
            logger.warning("removed %s, left by a conversion that did not finish", path)
        else:
            logger.warning("left %s alone: it holds files a conversion does not write", path)


def _check_replaceable(destination: Path, force: bool, changed: bool = False) -> None:
    """Refuse an existing `destination` unless `force` is given and it is a previous output of ours (or empty)."""
    suffix = " (it appeared or changed while converting; it was left alone)" if changed else ""
    if destination.is_symlink():
        raise ConversionError(f"{destination} is a symbolic link; choose another destination{suffix}")
    if not destination.is_dir():
        raise ConversionError(f"{destination} exists and is not a folder; choose another destination{suffix}")
    if not force:
        raise ConversionError(f"{destination} exists; pass --force to replace it (only a previous output of grin-moe "
                              f"convert or upcycle can be replaced){suffix}")
    reason = _why_not_ours(destination)
    if reason is not None:
        raise ConversionError(f"{destination} is not an output of grin-moe convert or upcycle ({reason}); --force "
                              f"replaces only those: move it away or choose another destination{suffix}")


def _check_destination(source: Path, destination: Path, force: bool) -> None:
    """Refuse, before any work, a destination whose replacement could lose something; clean up after dead runs."""
    if destination.is_symlink():
        raise ConversionError(f"{destination} is a symbolic link; give the folder it points to, or a new one")
    target, source_folder, here = destination.resolve(), source.resolve(), Path.cwd().resolve()
    if here.is_relative_to(target):
        raise ConversionError(f"{destination} is the current directory or holds it; choose a new folder")
    if target == source_folder:
        raise ConversionError(f"{destination} is the source folder; choose a new folder")
    if source_folder.is_relative_to(target):
        raise ConversionError(f"{destination} holds the source {source}; choose a new folder")
    if target.is_relative_to(source_folder):
        raise ConversionError(f"{destination} is inside the source {source}; write the output elsewhere")
    _clean_leftovers(destination)
    if _exists(destination):
        _check_replaceable(destination, force)


def _publish(temporary: Path, destination: Path, force: bool) -> None:
    """Move the finished output into place. The old destination is renamed aside, the new one renamed into place,
    and only then is the old one deleted: a kill at any moment leaves the old or the new one complete (a kill between
    the two renames leaves the old one aside, which the next run puts back)."""
    aside = None
    if _exists(destination):
        _check_replaceable(destination, force, changed=True)
        aside = _sibling(destination, "replaced")
        _IN_USE.add(aside)
        os.rename(destination, aside)
    try:
        try:
            os.rename(temporary, destination)
        except BaseException:
            if aside is not None:
                os.rename(aside, destination)  # put the old output back
            raise
        if aside is not None:
            removing = _sibling(destination, "removing")
            os.rename(aside, removing)  # from here on it is garbage for the next run, never an output to restore
            _delete_folder(removing)
    finally:
        _IN_USE.discard(aside)


def _make_parents(folder: Path, created: list[Path]) -> None:
    """Create `folder` and its missing parents, recording in `created` those this run made (outermost first)."""
    missing = []
    while not _exists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def _remove_created(temporary: Path, created: list[Path]) -> None:
    """Undo a failed run: its temporary folder and the parents it created (when they are still empty)."""
    shutil.rmtree(temporary, ignore_errors=True)
    with contextlib.suppress(OSError):  # a folder someone else has put something in meanwhile stays, with its parents
        for path in reversed(created):
            path.rmdir()


# ---------------------------------------------------------------------------------------------------------------------
# Converting and writing


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _check_dtype_name(dtype: str | None) -> None:
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def _absolute(path: str | Path) -> Path:
    """`path` made absolute without following links, so that `.` has a name and a parent."""
    return Path(os.path.abspath(path))


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    to: str,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    verify: bool = False,
) -> dict:
    """Convert the checkpoint folder `source` into `destination` in format `to`; returns a summary.

    Raises `ConversionError` (a `ValueError`) with a clear message, leaving no partial destination. `force` replaces
    only a previous output of `convert_checkpoint` / `upcycle_checkpoint`.
    """
    source, destination = _absolute(source), _absolute(destination)
    _check_dtype_name(dtype)
    config = translate_config(_read_config(source), to, dtype)
    return _write_checkpoint(source, destination, config, _released_tensors, dtype, max_shard_size, force, verify)


# --verify compares logits of source and result only below this size (both models are loaded in fp32 on the CPU).
VERIFY_LOGITS_MAX_BYTES = 2 * 2**30


def logits_difference(source: Path, result: Path, seed: int = 0) -> float:
    """Max |logits difference| / max |source logits| of the two checkpoints on random tokens, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(result, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(reference.config.vocab_size, (2, 16), generator=generator)
    with torch.no_grad():
        expected = reference(input_ids).logits
        return ((converted(input_ids).logits - expected).abs().max() / expected.abs().max()).item()


def _verify_written(source: Path, folder: Path, manifest: dict, dtype: str | None, same_function: bool) -> float | None:
    """`--verify`: the tensors re-read, then (when small enough and meant to be equal) the logits compared."""
    verify_checkpoint(folder, manifest)
    if not same_function or sum(entry["bytes"] for entry in manifest.values()) > VERIFY_LOGITS_MAX_BYTES:
        return None
    try:
        difference = logits_difference(source, folder)
    except Exception as error:  # the checks above make this unlikely; report it as what it is
        raise ConversionError(f"verify: the source or the written checkpoint does not run: {error}") from error
    tolerance = 5e-2 if dtype in ("bfloat16", "float16") else 1e-4
    if not difference <= tolerance:
        raise ConversionError(f"verify: logits differ from the source by {difference:.2e} (relative), above "
                              f"{tolerance:.0e}")
    return difference


def _write_checkpoint(source: Path, destination: Path, config: dict, transform: Transform, dtype: str | None,
                      max_shard_size: str | int, force: bool, verify: bool, same_function: bool = True) -> dict:
    """Check everything, then write `config` and the transformed source tensors into `destination` (see the module
    note); returns a summary.

    With `verify`, the written tensors are re-read and, when the model is small enough and `same_function` holds,
    its logits are compared with the source's (within 1e-4 relative, or 5e-2 after a cast to 16-bit).
    """
    limit = parse_size(max_shard_size)
    shards, extras = _source_shards(source), _extra_files(source)
    plan = _planned_output(shards, transform, dtype)
    _check_plan(plan, config)
    _check_destination(source, destination, force)

    temporary, created = _sibling(destination, "converting"), []
    _IN_USE.add(temporary)
    try:
        _make_parents(destination.parent, created)
        temporary.mkdir()
        tensors = (output for name, tensor in _read_tensors(shards) for output in transform(name, tensor))
        manifest = _write_shards(tensors, temporary, plan, dtype, limit)
        (temporary / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for extra in extras:
            shutil.copyfile(extra, temporary / extra.name)
        logits_check = _verify_written(source, temporary, manifest, dtype, same_function) if verify else None
        _publish(temporary, destination, force)
    except (OSError, SafetensorError) as error:  # a read-only or full disk, a parent that is a file...
        _remove_created(temporary, created)
        raise ConversionError(f"cannot write {destination}: {error}") from error
    except BaseException:
        _remove_created(temporary, created)
        raise
    finally:
        _IN_USE.discard(temporary)
    return {"tensors": len(manifest), "bytes": sum(entry["bytes"] for entry in manifest.values()),
            "shards": len({entry["file"] for entry in manifest.values()}), "verified": verify,
            "logits_difference": logits_check}


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, plan: dict, dtype: str | None,
                  limit: int) -> dict:
    manifest, pending, pending_bytes, written = {}, {}, 0, []

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            path = folder / f"part-{len(written) + 1:05d}.safetensors"
            save_file(pending, path, metadata={"format": "pt", _WRITTEN_BY[0]: _WRITTEN_BY[1]})
            for name in pending:
                manifest[name]["file"] = path.name
            written.append(path)
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        tensor = _cast(tensor, dtype)
        if plan.get(name, (None, None))[:2] != (tuple(tensor.shape), tensor.dtype) or name in manifest:
            raise ConversionError(f"{name} is not what the source's headers announced; did the source change while "
                                  "converting?")
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > limit:
            flush()
        pending[name] = tensor
        pending_bytes += size
        manifest[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype), "bytes": size,
                          "sha256": _checksum(tensor)}
    flush()
    if manifest.keys() != plan.keys():
        raise ConversionError("the source no longer holds what its headers announced; did it change while converting?")

    total = len(written)
    weight_map = {}
    for number, path in enumerate(written, start=1):
        final = path.with_name(f"model-{number:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors")
        path.rename(final)
        for name, entry in manifest.items():
            if entry["file"] == path.name:
                entry["file"] = final.name
                weight_map[name] = final.name
    if total > 1:
        index = {"metadata": {"total_size": sum(e["bytes"] for e in manifest.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_checkpoint(folder: str | Path, manifest: dict) -> None:
    """Every tensor of `manifest` is in `folder` with its shape, dtype and checksum; nothing else is."""
    folder = Path(folder)
    seen = set()
    for shard in _source_shards(folder):
        with safe_open(shard, framework="pt") as reader:
            for name in reader.keys():
                entry = manifest.get(name)
                if entry is None:
                    raise ConversionError(f"verify: unexpected tensor {name} in {shard.name}")
                tensor = reader.get_tensor(name)
                if list(tensor.shape) != entry["shape"] or str(tensor.dtype) != entry["dtype"]:
                    raise ConversionError(f"verify: {name} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                                          f"{tuple(entry['shape'])} {entry['dtype']}")
                if _checksum(tensor) != entry["sha256"]:
                    raise ConversionError(f"verify: checksum of {name} differs")
                seen.add(name)
    missing = set(manifest) - seen
    if missing:
        raise ConversionError(f"verify: {len(missing)} tensor(s) missing, e.g. {sorted(missing)[0]}")


# ---------------------------------------------------------------------------------------------------------------------
# Sparse upcycling: a dense Llama / Mistral / Phi-3 checkpoint becomes a GRIN-MoE whose experts all start as its MLP.

UPCYCLE_SOURCES = ("llama", "mistral", "phi3")
_DENSE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
    "attention_dropout", "sliding_window", "dtype", "torch_dtype",
)
_DENSE_DEFAULTED_FIELDS = (
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_dropout",
)


def upcycled_config(dense: dict, num_experts: int, top_k: int, router_type: str, dtype: str | None = None) -> dict:
    """The GRIN-MoE config of a dense model upcycled to `num_experts` copies of its MLP."""
    if dense.get("model_type") not in UPCYCLE_SOURCES:
        raise ConversionError(f"upcycling reads {', '.join(UPCYCLE_SOURCES)} checkpoints, got "
                              f"model_type {dense.get('model_type')!r}")
    _require_sizes(dense, _DENSE_SIZE_FIELDS)
    if dense.get("mlp_bias"):  # GRIN-MoE's experts have no biases: the MLP's could not be carried over
        raise ConversionError("config.json has mlp_bias=true, but GRIN-MoE experts have no biases; upcycling would "
                              "drop them")
    try:
        dense_object = _config_object(dense)
    except Exception as error:
        raise ConversionError(f"config.json is not a valid {dense['model_type']} config: {error}") from error
    config = {key: dense[key] for key in _DENSE_FIELDS if key in dense}
    # A field the file leaves out means the dense class's default, which GRIN-MoE's may not share (Mistral's 8 key/value
    # heads and 4,096-token window, Llama's as many key/value heads as query heads and 1e-6 norm eps, ...).
    for key in _DENSE_DEFAULTED_FIELDS:
        if key not in config and getattr(dense_object, key, None) is not None:
            config[key] = getattr(dense_object, key)
    if "rope_theta" not in config and not config.get("rope_parameters") and not config.get("rope_scaling"):
        config["rope_theta"] = 10000.0  # the dense classes' default
    config.update(
        model_type="grinmoe", architectures=["GrinMoeForCausalLM"], norm_type="rmsnorm",
        attention_bias=bool(getattr(dense_object, "attention_bias", False)), lm_head_bias=False,
        sliding_window=getattr(dense_object, "sliding_window", None), num_local_experts=num_experts,
        num_experts_per_tok=top_k, router_type=router_type, router_renormalize=True, input_jitter_noise=0.0,
    )
    if dtype is not None:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    try:
        _config_object(config)
    except Exception as error:
        raise ConversionError(f"the upcycled config is not a valid grinmoe config: {error}") from error
    return config


_DENSE_MLP = re.compile(r"^(model\.layers\.(\d+))\.mlp\.(gate_proj|up_proj|down_proj|gate_up_proj)\.weight$")
_FUSED_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn)\.qkv_proj\.weight$")  # (Phi-3 has no qkv bias)


def _check_fused_shape(name: str, tensor: torch.Tensor, rows: int, config: dict) -> None:
    """A fused Phi-3 matrix must have the rows the config implies before it is split."""
    expected = (rows, config["hidden_size"])
    if tuple(tensor.shape) != expected:
        raise ConversionError(f"{name} has shape {tuple(tensor.shape)}, the config implies {expected}")


def _upcycled_tensors(
    name: str, tensor: torch.Tensor, config: dict, noise_std: float, router_init_std: float, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    qkv = _FUSED_QKV.match(name)
    if qkv:  # Phi-3 fuses q, k and v
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        sizes = [config["num_attention_heads"] * head_dim] + [config["num_key_value_heads"] * head_dim] * 2
        _check_fused_shape(name, tensor, sum(sizes), config)
        for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes, dim=0), strict=True):
            yield f"{qkv.group(1)}.{projection}.weight", part.contiguous()
        return
    mlp = _DENSE_MLP.match(name)
    if not mlp:
        yield name, tensor
        return
    prefix, layer, matrix = mlp.group(1), int(mlp.group(2)), mlp.group(3)
    if matrix == "gate_up_proj":  # Phi-3 fuses gate and up
        _check_fused_shape(name, tensor, 2 * config["intermediate_size"], config)
        gate, up = tensor.chunk(2, dim=0)
        yield from _upcycled_tensors(f"{prefix}.mlp.gate_proj.weight", gate.contiguous(), config, noise_std,
                                     router_init_std, seed)
        yield from _upcycled_tensors(f"{prefix}.mlp.up_proj.weight", up.contiguous(), config, noise_std,
                                     router_init_std, seed)
        return
    expert_name = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[matrix]
    matrix_id = ("gate_proj", "up_proj", "down_proj").index(matrix)
    # Meta tensors (the planning pass) have no values to measure; only names and shapes matter there.
    scale = 0.0 if tensor.is_meta or noise_std == 0 else noise_std * tensor.float().std().item()
    for expert in range(config["num_local_experts"]):
        weight = tensor.clone()  # safetensors stores no shared memory; each copy counts towards its shard's size
        if scale > 0:  # seeded per (layer, expert, matrix), so the result does not depend on shard order
            generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + expert * 3 + matrix_id)
            weight = (tensor.float() + scale * torch.randn(tensor.shape, generator=generator)).to(tensor.dtype)
        yield f"{prefix}.block_sparse_moe.experts.{expert}.{expert_name}.weight", weight
    if matrix == "down_proj":
        generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        router = torch.randn(config["num_local_experts"], config["hidden_size"], generator=generator) * router_init_std
        yield f"{prefix}.block_sparse_moe.gate.weight", router.to(tensor.dtype)


def _check_std(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConversionError(f"{name} must be a finite number >= 0, got {value!r}")


def upcycle_checkpoint(
    source: str | Path,
    destination: str | Path,
    num_experts: int,
    top_k: int,
    router_type: str = "softmax_topk",
    noise_std: float = 0.0,
    router_init_std: float = 0.02,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    verify: bool = False,
) -> dict:
    """Sparse upcycling: every expert of every layer starts as the dense checkpoint's MLP (plus optional noise of
    `noise_std` times each matrix's standard deviation) and the router is drawn from N(0, router_init_std²), with the
    seeds docs/conversion.md gives (one per layer, expert and matrix: the same draws however the source is sharded).

    With `router_type="softmax_topk"` (renormalised weights summing to one) and no noise the upcycled model computes
    exactly the dense model's function at the start; SparseMixer-v2's weights do not sum to one, so it does not.
    """
    source, destination = _absolute(source), _absolute(destination)
    _check_std("noise_std", noise_std)
    _check_std("router_init_std", router_init_std)
    _check_dtype_name(dtype)
    config = upcycled_config(_read_config(source), num_experts, top_k, router_type, dtype)
    transform = partial(_upcycled_tensors, config=config, noise_std=noise_std, router_init_std=router_init_std,
                        seed=seed)
    same_function = router_type == "softmax_topk" and noise_std == 0  # otherwise the logits are meant to change
    return _write_checkpoint(source, destination, config, transform, dtype, max_shard_size, force, verify,
                             same_function)
