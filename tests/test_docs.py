"""The documentation is exercised: every command in a shell block of README.md and docs/*.md is recognised and its
arguments parse with the real parser (grin-moe, accelerate launch, the benchmark and conversion scripts), install and
test commands match setup.cfg and CI, relative links and anchors resolve, Python blocks compile and import names that
exist, and docs/api.md matches the code (names, signatures, config fields and defaults, and no public name left out).

A command the test does not know fails it, so a new kind of command cannot be documented without a check.
"""

import argparse
import ast
import configparser
import contextlib
import importlib
import inspect
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

import modeling_grin
from modeling_grin.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# The ignored (not pip-installable from setup.cfg) packages the docs may tell users to install.
OPTIONAL_PACKAGES = {"deepspeed"}
# The launch configs of configuration/accelerate/, by what docs/training.md says of them ("a.b" is a nested field,
# None a field that must be absent): the distributed type of its table, the mixed precision of its "Mixed precision"
# line, one process per GPU on one machine for DDP (plain DDP: no FSDP or DeepSpeed section), FSDP2 wrapping every
# decoder layer by the model's `_no_split_modules` (no class list) with a full state dict on save, DeepSpeed's ZeRO
# stage, gradient accumulation equal to `train`'s default (1) and ZeRO-3's 16-bit weights gathered on save.
LAUNCH_CONFIGS = {
    "ddp.yaml": {
        "distributed_type": "MULTI_GPU", "mixed_precision": "no", "num_machines": 1, "gpu_ids": "all",
        "use_cpu": False, "fsdp_config": None, "deepspeed_config": None,
    },
    "fsdp2.yaml": {
        "distributed_type": "FSDP", "mixed_precision": "no", "fsdp_config.fsdp_version": 2,
        "fsdp_config.fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_config.fsdp_transformer_layer_cls_to_wrap": None, "fsdp_config.fsdp_state_dict_type": "FULL_STATE_DICT",
    },
    "deepspeed-zero2.yaml": {
        "distributed_type": "DEEPSPEED", "mixed_precision": "bf16", "deepspeed_config.zero_stage": 2,
        "deepspeed_config.gradient_accumulation_steps": 1,
    },
    "deepspeed-zero3.yaml": {
        "distributed_type": "DEEPSPEED", "mixed_precision": "bf16", "deepspeed_config.zero_stage": 3,
        "deepspeed_config.gradient_accumulation_steps": 1, "deepspeed_config.zero3_save_16bit_model": True,
    },
}
LAUNCH_CONFIG_DIR = ROOT / "configuration" / "accelerate"
# api.md: every public name of these modules (`__all__`, else public functions and classes defined there) has an entry.
API_COMPLETE_MODULES = (
    "modeling_grin",
    "modeling_grin.configuration_grin_moe",
    "modeling_grin.configuration_mh_moe",
    "modeling_grin.modeling_grin_moe",
    "modeling_grin.modeling_mh_moe",
    "modeling_grin.sparsemixer",
    "modeling_grin.experts",
    "modeling_grin.bitnet",
    "modeling_grin.bitnet_export",
    "modeling_grin.losses",
    "modeling_grin.presets",
    "modeling_grin.conversion",
    "modeling_grin.hub",
    "modeling_grin.data",
    "modeling_grin.demo",
    "modeling_grin.training",
    "modeling_grin.training.loop",
    "modeling_grin.training.evaluation",
    "modeling_grin.training.callbacks",
    "modeling_grin.training.lora",
    "modeling_grin.cli",
)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the Markdown


@dataclass
class Block:
    path: Path
    line: int
    language: str
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks, current, start, language = [], None, 0, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if current is None:
            match = re.match(r"^\s*```(\S*)", line)
            if match:
                current, start, language = [], number, match.group(1).lower()
        elif re.match(r"^\s*```\s*$", line):
            blocks.append(Block(path, start, language, "\n".join(current) + "\n"))
            current = None
        else:
            current.append(line)
    assert current is None, f"{path.relative_to(ROOT)}:{start}: unclosed code block"
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in fenced_blocks(path)]


