"""This package's version as published versions record it: `0.1.0`, or `0.1.0+gabc1234` in a checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path

from loram_core import __version__


def code_version() -> str:
    """This package's version, with the git commit when it runs from a checkout (`0.1.0+gabc1234`)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return f"{__version__}+g{sha}"
    except (OSError, subprocess.CalledProcessError):
        return __version__
