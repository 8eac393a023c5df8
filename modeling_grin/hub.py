"""Publishing helpers: make a saved model folder loadable where this package is not installed."""

import json
import shutil
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent

# Everything a model needs at run time; these modules import each other only as flat siblings (`from .x import y`),
# which is what transformers' remote-code loader copies.
RUNTIME_MODULES = (
    "configuration_grin_moe.py",
    "configuration_mh_moe.py",
    "sparsemixer.py",
    "experts.py",
    "fused_experts.py",
    "losses.py",
    "modeling_grin_moe.py",
    "modeling_mh_moe.py",
)

_AUTO_MAP = {
    "grinmoe": ("configuration_grin_moe.GrinMoeConfig", "modeling_grin_moe", "GrinMoe"),
    "mh_moe": ("configuration_mh_moe.MhMoeConfig", "modeling_mh_moe", "MhMoe"),
}


def export_remote_code(folder: str | Path) -> dict:
    """Copy the runtime modules into a saved model folder and point `auto_map` at them.

    Afterwards `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works on a machine with only
    transformers installed. Returns the `auto_map` written. The config is rewritten atomically.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model there first")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type not in _AUTO_MAP:
        raise ValueError(f"model_type {model_type!r} is not one of this package's ({', '.join(_AUTO_MAP)})")

    for name in RUNTIME_MODULES:
        shutil.copyfile(_PACKAGE_DIR / name, folder / name)
    config_class, modeling_module, prefix = _AUTO_MAP[model_type]
    auto_map = {
        "AutoConfig": config_class,
        "AutoModel": f"{modeling_module}.{prefix}Model",
        "AutoModelForCausalLM": f"{modeling_module}.{prefix}ForCausalLM",
        "AutoModelForSequenceClassification": f"{modeling_module}.{prefix}ForSequenceClassification",
    }
    config["auto_map"] = auto_map
    temporary = config_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    temporary.replace(config_path)
    return auto_map
