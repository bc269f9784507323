"""The installed distribution coexists with others: no generic top-level names, every package shipped."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def _declared() -> tuple[list[str], dict[str, str]]:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["packages"], setuptools.get("package-dir", {})


def test_every_package_on_disk_is_declared_under_a_project_name() -> None:
    """A new subpackage (a folder with `__init__.py`) missing from pyproject would not be installed."""
    packages, package_dir = _declared()
    on_disk = {
        str(p.parent.relative_to(REPO))
        for top in ("loram_core", "flows", "tasks")
        for p in (REPO / top).rglob("__init__.py")
    }
    declared = {package_dir.get(name, name.replace(".", "/")) for name in packages}
    assert on_disk == declared
    assert {name.split(".")[0] for name in packages} == {"loram_core", "loram_provider"}


def test_installed_distribution_claims_no_generic_top_level_name() -> None:
    """`tasks` and `flows` collide with any other distribution that ships them; ours are under loram_provider."""
    top_level = set(importlib.metadata.distribution("loram-provider").read_text("top_level.txt").split())
    assert top_level == {"loram_core", "loram_provider"}
    script = next(e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "loram")
    assert script.value == "loram_provider.flows.cli:main"


def test_built_wheel_holds_only_the_project_names(tmp_path: Path) -> None:
    """The wheel a user installs: loram_core and loram_provider.{flows,tasks}, nothing at the top besides."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # a copy: setuptools leaves build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("loram_core", "flows", "tasks"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("loram_provider-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"loram_core", "loram_provider"}
    assert "loram_provider/flows/cli.py" in names and "loram_provider/tasks/steps.py" in names
    assert "loram_core/modeling_loram.py" in names  # copied into structured versions at publish
