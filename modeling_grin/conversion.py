"""Streaming checkpoint conversion between GRIN-MoE, Phi-3.5-MoE / transformers Phimoe and this package's format.

All three store the same tensors under the released per-expert names (`block_sparse_moe.experts.N.w1/w2/w3`,
`block_sparse_moe.gate`); what differs is the config (`model_type`, architectures, remote-code `auto_map`, RoPE
defaults). Checkpoints holding fused 3-D experts (`mlp.experts.gate_up_proj`, `mlp.router`) are split back to the
per-expert names. Tensors are read lazily shard by shard and written in shards of at most `max_shard_size`, so peak
memory is about one output shard. The output is written to a temporary folder beside the destination and renamed at
the end: an error (or a kill) never leaves a partial destination. Only safetensors are read; pickles never are.
"""

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

TARGETS = ("grinmoe", "phimoe")
_DEFAULT_ROPE_THETA = {"grinmoe": 10000.0, "phimoe": 1000000.0}  # each config class's default when the file has none
_OUR_ONLY_FIELDS = ("router_type", "router_renormalize", "experts_implementation")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def translate_config(config: dict, to: str, dtype: str | None = None) -> dict:
    """The source `config.json` rewritten for the target format, validated by the target's config class."""
    if to not in TARGETS:
        raise ConversionError(f"--to must be one of {TARGETS}, got {to!r}")
    source_type = config.get("model_type")
    if source_type not in TARGETS:
        raise ConversionError(f"source model_type {source_type!r} is not a GRIN-MoE/Phi-3.5-MoE checkpoint ({TARGETS})")
    output = {key: value for key, value in config.items() if key not in ("auto_map", "_name_or_path")}
    if "rope_theta" not in output and not output.get("rope_parameters") and not output.get("rope_scaling"):
        output["rope_theta"] = _DEFAULT_ROPE_THETA[source_type]  # keep the source's meaning explicit
    if dtype is not None:
        output["dtype"] = dtype
        output.pop("torch_dtype", None)
    if to == "phimoe":
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
        from transformers import PhimoeConfig as config_class
    else:
        output.update(model_type="grinmoe", architectures=["GrinMoeForCausalLM"])
        from .configuration_grin_moe import GrinMoeConfig as config_class
    try:
        config_class(**{key: value for key, value in output.items() if key not in ("model_type", "architectures")})
    except Exception as error:  # the target's own validation, reported as a conversion error
        raise ConversionError(f"the translated config is not a valid {to} config: {error}") from error
    return output


def _source_shards(source: Path) -> list[Path]:
    index = source / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in names if not (source / name).is_file()]
        if missing:
            raise ConversionError(f"{source} is missing shard(s) listed in its index: {', '.join(missing)}")
        return [source / name for name in names]
    if (source / "model.safetensors").is_file():
        return [source / "model.safetensors"]
    if any(source.glob("*.bin")) or any(source.glob("*.pt")) or any(source.glob("*.pth")):
        raise ConversionError(f"{source} holds only pickle weights, which are never loaded; save them as safetensors")
    raise ConversionError(f"{source} has no safetensors weights")


