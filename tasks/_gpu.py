"""The GPUs a step computes on: the global `gpu` limit admits it, a host lease says which GPU.

Pruning, alignment, quantization, evaluation and verification compute on the run's device. On CUDA
each takes as many slots of the `gpu` limit as GPUs it uses (the server queues the rest, visible in
the UI) and then leases that many GPU indices of its host (`loram_core.gpus`): the step runs on the
leased GPU (`device` becomes `cuda:<index>`) and torchrun sees only its leased GPUs
(`CUDA_VISIBLE_DEVICES`). A step key depends on the device's type, not its index, so a cached
step is reused whichever GPU it ran on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger

from loram_core.config import PipelineConfig, RunContext
from loram_core.gpus import lease_gpus
from loram_core.steps import compute_device

# One slot per GPU of the host (`loram deploy --gpus N` creates the limit). Slots are leases the
# holder renews in the background: a process killed outright gives its slots back when the lease
# expires (LEASE_S seconds), so none leaks; every other way out releases them at once.
GPU_LIMIT = "gpu"
LEASE_S = 120.0

Ctx = TypeVar("Ctx", RunContext, PipelineConfig)


def pinned_index(device: str) -> int | None:
    """The GPU index a `device` setting names (`cuda:N`), None for `auto` or `cuda`."""
    head, _, index = device.partition(":")
    return int(index) if head == "cuda" and index else None


@contextmanager
def gpu_slots(ctx: Ctx, slots: int = 1) -> Iterator[Ctx]:
    """Hold `slots` of the `gpu` limit and as many GPUs of this host while a step computes on CUDA.

    Args:
        ctx: the run's context or config (its `device` decides; nothing is held on the CPU).
        slots: GPUs the step uses (alignment under torchrun: `align.nproc_per_node`).

    Yields:
        `ctx` with `device` set to the leased GPU (`cuda:<index>`; a `RunContext` also gets `gpus`,
        every leased index, for torchrun); on the CPU `ctx` unchanged.

    Without a `gpu` limit on the server the step is admitted at once (Prefect logs that none exists);
    the host lease still keeps concurrent steps on different GPUs.
    """
    if compute_device(ctx).type != "cuda":
        yield ctx
        return
    admitted = concurrency(GPU_LIMIT, occupy=slots, lease_duration=LEASE_S)  # the server queues the rest
    with admitted, lease_gpus(slots, pinned=pinned_index(ctx.device)) as indices:
        update: dict = {"device": f"cuda:{indices[0]}"}
        if isinstance(ctx, RunContext):
            update["gpus"] = indices
        _logger().info("holding GPU(s) %s of this host", ", ".join(map(str, indices)))
        yield ctx.model_copy(update=update)


def _logger():
    """The task run's logger (its lines reach the UI), or a plain one outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("loram.gpu")
