"""transformers' own common model tests, taken from the sdist of the installed transformers version at test time.

`load()` returns the imported upstream modules `test_modeling_common` and `test_configuration_common` (they hold
`ModelTesterMixin`, `ConfigTester`, `ids_tensor`, ...). The first call downloads `transformers-<version>.tar.gz`
from PyPI (its sha256 checked against the index), extracts only the test files needed into a cache folder outside
the repository and imports them from there as the package `transformers_upstream_tests`; later runs reuse the cache.
Nothing downloaded here is ever written into the repository.

Cache folder: `$MODELING_GRIN_CACHE` or `${XDG_CACHE_HOME:-~/.cache}/modeling-grin`, then
`transformers-tests/<version>/`. `MODELING_GRIN_PYPI_SIMPLE_URL` replaces the index (default: PyPI's simple API).

The sdist ships only the top-level `tests/*.py` files. Three modules those files import are not in it; they are
provided here (in `sys.modules`, not as files) by our own minimal stand-ins:
- `exporters.test_export.ExportTesterMixin`: an empty mixin, so transformers' torch.export tests do not run.
- `generation.test_utils.GenerationTesterMixin`: an empty class, so transformers' generate tests do not run (and
  `test_generation_tester_mixin_inheritance`, which asks for the real mixin, is skipped by the test classes).
- `utils.test_configuration_utils.config_common_kwargs`: a non-default value for every `PreTrainedConfig` field,
  which `ConfigTester.check_config_arguments_init` passes to the config and reads back.
An upstream file that starts importing another module missing from the sdist makes `load()` fail with its name.
"""

import ast
import dataclasses
import hashlib
import importlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import types
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest
import transformers

PACKAGE = "transformers_upstream_tests"
NEEDED = ("test_modeling_common.py", "test_configuration_common.py")
DEFAULT_INDEX = "https://pypi.org/simple"


class UpstreamTestsUnavailable(RuntimeError):
    pass


class ExportTesterMixin:
    """Stand-in: the transformers sdist has no tests/exporters/, so no torch.export test runs."""


class GenerationTesterMixin:
    """Stand-in: the transformers sdist has no tests/generation/, so no upstream generate test runs."""


def config_common_kwargs() -> dict:
    """A value differing from the default for each field of `PreTrainedConfig` (checked against the class)."""
    values = {
        "return_dict": False,
        "output_hidden_states": True,
        "output_attentions": True,
        "dtype": "float16",
        "chunk_size_feed_forward": 5,
        "architectures": ["SomeModel"],
        "id2label": {0: "label"},
        "label2id": {"label": "0"},
        "problem_type": "regression",
    }
    base = transformers.PreTrainedConfig()
    fields = {field.name for field in dataclasses.fields(transformers.PreTrainedConfig)} - {
        "transformers_version",
        "is_encoder_decoder",
    }
    missing = sorted(fields - set(values))
    if missing:
        raise UpstreamTestsUnavailable(f"config_common_kwargs lacks PreTrainedConfig fields {missing}: add them here")
    defaults = [key for key in values if key in fields and getattr(base, key) == values[key]]
    if defaults:
        raise UpstreamTestsUnavailable(f"config_common_kwargs sets {defaults} to their defaults: pick other values")
    return values


def _stub_modules() -> dict[str, types.ModuleType]:
    modules = {}
    for name, attributes in (
        ("exporters.test_export", {"ExportTesterMixin": ExportTesterMixin}),
        ("generation.test_utils", {"GenerationTesterMixin": GenerationTesterMixin}),
        ("utils.test_configuration_utils", {"config_common_kwargs": config_common_kwargs()}),
    ):
        parent = name.split(".")[0]
        modules.setdefault(parent, types.ModuleType(f"{PACKAGE}.{parent}"))
        modules[parent].__path__ = []
        module = types.ModuleType(f"{PACKAGE}.{name}")
        module.__dict__.update(attributes)
        modules[name] = module
    return modules


