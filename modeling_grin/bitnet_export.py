"""The packed ternary export of a BitNet model (`config.bitnet=True`): 2 bits per quantized weight, in safetensors.

`export_ternary(model, folder)` writes `config.json` and `model.ternary.safetensors`: every quantized matrix as its
codes packed 4 per byte (`<name>_codes`, uint8, transformers' BitNet packing along the rows, each expert apart) and
its inverse scales 1 / mean|W| (`<name>_inverse_scale`, fp32: `[1, 1]` per linear layer, `[E, 2]` for the experts'
gate and up halves, `[E, 1]` for their down matrices); everything else (embeddings, norms, routers, lm_head, biases,
MH-MoE's head and merge layers) as it is. `load_ternary(folder)` rebuilds the model with the experts and linear layers
computing from the packed codes: in eval mode its logits are the training model's, bit for bit.

The file is named so that `from_pretrained` does not take it for a checkpoint of latent weights.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from .bitnet import BitNetLinear, PackedTernaryLinear
from .experts import SwiGLUExperts

TERNARY_FILE = "model.ternary.safetensors"
FORMAT = "bitnet-b1.58-packed-2bit"


def _quantized_modules(model):
    for name, module in model.named_modules():
        if isinstance(module, (BitNetLinear, SwiGLUExperts)):
            yield name, module


@torch.no_grad()
def ternary_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors of the packed export (see the module docstring): the state dict of the model `pack_model_` makes,
    computed without changing `model`."""
    if not getattr(model.config, "bitnet", False):
        raise ValueError("only a model with config.bitnet=True has ternary weights to export")
    tensors = {key: tensor.detach().clone().contiguous() for key, tensor in model.state_dict().items()}
    for name, module in _quantized_modules(model):
        prefix = f"{name}." if name else ""
        for parameter in ("weight",) if isinstance(module, BitNetLinear) else ("gate_up_proj", "down_proj"):
            del tensors[f"{prefix}{parameter}"]
        tensors.update({f"{prefix}{key}": tensor.contiguous() for key, tensor in module.packed_state().items()})
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # the embedding, tied again on load
    return tensors


def export_ternary(model, folder: str | Path) -> dict:
    """Write the packed model to `folder` (which must not exist or be empty; written to a temporary folder and
    renamed, so an interrupted export leaves nothing). Returns the file sizes in bytes and the counts of packed and
    full-precision values."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder; nothing was written")
    tensors = ternary_state_dict(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.config.save_pretrained(temporary)
        save_file(tensors, temporary / TERNARY_FILE, metadata={"format": "pt", "quantization": FORMAT})
        if folder.exists():
            folder.rmdir()  # empty: checked above
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    packed = sum(tensor.numel() * 4 for key, tensor in tensors.items() if key.endswith("_codes"))
    return {
        "file_bytes": (folder / TERNARY_FILE).stat().st_size,
        "ternary_values": packed,
        "full_precision_values": sum(t.numel() for key, t in tensors.items() if not key.endswith("_codes")),
    }


def pack_model_(model) -> None:
    """Turn every quantized module of a BitNet model into its packed inference form, in place (latent weights
    dropped)."""
    for name, module in list(_quantized_modules(model)):
        if isinstance(module, SwiGLUExperts):
            module.pack_ternary_()
        else:
            model.set_submodule(name, PackedTernaryLinear.from_bitnet(module))


def load_ternary(folder: str | Path):
    """The model `export_ternary` wrote, in eval mode, computing from its packed codes."""
    folder = Path(folder)
    file = folder / TERNARY_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {TERNARY_FILE} (written by export_ternary)")
    config = AutoConfig.from_pretrained(folder)
    if not getattr(config, "bitnet", False):
        raise ValueError(f"{folder}/config.json does not describe a BitNet model (bitnet is not true)")
    model = AutoModelForCausalLM.from_config(config)
    pack_model_(model)
    tensors = load_file(file)  # (a tied lm_head is not in it: `ternary_state_dict` leaves it out)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(f"{file} does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(tensors, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