def prose(path: Path) -> str:
    """The file without its fenced blocks (links and headings live there)."""
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*```", line):
            inside = not inside
            continue
        if not inside:
            lines.append(line)
    return "\n".join(lines)


def shell_commands(block: Block) -> list[list[str]]:
    """The commands of a shell block as argv lists: comments dropped, continuations joined, `&&` chains split, and in
    console blocks only the `$ ` lines."""
    lines, pending = [], ""
    for raw in block.text.splitlines():
        line = raw.rstrip()
        if block.language == "console":
            if pending:
                line = line.strip()
            elif line.startswith("$ "):
                line = line[2:]
            else:
                continue  # output
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, f"{block.where()}: a continuation line ends the block"
    commands = []
    for line in lines:
        tokens = shlex.split(line, comments=True)
        current = []
        for token in tokens:
            if token == "&&":
                commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    return [command for command in commands if command]


ALL_COMMANDS = [
    pytest.param(block, command, id=f"{block.where()}:{' '.join(command)[:60]}")
    for block in ALL_BLOCKS
    if block.language in SHELL_LANGUAGES
    for command in shell_commands(block)
]


# ---------------------------------------------------------------------------------------------------------------------
# Checking one command


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices


def parse_grin_moe(arguments: list[str], where: str) -> argparse.Namespace | None:
    try:
        return build_parser().parse_args(arguments)
    except SystemExit as exit_:
        assert exit_.code == 0 and ("-h" in arguments or "--help" in arguments), (
            f"{where}: `grin-moe {' '.join(arguments)}` does not parse"
        )
        return None


def ci_test_commands() -> list[list[str]]:
    """The pytest lines of .ci/run: the whole suite first, then the tests run on the lowest supported transformers."""
    return [shlex.split(line) for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]


def ci_test_command() -> list[str]:
    commands = ci_test_commands()
    assert len(commands) == 2, "expected two pytest lines in .ci/run (newest transformers, lowest transformers)"
    return commands[0]


def test_ci_runs_the_whole_suite_then_model_tests_on_the_lowest_transformers():
    whole, lowest = ci_test_commands()
    assert whole == ["python", "-m", "pytest", "-q"]
    assert lowest[: len(whole)] == whole and len(lowest) > len(whole)
    for test_file in ("test_modeling_grin_moe.py", "test_mh_moe.py", "test_generation.py", "test_conversion.py"):
        assert f"tests/{test_file}" in lowest
    for test_file in lowest[len(whole):]:
        assert (ROOT / test_file).is_file(), test_file
    # The floor CI installs is the one setup.cfg declares.
    script = (ROOT / ".ci" / "run").read_text()
    assert 'fresh_venv .venv-ci-lowest "transformers==$lowest"' in script
    (read_floor,) = [line for line in script.splitlines() if line.startswith("lowest=")]
    read = subprocess.run(["bash", "-c", f'{read_floor}; echo "$lowest"'], cwd=ROOT, capture_output=True, text=True)
    (floor,) = [spec.version for spec in setup_requirements()[0]["transformers"].specifier if spec.operator == ">="]
    assert read.stdout.strip() == floor


def setup_requirements() -> tuple[dict[str, Requirement], set[str]]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    requirements = {}
    for line in parser["options"]["install_requires"].strip().splitlines():
        requirement = Requirement(line.strip())
        requirements[requirement.name.lower()] = requirement
    extras = set()
    for extra, lines in parser["options.extras_require"].items():
        extras.add(extra)
        for line in lines.strip().splitlines():
            requirement = Requirement(line.strip())
            requirements.setdefault(requirement.name.lower(), requirement)
    return requirements, extras


def check_pip_install(arguments: list[str], where: str) -> None:
    requirements, extras = setup_requirements()
    packages = [argument for argument in arguments if not argument.startswith("-")]
    assert packages, f"{where}: pip install of nothing"
    for package in packages:
        local = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", package)
        if local:
            for extra in filter(None, (local.group(1) or "").split(",")):
                assert extra in extras, f"{where}: extra {extra!r} is not in setup.cfg"
            continue
        requirement = Requirement(package)
        name = requirement.name.lower()
        if name in OPTIONAL_PACKAGES:
            continue
        assert name in requirements, f"{where}: {package} is neither a dependency in setup.cfg nor a known optional one"
        for pinned in requirement.specifier:
            assert requirements[name].specifier.contains(pinned.version), (
                f"{where}: {package} is outside setup.cfg's {requirements[name]}"
            )


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def parse_only():
    """Make the next `ArgumentParser.parse_args` parse for real (errors exit with status 2), then stop the program."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed()

    argparse.ArgumentParser.parse_args = parse_then_stop
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.path[:], sys.argv[:] = saved_path, saved_argv


def check_script(script: str, arguments: list[str], where: str) -> None:
    path = ROOT / script
    assert path.is_file() and path.parent.name in ("benchmarks", "conversion_scripts", "tools"), (
        f"{where}: {script} is not a script of benchmarks/, conversion_scripts/ or tools/"
    )
    if not arguments:
        check_script_without_arguments(path, where)
        return
    if not runs_until_parsed(path, arguments, f"{where}: `{script} {' '.join(arguments)}`"):
        pytest.fail(f"{where}: {script} takes no arguments but the docs pass {arguments}")


def runs_until_parsed(path: Path, arguments: list[str], described: str) -> bool:
    """Run the script up to its `parse_args` of `arguments`: True once they parse, False if it never parses any;
    arguments its parser rejects fail the test."""
    with parse_only():
        sys.argv[:] = [str(path), *arguments]
        try:
            runpy.run_path(str(path), run_name="__main__")
        except _Parsed:
            return True
        except SystemExit as exit_:
            pytest.fail(f"{described} does not parse (exit {exit_.code})")
    return False


def check_script_without_arguments(path: Path, where: str) -> None:
    """`python SCRIPT` alone: it is a program (a `__main__` guard) and its defaults parse: a script with an argparse
    parser is run up to `parse_args` of no arguments (a required argument fails it); one without reads no argv."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    assert any(
        isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body
    ), f"{where}: {path.name} has no `if __name__ == \"__main__\":` entry point"
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    if not any(call.endswith("ArgumentParser") for call in calls):
        # sys.argv only echoed in the reproduction line (' '.join(sys.argv)), never read for values
        indexed = [node for node in ast.walk(tree) if isinstance(node, ast.Subscript)
                   and ast.unparse(node.value) == "sys.argv"]
        assert not indexed, f"{where}: {path.name} reads sys.argv without a parser"
        return
    if not runs_until_parsed(path, [], f"{where}: `{path.name}` without arguments"):
        pytest.fail(f"{where}: {path.name} builds a parser but never parses its arguments")


