"""Which GPUs of this host a step computes on: an exclusive lease per GPU index, by file lock.

The orchestrator's `gpu` limit admits as many GPU steps at once as the host has GPUs, but a count
does not say *which* GPU each may use: without a lease every `device: auto` step resolves to
cuda:0 and two concurrent runs stack there while the others idle. A lease takes one `flock` per
GPU index (`<lock dir>/gpu-<i>.lock`), so two processes on the host never hold the same index,
and a process killed outright releases its locks with its file descriptors: nothing leaks.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from loram_core.errors import LoramError


def visible_gpu_count() -> int:
    """GPUs this process can use (`torch.cuda.device_count()`, 0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def lock_dir() -> Path:
    """Where the host's GPU locks live: `LORAM_GPU_LOCK_DIR`, else `/tmp/loram-gpu-locks`."""
    return Path(os.environ.get("LORAM_GPU_LOCK_DIR", "/tmp/loram-gpu-locks"))


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `path`, or None if another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def lease_gpus(
    count: int,
    pinned: int | None = None,
    available: int | None = None,
    poll_s: float = 1.0,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[list[int]]:
    """Hold `count` GPUs of this host exclusively for the body; yields their indices.

    Args:
        count: GPUs the step needs (alignment under torchrun: `align.nproc_per_node`).
        pinned: the index a `device: cuda:N` setting names (then `count` must be 1); None: any free.
        available: GPUs on the host (default: `visible_gpu_count()`).
        poll_s: seconds between attempts while not enough GPUs are free.
        on_wait: called before each wait (tests use it to free a GPU at a known point).

    Raises:
        LoramError: more GPUs asked than the host has, or a pinned index it lacks.
    """
    total = visible_gpu_count() if available is None else available
    wanted = [pinned] if pinned is not None else list(range(total))
    if count > total or (pinned is not None and (pinned >= total or count != 1)):
        raise LoramError(
            f"this step needs {count} GPU(s){f' (cuda:{pinned})' if pinned is not None else ''} but the host "
            f"has {total}; lower align.nproc_per_node or pick device=cuda:N with N < {total}."
        )
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    held: dict[int, int] = {}
    try:
        while True:
            for index in wanted:
                if index not in held and len(held) < count:
                    fd = _try_lock(folder / f"gpu-{index}.lock")
                    if fd is not None:
                        held[index] = fd
            if len(held) == count:
                break
            for fd in held.values():  # never sit on a partial set while waiting: two waiters could deadlock
                os.close(fd)
            held.clear()
            if on_wait is not None:
                on_wait()
            time.sleep(poll_s)
        yield sorted(held)
    finally:
        for fd in held.values():
            os.close(fd)  # closing the descriptor releases its flock
