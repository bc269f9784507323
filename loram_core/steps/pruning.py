"""The prune step: the base model pruned by the `prune` section, with its masks."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from loram_core.config import PruneConfig, RunContext
from loram_core.dtypes import cast_checkpoint, published_dtype
from loram_core.models import load_config
from loram_core.prune import load_masks, prune_checkpoint, save_masks
from loram_core.steps._common import Progress, commit, compute_device, step_dir, tmp_for


def prune(
    prune: PruneConfig, ctx: RunContext, base_dir: str, calib_file: str, progress: Progress | None = None
) -> str:
    """Prune the base model; returns a directory with the checkpoint, tokenizer and `masks/`.

    The checkpoint is written in the published dtype (`ctx.dtype`, see `loram_core.dtypes`), whatever
    `prune.dtype` computed in: it is what a version without alignment publishes, and what the
    pruned perplexity is measured on.

    Args:
        prune: the `prune` section.
        ctx: the run's work dir and device.
        base_dir: the original checkpoint.
        calib_file: the calibration blocks (`prepare_calibration`).
        progress: called with `{"step", "total", "what"}` per layer and phase.
    """
    device = compute_device(ctx)
    dtype = published_dtype(load_config(base_dir), ctx.dtype)
    key = {"prune": prune.model_dump(), "base": base_dir, "calibration": calib_file, "device": device.type,
           "dtype": str(dtype)}  # fmt: skip
    out = step_dir(ctx, "prune", key)
    if (out / "config.json").is_file():
        return str(out)
    tmp = tmp_for(out)
    calib = load_file(calib_file)["blocks"]
    torch.manual_seed(prune.seed)

    def report(what: str, done: int, total: int) -> None:
        if progress is not None:
            progress({"step": done, "total": total, "what": what})

    masks = prune_checkpoint(base_dir, tmp, prune, calib, report, device=device)
    cast_checkpoint(tmp, dtype)  # a no-op where prune.dtype already is the published dtype
    save_masks(masks, tmp / "masks" / "masks.safetensors")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    return str(commit(tmp, out))


def sparse_masks(pruned_dir: str) -> dict[str, torch.Tensor] | None:
    """The keep-masks of a sparse pruned checkpoint (parameter name -> 0/1 tensor), None if structured."""
    masks = load_masks(Path(pruned_dir) / "masks" / "masks.safetensors")
    return masks.keep_masks() or None