def check_accelerate_launch(arguments: list[str], where: str) -> None:
    from accelerate.commands.launch import launch_command_parser

    try:
        launch = launch_command_parser().parse_args(arguments)
    except SystemExit:
        pytest.fail(f"{where}: `accelerate launch {' '.join(arguments)}` does not parse")
    assert launch.config_file, f"{where}: accelerate launch without --config_file"
    config_path = ROOT / launch.config_file
    assert config_path.is_file(), f"{where}: {launch.config_file} does not exist"
    assert config_path.name in LAUNCH_CONFIGS, f"{where}: {launch.config_file} is not a shipped launch config"
    check_launch_config(config_path, f"{where}: {launch.config_file}")
    assert launch.module and launch.training_script == "modeling_grin.cli", (
        f"{where}: the launched program should be `-m modeling_grin.cli`"
    )
    namespace = parse_grin_moe(launch.training_script_args, where)
    assert namespace is not None and namespace.command == "train", f"{where}: accelerate launch of a non-train command"


def check_launch_config(path: Path, where: str) -> None:
    """Accelerate's own loader accepts the file (it rejects unknown keys), and its fields are what the docs say."""
    from accelerate.commands.config.config_args import ClusterConfig

    ClusterConfig.from_yaml_file(str(path))
    config = yaml.safe_load(path.read_text())
    for field, expected in LAUNCH_CONFIGS[path.name].items():
        *sections, key = field.split(".")
        section = config
        for name in sections:
            section = section.get(name) or {}
        if expected is None:
            assert key not in section, f"{where}: {field} should be absent"
        else:
            assert key in section and section[key] == expected, f"{where}: {field} is {section.get(key)!r}, " \
                f"the docs say {expected!r}"


