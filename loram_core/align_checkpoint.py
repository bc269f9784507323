"""The training loop's checkpoint: one folder, swapped in so that a kill at any moment leaves one to resume.

`<dir>/checkpoint/` holds `model.safetensors`, `state.pt` (optimizer, scheduler, RNG) and
`trainer.json` (step, loss history), written in that order: `trainer.json` is the mark of a complete
folder. A new checkpoint is written to `checkpoint.tmp`, the current one renamed `checkpoint.old`,
the new one renamed `checkpoint`, and `checkpoint.old` removed. A kill (SIGKILL, power loss after
the fsyncs) can stop that sequence anywhere; `settle` brings every state it can leave back to one
complete `checkpoint`, so both resuming and the next save work:

| left behind                                   | means                          | settle                 |
|-----------------------------------------------|--------------------------------|------------------------|
| `checkpoint` + partial/complete `.tmp`        | killed before the swap         | drop `.tmp`            |
| `.old` + complete `.tmp`                      | killed between the two renames | `.old` -> `checkpoint` |
| `checkpoint` + complete/partly removed `.old` | killed after the swap          | drop `.old`            |

A `.tmp` that was never renamed in is dropped, not used: the trajectory from the older checkpoint
is the same (the data order and RNG are restored with it), only a few steps are recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import nn

MARKER = "trainer.json"


def sibling(ckpt_dir: Path, suffix: str) -> Path:
    """`checkpoint` -> `checkpoint<suffix>` in the same folder."""
    return ckpt_dir.with_name(ckpt_dir.name + suffix)


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a finished checkpoint (its marker, written last, exists)."""
    return (folder / MARKER).is_file()


def settle(ckpt_dir: Path) -> None:
    """Repair what an interrupted swap left (see the module's table): afterwards only `ckpt_dir` remains.

    Run by the one process that writes checkpoints, before it resumes and before every save.
    """
    old = sibling(ckpt_dir, ".old")
    if not ckpt_dir.exists() and is_complete(old):
        old.rename(ckpt_dir)  # killed between the renames: the parked checkpoint is the latest
        _fsync_dir(ckpt_dir.parent)
    # `.old` is only ever removed once `checkpoint` exists, so dropping it here loses nothing.
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(sibling(ckpt_dir, ".tmp"), ignore_errors=True)


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    """The complete checkpoint to resume from (call `settle` first), or None."""
    return ckpt_dir if is_complete(ckpt_dir) else None


def save_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    state: dict[str, Any],
    trainer: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint beside the current one, then swap it in (see the module docstring).

    Args:
        ckpt_dir: the checkpoint folder (`<checkpoint_dir>/checkpoint`).
        model: the model whose parameters are saved (unless `model_state` is given).
        state: what `torch.load(weights_only=True)` reads back: optimizer, scheduler, RNG.
        trainer: the JSON marker's content (step, loss history, tokens, seconds).
        model_state: a full state dict to save instead of `model`'s (gathered from several processes).
    """
    settle(ckpt_dir)
    tmp, old = sibling(ckpt_dir, ".tmp"), sibling(ckpt_dir, ".old")
    tmp.mkdir(parents=True)
    weights = tmp / "model.safetensors"
    if model_state is None:
        save_model(model, str(weights))
    else:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(weights))
    torch.save(state, tmp / "state.pt")
    (tmp / MARKER).write_text(json.dumps(trainer))
    for name in ("model.safetensors", "state.pt", MARKER):
        _fsync_file(tmp / name)  # on disk before the renames make them the checkpoint
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    _fsync_dir(ckpt_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def clear_checkpoint(checkpoint_dir: str | Path) -> None:
    """Remove a finished run's checkpoint; call it once the final model is safely saved."""
    for suffix in ("", ".tmp", ".old"):
        shutil.rmtree(Path(checkpoint_dir) / f"checkpoint{suffix}", ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
