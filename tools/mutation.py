"""Mutation testing of one core module against its own test files (docs/testing.md).

    python tools/mutation.py modeling_grin/fused_experts.py [--max-children 2] [--workdir DIR]

mutmut takes one test selection for every module and its first step runs all of it; per module, only that module's
tests are worth running. This copies the project (tracked and untracked, not ignored, files) into a work folder,
narrows `[tool.mutmut]` there to the module and the test files of `TEST_FILES`, runs `mutmut run` and prints the
counts and the surviving mutants. mutmut does not mutate decorated functions (other than @staticmethod and
@classmethod), which in our modules are most forwards (`@deprecate_kwarg`, `@capture_outputs`) and `_init_weights`
(`@torch.no_grad()`): in the copy, and only there, each decorator is applied by an assignment after the definition
instead (`forward = deprecate_kwarg(...)(forward)`), which is the same function to Python and lets mutmut reach the
body. The project itself is not touched.
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import libcst as cst

# Core module -> the test files that check it; pyproject.toml's selection is their union.
TEST_FILES = {
    "modeling_grin/sparsemixer.py": ["tests/test_sparsemixer.py", "tests/test_modeling_grin_moe.py"],
    "modeling_grin/losses.py": ["tests/test_losses.py", "tests/test_fidelity_options.py"],  # (the latter: gshard)
    "modeling_grin/bitnet.py": ["tests/test_bitnet.py"],
    "modeling_grin/experts.py": ["tests/test_fused_experts.py", "tests/test_experts_shapes.py", "tests/test_bitnet.py"],
    "modeling_grin/fused_experts.py": ["tests/test_fused_experts.py", "tests/test_experts_shapes.py",
                                       "tests/test_bitnet.py", "tests/test_lora.py"],
    "modeling_grin/modeling_grin_moe.py": ["tests/test_modeling_grin_moe.py", "tests/test_generation.py",
                                           "tests/test_fidelity_options.py", "tests/test_model_input_errors.py",
                                           "tests/test_deepspeed_hooks.py", "tests/test_bitnet.py"],
    "modeling_grin/modeling_mh_moe.py": ["tests/test_mh_moe.py", "tests/test_fidelity_options.py",
                                         "tests/test_bitnet.py"],
    "modeling_grin/conversion.py": ["tests/test_conversion.py", "tests/test_conversion_safety.py",
                                    "tests/test_upcycling.py"],
}
# mutmut forks its workers from a process that has run the tests, and tqdm's default lock includes a multiprocessing
# lock that every forked worker shares: one worker ending while it holds it (or tqdm's monitor thread holding it at a
# fork) leaves every later progress bar waiting forever (seen: conversion mutants hung in `save_pretrained`'s bar).
# Each worker gets a lock of its own instead, and no monitor thread.
RUN_MUTMUT = ("import sys, threading, tqdm; tqdm.tqdm.monitor_interval = 0; tqdm.tqdm.set_lock(threading.RLock()); "
              "from mutmut.__main__ import cli; sys.exit(cli())")
ROOT = Path(__file__).resolve().parents[1]
SOLE_DECORATORS_MUTMUT_TAKES = {"staticmethod", "classmethod"}


class _DecoratorsAsAssignments(cst.CSTTransformer):
    """`@a @b def f(...)` -> `def f(...)` then `f = a(b(f))`, in module and class bodies."""

    def __init__(self):
        self.moved = 0

    def _rewrite(self, body):
        statements = []
        for statement in body:
            decorators = statement.decorators if isinstance(statement, cst.FunctionDef) else ()
            sole = len(decorators) == 1 and cst.Module([]).code_for_node(decorators[0].decorator)
            if not decorators or sole in SOLE_DECORATORS_MUTMUT_TAKES:
                statements.append(statement)
                continue
            name = statement.name.value
            wrapped = name
            for decorator in reversed(decorators):
                wrapped = f"({cst.Module([]).code_for_node(decorator.decorator)})({wrapped})"
            statements.append(statement.with_changes(decorators=()))
            statements.append(cst.parse_statement(f"{name} = {wrapped}"))
            self.moved += 1
        return statements

    def leave_Module(self, original, updated):
        return updated.with_changes(body=self._rewrite(updated.body))

    def leave_ClassDef(self, original, updated):
        if not isinstance(updated.body, cst.IndentedBlock):
            return updated
        return updated.with_changes(body=updated.body.with_changes(body=self._rewrite(updated.body.body)))


def undecorate(path: Path) -> int:
    """Rewrite `path` with its decorators applied by assignment; -> how many functions were rewritten."""
    transformer = _DecoratorsAsAssignments()
    path.write_text(cst.parse_module(path.read_text()).visit(transformer).code)
    return transformer.moved


def narrow_config(pyproject: Path, module: str, test_files: list[str]) -> None:
    text = pyproject.read_text()
    replacements = {
        "only_mutate": f'["{module}"]',
        "pytest_add_cli_args_test_selection": "[" + ", ".join(f'"{name}"' for name in test_files) + "]",
    }
    for key, value in replacements.items():
        text, count = re.subn(rf"^{key} = \[.*?\]$", f"{key} = {value}", text, count=1, flags=re.M | re.S)
        if count != 1:
            raise SystemExit(f"pyproject.toml: no `{key} = [...]` in [tool.mutmut] to narrow")
    pyproject.write_text(text)


def copy_project(destination: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", choices=sorted(TEST_FILES))
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="where to copy the project (default: a new temporary folder)")
    parser.add_argument("--only", nargs="+", metavar="GLOB",
                        help="run only these mutants: mutmut names or globs ('modeling_grin.conversion.x_upcycle*')")
    parser.add_argument("--require-all-killed", action="store_true",
                        help="exit with 1 if a mutant survived or had no tests (CI's check of a module at 100 %%)")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mutation-"))
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"{workdir} is not empty")
    copy_project(workdir)
    narrow_config(workdir / "pyproject.toml", args.module, TEST_FILES[args.module])
    moved = undecorate(workdir / args.module)
    print(f"{workdir}: {args.module} against {', '.join(TEST_FILES[args.module])}; "
          f"{moved} decorated functions made reachable", flush=True)

    # inductor in mutmut's forked workers hangs unless it compiles in-process; one thread per worker
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    run = [sys.executable, "-c", RUN_MUTMUT, "run", "--max-children", str(args.max_children), *(args.only or [])]
    subprocess.run(run, cwd=workdir, env=env, check=True)  # its progress line shows on the terminal
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir, env=env,
                             check=True, capture_output=True, text=True).stdout
    statuses = dict(line.strip().rsplit(": ", 1) for line in listing.splitlines() if ": " in line)
    counts = collections.Counter(statuses.values())
    print(f"{len(statuses)} mutants: " + ", ".join(f"{count} {status}" for status, count in counts.most_common()))
    for name, status in statuses.items():
        if status != "killed":
            print(f"  {status}: {name}   (mutmut show {name}, in {workdir})")
    missed = counts["survived"] + counts["no tests"]
    return 1 if args.require_all_killed and (missed or not statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