def _read_tensors(shards: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the source, lazily, shard by shard; unreadable shards become a `ConversionError`."""
    for shard in tqdm(shards, desc="converting shards", unit="shard"):
        try:
            with safe_open(shard, framework="pt") as reader:
                names = list(reader.keys())
                for name in names:
                    yield name, reader.get_tensor(name)
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


_EXPERT_KEY = re.compile(r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def _check_against_config(name: str, tensor: torch.Tensor, config: dict) -> None:
    match = _EXPERT_KEY.search(name)
    if match:
        expert, matrix = int(match.group(2)), match.group(3)
        hidden, intermediate = config["hidden_size"], config["intermediate_size"]
        if expert >= config["num_local_experts"]:
            raise ConversionError(f"{name}: expert {expert} but the config has num_local_experts="
                                  f"{config['num_local_experts']}")
        expected = (hidden, intermediate) if matrix == "w2" else (intermediate, hidden)
    elif name.endswith("block_sparse_moe.gate.weight"):
        expected = (config["num_local_experts"], config["hidden_size"])
    elif name == "model.embed_tokens.weight":
        expected = (config["vocab_size"], config["hidden_size"])
    else:
        return
    if tuple(tensor.shape) != expected:
        raise ConversionError(f"{name} has shape {tuple(tensor.shape)}, the config implies {expected}")


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _check_request(source: Path, destination: Path, dtype: str | None, force: bool) -> dict:
    """Checks common to every conversion, done before anything is written; returns the source config."""
    if not (source / "config.json").is_file():
        raise ConversionError(f"{source} has no config.json")
    if destination.exists() and not force:
        raise ConversionError(f"{destination} exists; pass --force to replace it")
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return json.loads((source / "config.json").read_text())


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

    Raises `ConversionError` (a `ValueError`) with a clear message, leaving no partial destination.
    """
    source, destination = Path(source), Path(destination)
    source_config = _check_request(source, destination, dtype, force)
    config = translate_config(source_config, to, dtype)
    tensors = (
        renamed for name, tensor in _read_tensors(_source_shards(source)) for renamed in _released_tensors(name, tensor)
    )
    return _write_checkpoint(source, destination, config, tensors, dtype, max_shard_size, verify)


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


def _write_checkpoint(source, destination, config, tensors, dtype, max_shard_size, verify, same_function=True) -> dict:
    """Write `tensors` and `config` atomically into `destination` (see the module note); returns a summary.

    With `verify`, the written tensors are re-read and, when the model is small enough and `same_function` holds,
    its logits are compared with the source's (within 1e-4 relative, or 5e-2 after a cast to 16-bit).
    """
    limit = parse_size(max_shard_size)
    temporary = destination.parent / f".{destination.name}.converting-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        manifest = _write_shards(tensors, temporary, config, dtype, limit)
        (temporary / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model"):
            if (source / extra).is_file():
                shutil.copyfile(source / extra, temporary / extra)
        logits_check = None
        if verify:
            verify_checkpoint(temporary, manifest)
            total = sum(entry["bytes"] for entry in manifest.values())
            if same_function and total <= VERIFY_LOGITS_MAX_BYTES:
                logits_check = logits_difference(source, temporary)
                tolerance = 5e-2 if dtype in ("bfloat16", "float16") else 1e-4
                if not logits_check <= tolerance:
                    raise ConversionError(f"verify: logits differ from the source by {logits_check:.2e} (relative), "
                                          f"above {tolerance:.0e}")
        if destination.exists():
            shutil.rmtree(destination)
        temporary.rename(destination)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return {"tensors": len(manifest), "bytes": sum(entry["bytes"] for entry in manifest.values()),
            "shards": len({entry["file"] for entry in manifest.values()}), "verified": verify,
            "logits_difference": logits_check}


def _write_shards(tensors, folder: Path, config: dict, dtype: str | None, limit: int) -> dict:
    manifest, pending, pending_bytes, written = {}, {}, 0, []

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            path = folder / f"part-{len(written) + 1:05d}.safetensors"
            save_file(pending, path, metadata={"format": "pt"})
            for name in pending:
                manifest[name]["file"] = path.name
            written.append(path)
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(_DTYPES[dtype])
        _check_against_config(name, tensor, config)
        if name in manifest:
            raise ConversionError(f"tensor {name} appears twice in the source")
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > limit:
            flush()
        pending[name] = tensor
        pending_bytes += size
        manifest[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype), "bytes": size,
                          "sha256": _checksum(tensor)}
    flush()

    expected_experts = config["num_local_experts"]
    for layer in range(config["num_hidden_layers"]):
        for expert in range(expected_experts):
            for matrix in ("w1", "w2", "w3"):
                name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{matrix}.weight"
                if name not in manifest:
                    raise ConversionError(f"{name} is missing from the source for the config's "
                                          f"{config['num_hidden_layers']} layers x {expected_experts} experts")

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


def upcycled_config(dense: dict, num_experts: int, top_k: int, router_type: str, dtype: str | None = None) -> dict:
    """The GRIN-MoE config of a dense model upcycled to `num_experts` copies of its MLP."""
    if dense.get("model_type") not in UPCYCLE_SOURCES:
        raise ConversionError(f"upcycling reads {', '.join(UPCYCLE_SOURCES)} checkpoints, got "
                              f"model_type {dense.get('model_type')!r}")
    config = {key: dense[key] for key in _DENSE_FIELDS if key in dense}
    if "rope_theta" not in config and not config.get("rope_parameters") and not config.get("rope_scaling"):
        config["rope_theta"] = 10000.0  # the dense classes' default
    config.update(
        model_type="grinmoe", architectures=["GrinMoeForCausalLM"], norm_type="rmsnorm",
        attention_bias=bool(dense.get("attention_bias", False)), lm_head_bias=False,
        sliding_window=dense.get("sliding_window"), num_local_experts=num_experts, num_experts_per_tok=top_k,
        router_type=router_type, router_renormalize=True, input_jitter_noise=0.0,
    )
    if dtype is not None:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    from .configuration_grin_moe import GrinMoeConfig

    try:
        GrinMoeConfig(**{key: value for key, value in config.items() if key not in ("model_type", "architectures")})
    except Exception as error:
        raise ConversionError(f"the upcycled config is not a valid grinmoe config: {error}") from error
    return config


_DENSE_MLP = re.compile(r"^(model\.layers\.(\d+))\.mlp\.(gate_proj|up_proj|down_proj|gate_up_proj)\.weight$")
_FUSED_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn)\.qkv_proj\.(weight|bias)$")