@pytest.mark.parametrize("name", sorted(LAUNCH_CONFIGS))
def test_launch_config_has_the_documented_fields(name):
    check_launch_config(LAUNCH_CONFIG_DIR / name, name)


def test_every_launch_config_is_documented_with_its_distributed_type():
    assert {path.name for path in LAUNCH_CONFIG_DIR.glob("*.yaml")} == set(LAUNCH_CONFIGS)
    table = dict(re.findall(r"^\| `([\w-]+\.yaml)` \| `(\w+)` \|", prose(DOCS / "training.md"), flags=re.M))
    assert table == {name: fields["distributed_type"] for name, fields in LAUNCH_CONFIGS.items()}
    precision = re.search(r"\*\*Mixed precision\*\* comes from the launch config \(([^)]*)\)",
                          " ".join(prose(DOCS / "training.md").split()))
    assert precision, "docs/training.md: the Mixed precision line moved; update this test"
    assert precision.group(1) == '`"no"` in `ddp.yaml` / `fsdp2.yaml`, `bf16` in the DeepSpeed ones'


def test_the_launch_config_check_rejects_what_it_should(tmp_path):
    for name, field, value in (("ddp.yaml", "mixed_precision", "bf16"), ("ddp.yaml", "fsdp_config", {}),
                               ("fsdp2.yaml", "fsdp_config", {"fsdp_version": 1}),
                               ("deepspeed-zero3.yaml", "deepspeed_config", {"zero_stage": 3}),
                               ("ddp.yaml", "no_such_accelerate_key", 1)):
        config = yaml.safe_load((LAUNCH_CONFIG_DIR / name).read_text())
        config[field] = value
        (tmp_path / name).write_text(yaml.safe_dump(config))
        with pytest.raises((AssertionError, ValueError)):
            check_launch_config(tmp_path / name, "self-test")


def check_mutmut(arguments: list[str], where: str) -> None:
    """`mutmut run [--max-children N] [MUTANT-GLOB ...]`, `mutmut results`, `mutmut show MUTANT`: mutmut is a dev
    dependency in setup.cfg, pyproject.toml has its `[tool.mutmut]` section, and a mutant glob names a module it
    mutates (`modeling_grin.losses*` for modeling_grin/losses.py)."""
    import tomllib

    requirements, _ = setup_requirements()
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    dev_lines = parser["options.extras_require"]["dev"].strip().splitlines()
    dev = {Requirement(line.strip()).name.lower() for line in dev_lines}
    assert "mutmut" in dev and "mutmut" in requirements, f"{where}: mutmut is not in the `dev` extra of setup.cfg"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("mutmut")
    assert config and config.get("only_mutate"), f"{where}: pyproject.toml has no [tool.mutmut] only_mutate"
    for path in config["only_mutate"] + config.get("pytest_add_cli_args_test_selection", []):
        assert (ROOT / path).is_file(), f"{where}: [tool.mutmut] names {path}, which does not exist"
    modules = {path.removesuffix(".py").replace("/", ".") for path in config["only_mutate"]}
    assert arguments and arguments[0] in ("run", "results", "show"), f"{where}: mutmut {' '.join(arguments)}"
    names = arguments[1:]
    if arguments[0] == "run" and names[:1] == ["--max-children"]:
        assert len(names) >= 2 and names[1].isdigit(), f"{where}: --max-children N"
        names = names[2:]
    if arguments[0] == "results":
        assert not names or names == ["--all", "true"], f"{where}: mutmut results [--all true]"
        return
    assert arguments[0] == "run" or len(names) == 1, f"{where}: mutmut show MUTANT"
    for name in names:
        assert not name.startswith("-"), f"{where}: unknown mutmut option {name}"
        module = re.match(r"[\w.]+?(?=\*|\.x_|\.x\u01c1|$)", name)
        assert module and module.group(0) in modules, f"{where}: {name} names no module of [tool.mutmut] only_mutate"


