"""`loram --help`, every command's `--help` and a refused config answer without the heavy stack.

Each runs in a subprocess in which torch, transformers, peft, bitsandbytes, datasets and prefect
cannot be imported at all: if a command reached for one of them before answering, it would fail
with an ImportError instead of printing its help or its one-paragraph error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "prefect", "safetensors")
COMMANDS = ("run", "inspect", "pull", "plan", "recover", "merge", "original", "verify", "deploy")

WITHOUT_HEAVY = f"""
import sys
from importlib.abc import MetaPathFinder

class Refuse(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is not importable in this test")
        return None

sys.meta_path.insert(0, Refuse())
sys.argv = ["loram", *sys.argv[1:]]
from loram_provider.flows.cli import main
main()
"""


def loram_light(*args: str) -> subprocess.CompletedProcess:
    """`loram ARGS` with the heavy libraries made unimportable."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_HEAVY, *args], capture_output=True, text=True, cwd=REPO
    )


def test_help_answers_without_the_heavy_stack() -> None:
    result = loram_light("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


def test_version_answers_without_the_heavy_stack() -> None:
    from loram_core import __version__

    result = loram_light("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"loram-provider {__version__}") and len(result.stdout.splitlines()) == 1


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_help_answers_without_the_heavy_stack(command: str) -> None:
    result = loram_light(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "ImportError" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("run", "configs/demo.yaml", "prune.ratio=2"), "`prune.ratio` = 2: Input should be less than 1"),
        (
            ("run", "configs/demo.yaml", "prune.ration=0.5"),
            "unknown key `prune.ration` (set on the command line: prune.ration=0.5); did you mean `prune.ratio`?",
        ),
        (("run", "configs/demo.yaml", "publish.latest=maybe"), "Input should be 'auto', True or False"),
        (("run", "configs/nope.yaml"), "config file 'configs/nope.yaml' does not exist"),
        (("verify", "configs/demo.yaml", "align.steps=0"), "`align.steps` = 0"),
        (("verify", "configs/demo.yaml", "until=prune"), "verification needs a pruned and aligned base"),
        (
            ("recover", "--base", "b", "--adapter", "a", "--out", "o", "--mode", "zero"),
            "--mode 'zero' is not",
        ),
        (("merge", "--original", "o", "--adapter", "a", "--out", "x", "--dtype", "int8"), "--dtype 'int8'"),
    ],
)
def test_refused_input_answers_without_the_heavy_stack(args: tuple[str, ...], expected: str) -> None:
    result = loram_light(*args)
    assert result.returncode == 2, result.stderr
    assert expected in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout
