"""What a non-editable install ships (CI installs the wheel with `pip install ".[dev]"`)."""

import sys
import sysconfig
from pathlib import Path

import pytest

SOURCE_PRESETS = Path(__file__).resolve().parent.parent / "configuration"
INSTALLED_PACKAGE = Path(sysconfig.get_paths()["purelib"]) / "modeling_grin"

requires_install = pytest.mark.skipif(
    not (INSTALLED_PACKAGE / "__init__.py").is_file(),
    reason="modeling-grin is not installed as a wheel here (tests run from the source tree)",
)


@requires_install
def test_wheel_ships_every_preset():
    presets = sorted(path.relative_to(SOURCE_PRESETS) for path in SOURCE_PRESETS.rglob("*.json"))
    assert presets, "no presets in configuration/"
    for preset in presets:
        assert (INSTALLED_PACKAGE / "configuration" / preset).is_file(), preset


@requires_install
def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "grin-moe").is_file()