def check_command(command: list[str], where: str) -> None:
    program, arguments = command[0], command[1:]
    if program == "grin-moe":
        parse_grin_moe(arguments, where)
    elif program in ("python", "python3") and arguments[:2] == ["-m", "venv"]:
        assert len(arguments) == 3, f"{where}: python -m venv DIR"
    elif program in (".", "source"):
        assert len(arguments) == 1 and arguments[0].endswith("bin/activate"), f"{where}: not a venv activation"
    elif program == "pip" and arguments[:1] == ["install"]:
        check_pip_install(arguments[1:], where)
    elif program == "python" and arguments[:2] == ["-m", "pytest"]:
        reference = ci_test_command()
        if len(command) > len(reference):  # the CI command plus test files of this repository
            assert command[: len(reference)] == reference, f"{where}: {command} does not extend {reference}"
            for test_file in command[len(reference):]:
                assert re.fullmatch(r"tests/test_\w+\.py", test_file) and (ROOT / test_file).is_file(), (
                    f"{where}: {test_file} is not a test file of tests/"
                )
        else:
            assert command == reference, f"{where}: the test command must be exactly CI's ({' '.join(reference)})"
    elif program == "python" and arguments[:2] == ["-m", "modeling_grin.cli"]:
        parse_grin_moe(arguments[2:], where)
    elif program == "python" and arguments[:2] == ["-m", "modeling_grin.bench"]:
        from modeling_grin.bench import build_parser as bench_parser

        try:
            bench_parser().parse_args(arguments[2:])
        except SystemExit as exit_:
            assert exit_.code == 0 and "--help" in arguments, (
                f"{where}: `python -m modeling_grin.bench {' '.join(arguments[2:])}` does not parse"
            )
    elif program == "python" and arguments and arguments[0].endswith(".py"):
        check_script(arguments[0], arguments[1:], where)
    elif program == "accelerate" and arguments[:1] == ["launch"]:
        check_accelerate_launch(arguments[1:], where)
    elif program == "mutmut":
        check_mutmut(arguments, where)
    else:
        pytest.fail(f"{where}: unrecognised command `{' '.join(command)}`: teach tests/test_docs.py to check it")


@pytest.mark.parametrize("block, command", ALL_COMMANDS)
def test_documented_command(block, command):
    check_command(command, block.where())