def _upcycled_tensors(
    name: str, tensor: torch.Tensor, config: dict, noise_std: float, router_init_std: float, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    qkv = _FUSED_QKV.match(name)
    if qkv:  # Phi-3 fuses q, k and v
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        sizes = [config["num_attention_heads"] * head_dim] + [config["num_key_value_heads"] * head_dim] * 2
        for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes, dim=0), strict=True):
            yield f"{qkv.group(1)}.{projection}.{qkv.group(2)}", part.contiguous()
        return
    mlp = _DENSE_MLP.match(name)
    if not mlp:
        yield name, tensor
        return
    prefix, layer, matrix = mlp.group(1), int(mlp.group(2)), mlp.group(3)
    if matrix == "gate_up_proj":  # Phi-3 fuses gate and up
        gate, up = tensor.chunk(2, dim=0)
        yield from _upcycled_tensors(f"{prefix}.mlp.gate_proj.weight", gate.contiguous(), config, noise_std,
                                     router_init_std, seed)
        yield from _upcycled_tensors(f"{prefix}.mlp.up_proj.weight", up.contiguous(), config, noise_std,
                                     router_init_std, seed)
        return
    expert_name = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[matrix]
    matrix_id = ("gate_proj", "up_proj", "down_proj").index(matrix)
    scale = noise_std * tensor.float().std().item()
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
    `noise_std` times each matrix's standard deviation) and the router is drawn from N(0, router_init_std²).

    With `router_type="softmax_topk"` (renormalised weights summing to one) and no noise the upcycled model computes
    exactly the dense model's function at the start; SparseMixer-v2's weights do not sum to one, so it does not.
    """
    source, destination = Path(source), Path(destination)
    source_config = _check_request(source, destination, dtype, force)
    if noise_std < 0 or router_init_std < 0:
        raise ConversionError("noise_std and router_init_std must be non-negative")
    config = upcycled_config(source_config, num_experts, top_k, router_type, dtype)
    tensors = (
        upcycled
        for name, tensor in _read_tensors(_source_shards(source))
        for upcycled in _upcycled_tensors(name, tensor, config, noise_std, router_init_std, seed)
    )
    same_function = router_type == "softmax_topk" and noise_std == 0  # otherwise the logits are meant to change
    return _write_checkpoint(source, destination, config, tensors, dtype, max_shard_size, verify, same_function)
