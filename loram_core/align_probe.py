"""`align.micro_batch_size: auto`: the largest micro-batch whose training step fits in GPU memory.

The probe must measure what training will hold, or the size it picks fails at step 1:
- the model in train mode, with activation checkpointing already on when it is configured;
- the optimizer state, which exists only after the first step (created lazily): AdamW keeps two
  moments per trained parameter in the parameter's dtype (fp32 masters: 8 bytes per parameter),
  FLoRA its factored state. The bytes still missing are held in a placeholder during the probe;
- one size for every rank: ranks with more or less free memory would otherwise split the same
  batch differently (a MIN over ranks, `loram_core.distributed.min_over_ranks`).
The probe's passes are not training: its gradients are discarded and it is timed apart
(`TrainResult.probe_seconds`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def _local_numel(p: torch.Tensor) -> int:
    """Elements this process holds of `p` (its shard for an FSDP2 DTensor)."""
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def planned_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's per-parameter state will hold once it has stepped (this process's share).

    AdamW (and any optimizer other than FLoRA): two moments the size and dtype of each parameter,
    plus its step counter. FLoRA: the state its own initialisation builds, built here on the meta
    device (nothing allocated) and counted.

    Args:
        optimizer: a torch optimizer, with or without state yet.

    Returns:
        Bytes of state tensors, summed over every parameter that requires a gradient.
    """
    from loram_core.optim import Flora, optimizer_state_bytes

    total = 0
    for index, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            if not p.requires_grad:
                continue
            if isinstance(optimizer, Flora):
                local = torch.empty(p.shape if not hasattr(p, "to_local") else p.to_local().shape,
                                    dtype=p.dtype, device="meta")  # fmt: skip
                state: dict = {}
                Flora._init_state(local, state, group, index * 100_003 + k)
                total += sum(
                    v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)
                )
            else:
                total += 2 * _local_numel(p) * p.element_size() + 4  # exp_avg, exp_avg_sq, step
    # After a resume the state already exists and takes memory of its own: only the rest is missing.
    return max(0, total - optimizer_state_bytes(optimizer))


def reserve_memory(nbytes: int, device: torch.device) -> torch.Tensor:
    """An untouched `nbytes` buffer on `device`: what the probe leaves free for the optimizer state."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def halve_until_it_fits(batch_size: int, attempt: Callable[[int], None], oom: type[BaseException]) -> int:
    """The largest of `batch_size, batch_size // 2, ..., 1` for which `attempt(size)` does not raise `oom`.

    Args:
        batch_size: the first size tried.
        attempt: runs one training pass of `size` samples; raises `oom` when it does not fit.
        oom: the out-of-memory exception type (`torch.cuda.OutOfMemoryError` on a GPU).

    Returns:
        The size that fit, or 0 when not even one sample did.
    """
    size = batch_size
    while size >= 1:
        try:
            attempt(size)
            return size
        except oom:
            size //= 2
    return 0
