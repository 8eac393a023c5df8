"""Model presets: folders holding a `config.json`, shipped in `configuration/` (inside the wheel when installed)."""

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

_PACKAGE_DIR = Path(__file__).resolve().parent


def presets_root() -> Path:
    """`modeling_grin/configuration` in an installed wheel, the top-level `configuration/` in a checkout."""
    for candidate in (_PACKAGE_DIR / "configuration", _PACKAGE_DIR.parent / "configuration"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("modeling_grin's `configuration/` folder is missing from this installation")


def list_presets() -> list[str]:
    return sorted(path.parent.name for path in presets_root().glob("*/config.json"))


def preset_path(name: str) -> Path:
    path = presets_root() / name
    if not (path / "config.json").is_file():
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(list_presets())}")
    return path


def load_preset(name: str, **overrides) -> PretrainedConfig:
    """The config of preset `name` (e.g. `"grin-moe"`, `"mh-moe-paper-h2"`), with fields replaced by `overrides`.

    The overrides are validated with the rest of the config (`ValueError` naming the field); a name that is no field
    of the config raises too, instead of being dropped. The model types resolve because importing this module
    imports the package, which registers them.
    """
    config, unused = AutoConfig.from_pretrained(preset_path(name), return_unused_kwargs=True, **overrides)
    if unused:
        raise ValueError(f"preset {name!r}: {', '.join(map(repr, unused))} is not a field of {type(config).__name__}")
    return config