def cache_folder(version: str = transformers.__version__) -> Path:
    root = os.environ.get("MODELING_GRIN_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modeling-grin"
    return Path(root) / "transformers-tests" / version


def _sdist_location(version: str) -> tuple[str, str]:
    """(url, sha256) of transformers' sdist, from the index's JSON simple API (PEP 691)."""
    index = os.environ.get("MODELING_GRIN_PYPI_SIMPLE_URL", DEFAULT_INDEX).rstrip("/")
    request = urllib.request.Request(
        f"{index}/transformers/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    filename = f"transformers-{version}.tar.gz"
    for entry in listing.get("files", []):
        if entry.get("filename") == filename and entry.get("hashes", {}).get("sha256"):
            return urllib.parse.urljoin(f"{index}/transformers/", entry["url"]), entry["hashes"]["sha256"]
    raise UpstreamTestsUnavailable(f"{index}/transformers/ lists no {filename} with a sha256")


def _relative_imports(source: str) -> set[str]:
    """Module names (relative to the tests folder) a file imports with `from .x import ...`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.add(node.module)
    return names


def _download(version: str, target: Path) -> None:
    url, sha256 = _sdist_location(version)
    with urllib.request.urlopen(url, timeout=300) as response:
        payload = response.read()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise UpstreamTestsUnavailable(f"sha256 of {url} is {digest}, the index says {sha256}")
    prefix = f"transformers-{version}/tests/"
    stubs = _stub_modules()
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as archive:
        available = {
            member.name[len(prefix) :]: member
            for member in archive.getmembers()
            if member.isfile() and member.name.startswith(prefix)
        }
        wanted, files = list(NEEDED), {}
        while wanted:
            name = wanted.pop()
            if name in files:
                continue
            if name not in available:
                raise UpstreamTestsUnavailable(f"the transformers {version} sdist has no tests/{name}")
            files[name] = archive.extractfile(available[name]).read()
            for module in _relative_imports(files[name].decode("utf-8")):
                path = module.replace(".", "/") + ".py"
                if path in available:
                    wanted.append(path)
                elif module not in stubs:
                    raise UpstreamTestsUnavailable(
                        f"tests/{name} of transformers {version} imports .{module}, which the sdist lacks and "
                        f"{__name__} does not provide"
                    )
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        for name, content in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(content)
        (staging / "__init__.py").write_text("")  # ours: makes the folder a package for the files' relative imports
        (staging / "SOURCE").write_text(f"{url}\nsha256 {sha256}\n")
        try:
            staging.rename(target)  # atomic: a concurrent run either sees the whole folder or none
        except OSError:
            if not (target / "SOURCE").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_files(version: str = transformers.__version__) -> Path:
    target = cache_folder(version)
    if (target / "SOURCE").exists() and not all((target / name).is_file() for name in (*NEEDED, "__init__.py")):
        shutil.rmtree(target)  # a cache folder someone emptied by hand: fetch it again
    if not (target / "SOURCE").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _download(version, target)
        except UpstreamTestsUnavailable:
            raise
        except Exception as error:  # network, HTTP, archive errors: say what failed and how to opt out
            raise UpstreamTestsUnavailable(
                f"could not fetch transformers {version}'s common tests from PyPI into {target}: {error!r}. "
                "Offline, set MODELING_GRIN_SKIP_TRANSFORMERS_COMMON=1 to skip tests/test_transformers_common.py."
            ) from error
    return target


def load():
    """(test_modeling_common, test_configuration_common) of the installed transformers version."""
    if PACKAGE not in sys.modules:
        folder = ensure_files()
        spec = importlib.util.spec_from_file_location(
            PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
        for name, module in _stub_modules().items():
            sys.modules[f"{PACKAGE}.{name}"] = module
    with warnings.catch_warnings():
        # The upstream files use marks (slow, flash_attn_test, ...) that transformers' own conftest registers.
        warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)
        return (
            importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"),
        )
