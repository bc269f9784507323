"""Pruning strategies, registered by name in one place.

Every strategy takes the base checkpoint directory and calibration blocks and writes a pruned
checkpoint (safetensors, config.json with a `loram` section for structured widths) plus returns
its masks. `prune_checkpoint` is the one entry point the pipeline calls.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from loram_core.config import PruneConfig
from loram_core.prune.masks import Masks, load_masks, save_masks
from loram_core.prune.plan import Plan, plan, pruned_layer_widths, structured_config

ProgressFn = Callable[[str, int, int], None]  # (what, done, total)


class Pruner(Protocol):
    def __call__(
        self,
        base_dir: Path,
        out_dir: Path,
        cfg: PruneConfig,
        calib: torch.Tensor,
        progress: ProgressFn | None,
        device: torch.device | str,
    ) -> Masks: ...


def _registry() -> dict[str, Pruner]:
    # Imported here so that `loram plan` does not pay for the solvers.
    from loram_core.prune.sequential import prune_sparse
    from loram_core.prune.structured import prune_structured

    return {
        "random": prune_structured,
        "structured": prune_structured,
        "semi": prune_sparse,
        "unstructured": prune_sparse,
    }


def prune_checkpoint(
    base_dir: str | Path,
    out_dir: str | Path,
    cfg: PruneConfig,
    calib: torch.Tensor,
    progress: ProgressFn | None = None,
    device: torch.device | str = "cpu",
) -> Masks:
    """Prune the checkpoint in `base_dir` into `out_dir` (weights + config) and return its masks.

    Args:
        base_dir: the original checkpoint (safetensors), read one decoder layer at a time.
        out_dir: where the pruned checkpoint is written (one shard per decoder layer + index).
        cfg: the `prune` section.
        calib: int `[n, seq_len]` calibration blocks (the first `cfg.calib_samples` are used).
        progress: called with (phase, done, total).
        device: where each streamed layer computes (its Hessians, solver and activations too).
    """
    pruner = _registry()[cfg.strategy]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return pruner(Path(base_dir), out_dir, cfg, calib, progress, device)


__all__ = [
    "Masks",
    "Plan",
    "load_masks",
    "plan",
    "prune_checkpoint",
    "pruned_layer_widths",
    "save_masks",
    "structured_config",
]
