"""Optimizers for full-parameter training: torch's AdamW, or memory-light FLoRA."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from loram_core.optim.flora import Flora

__all__ = ["OPTIMIZERS", "Flora", "build_optimizer", "optimizer_state_bytes"]

OPTIMIZERS = ("adamw", "flora")


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    flora_rank: int = 8,
    flora_kappa: int = 100,
    seed: int = 0,
    fused: bool = False,
    masks: Mapping[torch.Tensor, torch.Tensor] | None = None,
) -> torch.optim.Optimizer:
    """Builds the optimizer named in the config.

    Args:
        name: ``"adamw"`` (torch's AdamW) or ``"flora"`` (:class:`Flora`).
        params: Parameters or parameter groups to optimize.
        lr: Learning rate.
        weight_decay: Decoupled weight decay.
        betas: First- and second-moment decay rates.
        flora_rank: Rank of Flora's momentum projection (ignored by AdamW).
        flora_kappa: Steps between Flora's projection resamplings (ignored by AdamW).
        seed: Base seed of Flora's projections (ignored by AdamW).
        fused: AdamW's fused CUDA kernel (one launch for all parameters; ignored by Flora).
        masks: Parameter -> bool keep-mask of sparse weights, for Flora's kept-only statistics
            (ignored by AdamW: gradients zeroed at pruned positions keep its moments zero there).

    Returns:
        The optimizer.

    Raises:
        ValueError: If ``name`` is not one of :data:`OPTIMIZERS`.
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)
    if name == "flora":
        return Flora(
            params,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            rank=flora_rank,
            kappa=flora_kappa,
            seed=seed,
            masks=masks,
        )
    raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in any torch optimizer's per-parameter state.

    Args:
        optimizer: The optimizer, after at least one step (state is created lazily).

    Returns:
        Total ``numel * element_size`` over state tensors, nested containers included.
    """

    def count(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, Mapping):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        return 0

    return sum(count(state) for state in optimizer.state.values())
