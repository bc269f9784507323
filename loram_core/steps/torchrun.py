"""Alignment under torchrun: the launcher that runs `loram_core.align_worker` on this node's GPUs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loram_core.config import AlignConfig
from loram_core.errors import LoramError
from loram_core.launch import DeadlineExceeded, run_group
from loram_core.steps._common import Progress

if TYPE_CHECKING:
    import torch

DEADLINE_FIX = "run it again to resume from there, with a larger align.deadline_minutes (or none)."


def deadline_s(align: AlignConfig) -> float | None:
    """`align.deadline_minutes` in seconds (None: no deadline)."""
    minutes = align.deadline_minutes
    return None if minutes is None else 60.0 * minutes


def torchrun_env(gpus: list[int] | None) -> dict[str, str] | None:
    """torchrun's environment: this one, seeing only the leased `gpus` (None: inherit unchanged)."""
    if gpus is None:
        return None
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpus)}


def align_torchrun(
    align: AlignConfig,
    pruned_dir: str,
    blocks_file: str,
    work: Path,
    out: Path,
    progress: Progress | None,
    gpus: list[int] | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Run the alignment loop in `align.nproc_per_node` processes on this node under torchrun.

    The workers read the `align` section from `<work>/align-config.json`, checkpoint into `work`
    and save the model into `out` (in `dtype`; default float32); their progress lines are handed to
    `progress`. With `gpus` (the step's leased GPU indices) torchrun sees only those
    (`CUDA_VISIBLE_DEVICES`).

    Returns:
        The training result the workers recorded (losses, tokens, throughput).

    Raises:
        DeadlineExceeded: past `align.deadline_minutes` (the process group is killed, the checkpoint kept).
        LoramError: torchrun exited with an error.
    """
    config_file = work / "align-config.json"
    config_file.write_text(align.model_dump_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={align.nproc_per_node}", "-m", "loram_core.align_worker",
           "--config", str(config_file), "--pruned", pruned_dir, "--blocks", blocks_file,
           "--workdir", str(work), "--out", str(out),
           "--dtype", str(dtype or "float32").removeprefix("torch.")]  # fmt: skip

    def on_line(line: str) -> None:
        if line.startswith('{"progress"'):
            if progress is not None:
                progress(json.loads(line)["progress"])
        else:
            sys.stdout.write(line)

    what = f"alignment under torchrun ({align.nproc_per_node} processes)"
    try:  # torchrun and its workers run in a process group of their own, killed on every exit path
        code = run_group(cmd, on_line, deadline_s(align), what, env=torchrun_env(gpus))
    except DeadlineExceeded as err:
        raise DeadlineExceeded(f"{err} Its checkpoint in {work} is kept: {DEADLINE_FIX}") from None
    if code:
        raise LoramError(
            f"{what} exited with code {code}; the workers' errors are in the log above. Its checkpoint "
            f"in {work} is kept."
        )
    result_file = out / "train_result.json"
    result = json.loads(result_file.read_text())
    result_file.unlink()  # not part of the model directory
    return result
