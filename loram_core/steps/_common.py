"""What every step shares: its keyed output directory, the atomic commit, the run's device."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loram_core.config import PipelineConfig, RunContext, fingerprint

if TYPE_CHECKING:
    import torch

Progress = Callable[[dict], None]


def step_dir(ctx: RunContext | PipelineConfig, name: str, key: dict) -> Path:
    """`<workdir>/<name>-<hash of key>`: where a step with these inputs and settings keeps its output."""
    return Path(ctx.workdir).expanduser() / f"{name}-{fingerprint(key)}"


def compute_device(ctx: RunContext | PipelineConfig) -> torch.device:
    """The device every in-process step computes on (`device`, with `auto` resolved)."""
    from loram_core.device import resolve_device

    return resolve_device(ctx.device)


def commit(tmp: Path, final: Path) -> Path:
    """Rename a complete temporary output into place (replacing a stale one): no half-written step."""
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def fresh(path: Path) -> Path:
    """An empty directory at `path` (whatever an interrupted run left there is removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def tmp_for(out: Path) -> Path:
    """A fresh `<out>.tmp` to write a step's output into before `commit`."""
    return fresh(out.with_name(out.name + ".tmp"))
