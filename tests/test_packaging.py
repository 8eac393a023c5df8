"""What a non-editable install ships (CI installs the wheel with `pip install ".[dev]"`)."""

import importlib.metadata as metadata
from pathlib import Path

import pytest

SOURCE_PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def installed_files() -> set[str]:
    try:
        files = metadata.files("modeling-grin") or []
    except metadata.PackageNotFoundError:
        pytest.skip("modeling-grin is not installed; the tests run from the source tree")
    names = {str(path).replace("\\", "/") for path in files}
    if not any(name.startswith("modeling_grin/") and name.endswith(".py") for name in names):
        pytest.skip("editable install: the package files are not copied")
    return names


def test_wheel_ships_every_preset():
    names = installed_files()
    presets = sorted(path.relative_to(SOURCE_PRESETS).as_posix() for path in SOURCE_PRESETS.rglob("*.json"))
    assert presets, "no presets in configuration/"
    for preset in presets:
        assert f"modeling_grin/configuration/{preset}" in names


def test_console_script_is_declared():
    installed_files()
    scripts = {entry.name: entry.value for entry in metadata.entry_points(group="console_scripts")}
    assert scripts.get("grin-moe") == "modeling_grin.cli:main"
