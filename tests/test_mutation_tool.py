"""tools/mutation.py: the per-module mutation runs' helper (docs/testing.md)."""

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_tool", ROOT / "tools" / "mutation.py")
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)


def mutmut_config(pyproject: Path) -> dict:
    return tomllib.loads(pyproject.read_text())["tool"]["mutmut"]


def test_every_core_module_has_test_files_and_the_config_selects_their_union():
    config = mutmut_config(ROOT / "pyproject.toml")
    assert sorted(config["only_mutate"]) == sorted(mutation.TEST_FILES)
    union = {name for names in mutation.TEST_FILES.values() for name in names}
    assert set(config["pytest_add_cli_args_test_selection"]) == union
    assert all((ROOT / name).is_file() for name in union)


def test_narrowed_config_mutates_one_module_against_its_tests(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text((ROOT / "pyproject.toml").read_text())
    mutation.narrow_config(pyproject, "modeling_grin/losses.py", ["tests/test_losses.py"])
    narrowed, original = mutmut_config(pyproject), mutmut_config(ROOT / "pyproject.toml")
    assert narrowed["only_mutate"] == ["modeling_grin/losses.py"]
    assert narrowed["pytest_add_cli_args_test_selection"] == ["tests/test_losses.py"]
    assert {k: v for k, v in narrowed.items() if k not in ("only_mutate", "pytest_add_cli_args_test_selection")} == {
        k: v for k, v in original.items() if k not in ("only_mutate", "pytest_add_cli_args_test_selection")}
    pyproject.write_text("[tool.mutmut]\n")
    with pytest.raises(SystemExit, match="only_mutate"):
        mutation.narrow_config(pyproject, "modeling_grin/losses.py", ["tests/test_losses.py"])


SOURCE = '''
import functools

calls = []


def logged(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        calls.append(function.__name__)
        return function(*args, **kwargs)
    return wrapper


def scaled(factor):
    return lambda function: functools.wraps(function)(lambda *args: factor * function(*args))


@scaled(10)
@logged
def add(a, b):
    return a + b


class Box:
    def __init__(self, value):
        self.value = value

    @property
    def double(self):
        return 2 * self.value

    @staticmethod
    def unit():
        return Box(1)
'''


def test_decorators_become_assignments_that_give_the_same_functions(tmp_path, monkeypatch):
    path = tmp_path / "decorated.py"
    path.write_text(SOURCE)
    assert mutation.undecorate(path) == 2  # add and Box.double; the sole @staticmethod is one mutmut takes
    rewritten = path.read_text()
    assert "@scaled" not in rewritten and "@property" not in rewritten and "@staticmethod" in rewritten
    assert "add = (scaled(10))((logged)(add))" in rewritten
    monkeypatch.syspath_prepend(str(tmp_path))
    import decorated

    assert decorated.add(1, 2) == 30 and decorated.calls == ["add"]  # the same order: logged inside scaled
    assert decorated.Box(4).double == 8 and decorated.Box.unit().value == 1
    sys.modules.pop("decorated")


def test_mutmut_runs_through_the_launcher_without_tqdms_monitor_thread():
    """The launcher is mutmut's own command line, in a process whose tqdm starts no monitor thread and locks with a
    lock of the process's own (no multiprocessing lock shared with forked workers)."""
    shown = "print(tqdm.tqdm.monitor_interval, type(tqdm.tqdm.get_lock()).__module__); sys.exit(cli())"
    check = mutation.RUN_MUTMUT.replace("sys.exit(cli())", shown)
    result = subprocess.run([sys.executable, "-c", check, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("0 _thread\n") and "Usage:" in result.stdout and "run" in result.stdout