def inline_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Inline code spans of the prose that are commands (`grin-moe ...`, `python ...`, `accelerate launch ...`,
    `pip install ...`), whitespace collapsed (a span may wrap across lines)."""
    found = []
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose(path)):
        span = " ".join(span.split())
        if re.match(r"^(grin-moe|python3?|accelerate|pip)(\s|$)", span):
            found.append((span, shlex.split(span)))
    return found


INLINE_COMMANDS = [
    pytest.param(path, tokens, id=f"{path.name}:{span[:60]}")
    for path in DOC_FILES
    for span, tokens in inline_commands(path)
]


@pytest.mark.parametrize("path, command", INLINE_COMMANDS)
def test_inline_command(path, command):
    """A mention (`grin-moe`, `grin-moe train`, `accelerate launch`, `pip install`) names something that exists; a
    span with arguments is checked like a command of a shell block."""
    where = f"{path.relative_to(ROOT)} (inline `{' '.join(command)}`)"
    if command[0] == "grin-moe" and len(command) <= 2:
        assert len(command) == 1 or command[1] in subcommands(), f"{where}: no sub-command {command[1]!r}"
    elif command[0] == "grin-moe" and command[1].isupper():  # a placeholder: `grin-moe COMMAND --help`
        assert command[2:] == ["--help"], where
    elif command == ["accelerate", "launch"]:  # a mention: the launcher exists, and the docs show how to use it
        from accelerate.commands.launch import launch_command_parser

        assert "accelerate" in setup_requirements()[0], f"{where}: accelerate is not a dependency in setup.cfg"
        assert launch_command_parser().parse_args(["--config_file", "c.yaml", "-m", "x"]).module, where
        assert any(command[:2] == ["accelerate", "launch"] for block, command in
                   (param.values for param in ALL_COMMANDS)), f"{where}: no documented `accelerate launch` command"
    elif command == ["pip", "install"]:  # a mention: the same page shows (and so checks) a real install command
        assert any(block.path == path and command[:2] == ["pip", "install"] for block, command in
                   (param.values for param in ALL_COMMANDS)), f"{where}: no `pip install` command on this page"
    else:
        # Inline summaries may use placeholders: an upper-case word (SRC, N) stands for a value, `{a,b}` for a choice.
        choices = [re.fullmatch(r"\{([\w-]+(?:,[\w-]+)+)\}", token) for token in command]
        alternatives = max((len(match.group(1).split(",")) for match in choices if match), default=1)
        for pick in range(alternatives):
            concrete = [
                choice.group(1).split(",")[min(pick, choice.group(1).count(","))] if choice
                else "1" if re.fullmatch(r"[A-Z][A-Z_]*", token) else token
                for token, choice in zip(command, choices, strict=True)
            ]
            check_command(concrete, where)


def test_docs_have_commands_and_the_readme_keeps_its_two_main_ones():
    assert len(ALL_COMMANDS) > 20
    readme = [shell_commands(block) for block in fenced_blocks(ROOT / "README.md") if block.language == "bash"]
    install = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install \".[dev]\""
    assert readme[0] == shell_commands(Block(ROOT, 0, "bash", f"{install} && grin-moe demo\n"))
    assert readme[1] == [ci_test_command()] == [["python", "-m", "pytest", "-q"]]


def test_the_checker_rejects_what_it_should():
    where = "self-test"
    for bad in (
        ["grin-moe", "train"],  # --output-dir is required
        ["grin-moe", "convert", "a", "b", "--to", "llama"],
        ["python", "-m", "pytest"],
        ["make", "docs"],
        ["pip", "install", "numpy-but-not-a-dependency"],
        ["pip", "install", "torch==1.0"],
        ["python", "benchmarks/router_cost.py", "--no-such-flag"],
        ["python", "benchmarks/no_such_script.py"],
        ["accelerate", "launch", "--config_file", "configuration/accelerate/ddp.yaml", "-m", "modeling_grin.cli",
         "demo"],
    ):
        with pytest.raises(pytest.fail.Exception):
            try:
                check_command(bad, where)
            except AssertionError as error:
                pytest.fail(str(error))


def test_the_script_check_without_arguments_rejects_what_it_should(tmp_path):
    for name, source in (
        ("no_entry_point.py", "print('runs on import')\n"),
        ("reads_argv.py", "import sys\nif __name__ == '__main__':\n    print(sys.argv[1])\n"),
        ("required.py", "import argparse\nif __name__ == '__main__':\n"
                        "    parser = argparse.ArgumentParser()\n    parser.add_argument('source')\n"
                        "    parser.parse_args()\n"),
    ):
        (tmp_path / name).write_text(source)
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_script_without_arguments(tmp_path / name, "self-test")
    (tmp_path / "fine.py").write_text("import argparse\nif __name__ == '__main__':\n"
                                      "    argparse.ArgumentParser().parse_args()\n    raise SystemExit(3)\n")
    check_script_without_arguments(tmp_path / "fine.py", "self-test")  # stops after parsing, before running


def test_the_inline_checker_rejects_what_it_should():
    for bad in (["grin-moe", "no-such-command"], ["grin-moe", "convert", "SRC", "DST", "--to", "{grinmoe,llama}"]):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            test_inline_command(ROOT / "README.md", bad)


# ---------------------------------------------------------------------------------------------------------------------
# Links, index, Python and Mermaid blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (a link in it counts by its text)."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(match) for match in re.findall(r"^#+\s+(.*)$", prose(path), flags=re.M)}


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: path.name)
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.relative_to(ROOT)}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.relative_to(ROOT)}: no heading for #{anchor} in {linked.name}"


def test_index_lists_every_page():
    index = prose(DOCS / "index.md")
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not link {page.name}"


PYTHON_BLOCKS = [pytest.param(block, id=block.where()) for block in ALL_BLOCKS if block.language == "python"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS)
def test_python_block_compiles_and_imports_existing_names(block):
    tree = ast.parse(compile(block.text, block.where(), "exec", flags=ast.PyCF_ONLY_AST))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where()}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def test_mermaid_blocks_are_diagrams():
    mermaid = [block for block in ALL_BLOCKS if block.language == "mermaid"]
    assert mermaid, "docs/architecture.md should carry Mermaid diagrams"
    for block in mermaid:
        first = block.text.lstrip().split(None, 1)[0]
        assert first in ("flowchart", "graph", "sequenceDiagram", "classDiagram"), block.where()
        for number, line in enumerate(block.text.splitlines()):
            assert line.count('"') % 2 == 0, f"{block.where()}+{number + 1}: unbalanced quotes"


# ---------------------------------------------------------------------------------------------------------------------
# docs/api.md against the code


@dataclass
class ApiEntry:
    module: str
    name: str
    signature: str | None
    line: int
    table: list[tuple[str, str]]


def api_entries() -> list[ApiEntry]:
    entries, module = [], None
    for number, line in enumerate((DOCS / "api.md").read_text(encoding="utf-8").splitlines(), start=1):
        heading = re.match(r"^(#{3,4}) `([^`]+)`\s*$", line)
        if heading and heading.group(1) == "###":
            module = heading.group(2)
        elif heading:
            assert module is not None, f"api.md:{number}: entry outside a module section"
            match = re.fullmatch(r"([\w.]+)(\(.*\))?", heading.group(2))
            assert match, f"api.md:{number}: cannot read {heading.group(2)!r}"
            entries.append(ApiEntry(module, match.group(1), match.group(2), number, []))
        elif line.startswith("#"):
            continue
        elif entries and line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            entries[-1].table.append((cells[0].strip("`"), cells[1].strip("`")))
    return entries


def resolve(entry: ApiEntry):
    owner, obj = None, importlib.import_module(entry.module)
    for part in entry.name.split("."):
        owner = obj
        assert hasattr(obj, part), f"api.md:{entry.line}: {entry.module}.{entry.name} does not exist"
        obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
    return owner, obj


def plain_signature(owner, obj) -> str:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    signature = inspect.signature(obj)
    parameters = list(signature.parameters.values())
    if inspect.isclass(owner) and inspect.isfunction(obj) and parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    parameters = [parameter.replace(annotation=inspect.Parameter.empty) for parameter in parameters]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def test_api_entries_exist_with_their_signatures():
    entries = api_entries()
    assert len(entries) > 60
    for entry in entries:
        owner, obj = resolve(entry)
        if entry.signature is not None:
            assert plain_signature(owner, obj) == entry.signature, (
                f"api.md:{entry.line}: {entry.name}{entry.signature} but the code has {plain_signature(owner, obj)}"
            )


@pytest.mark.parametrize("config_name", ["GrinMoeConfig", "MhMoeConfig"])
def test_api_config_tables_match_the_fields(config_name):
    config_class = getattr(modeling_grin, config_name)
    (entry,) = [entry for entry in api_entries() if entry.name == config_name]
    documented = dict(entry.table)
    own_fields = set(vars(config_class)["__annotations__"])
    assert set(documented) == own_fields, f"undocumented: {own_fields - set(documented)}, unknown: " \
        f"{set(documented) - own_fields}"
    for field, default in documented.items():
        assert ast.literal_eval(default) == config_class.__dataclass_fields__[field].default, f"{config_name}.{field}"


def public_names(module) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name for name, obj in vars(module).items()
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    ]


def test_api_documents_every_public_name():
    documented = set()
    for entry in api_entries():
        documented.add(id(resolve(entry)[1]))
    missing = [
        f"{module_name}.{name}"
        for module_name in API_COMPLETE_MODULES
        for name in public_names(importlib.import_module(module_name))
        if id(getattr(importlib.import_module(module_name), name)) not in documented
    ]
    assert not missing, f"docs/api.md has no entry for {missing}"
