"""The global concurrency limit that pruning and alignment take while they compute on a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.concurrency.sync import concurrency

from loram_core.config import PipelineConfig, RunContext
from loram_core.steps import compute_device

# One slot per GPU of the host (`loram deploy --gpus N` creates the limit). Slots are leases the
# holder renews in the background: a process killed outright gives its slots back when the lease
# expires (LEASE_S seconds), so none leaks; every other way out releases them at once.
GPU_LIMIT = "gpu"
LEASE_S = 120.0


@contextmanager
def gpu_slots(ctx: RunContext | PipelineConfig, slots: int = 1) -> Iterator[None]:
    """Hold `slots` of the `gpu` limit while a step computes on CUDA (nothing on the CPU).

    Args:
        ctx: the run's context (its `device` decides).
        slots: GPUs the step uses (alignment under torchrun: `align.nproc_per_node`).

    Without a `gpu` limit on the server the step runs at once (Prefect logs that none exists).
    """
    if compute_device(ctx).type != "cuda":
        yield
        return
    with concurrency(GPU_LIMIT, occupy=slots, lease_duration=LEASE_S):
        yield
