"""The align step: continual pre-training of the pruned model (or distillation from the original),
in-process or under torchrun."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoTokenizer

from loram_core.align import clear_checkpoint, train_causal_lm
from loram_core.config import AlignConfig, RunContext
from loram_core.data import load_blocks
from loram_core.distill.teacher import KD_KEYS, check_distillation, uses_teacher
from loram_core.dtypes import published_dtype, save_pretrained_as
from loram_core.launch import DeadlineExceeded
from loram_core.models import load_config, load_model
from loram_core.steps._common import Progress, commit, compute_device, step_dir, tmp_for
from loram_core.steps.heldout import with_heldout
from loram_core.steps.pruning import sparse_masks
from loram_core.steps.teacher import announce_plan, distiller_for, require_base, topk_cache
from loram_core.steps.torchrun import DEADLINE_FIX, align_torchrun, deadline_s

if TYPE_CHECKING:
    import torch


def align(
    align: AlignConfig,
    ctx: RunContext,
    pruned_dir: str,
    blocks_file: str,
    progress: Progress | None = None,
    heldout_file: str | None = None,
    base_dir: str | None = None,
) -> str:
    """Continual pre-training of the pruned model (or distillation: `align.objective`); resumes after a crash.

    Trains float32 master weights and saves the model in the published dtype (`ctx.dtype`; with
    `auto` the pruned checkpoint's own 16-bit dtype, which the prune step took from the base).
    `kd` and `cpt+kd` take the base as teacher (`loram_core.distill`); with `kd_mode: topk` its
    top-k cache is computed first, once per base and corpus (`steps.teacher.topk_cache`). The memory
    plan is logged before the first step.

    Args:
        align: the `align` section (`nproc_per_node` > 1 runs it under torchrun).
        ctx: the run's work dir and device.
        pruned_dir: the pruned checkpoint (`prune`).
        blocks_file: the corpus's packed blocks (`prepare_corpus`); trained on its training split.
        progress: called with `{"step", "total", "loss", ...}` as training goes (and `heldout_loss`
            every `align.eval_every` steps, given `heldout_file`).
        heldout_file: the eval blocks (`prepare_eval`); the first `HELDOUT_BLOCKS` are scored for
            the held-out points (in-process alignment; they do not change the result).
        base_dir: the original checkpoint, the teacher of `kd` and `cpt+kd` (unused by `cpt`).
    """
    device = compute_device(ctx)
    config = load_config(pruned_dir)
    dtype = published_dtype(config, ctx.dtype)
    distilling = uses_teacher(align)
    out = step_dir(ctx, "align", align_key(align, pruned_dir, blocks_file, device.type, dtype, base_dir))
    if (out / "config.json").is_file():
        return str(out)
    if not align.enabled:
        return pruned_dir
    check_distillation(align, config.vocab_size, device)
    work = out.with_name(out.name + ".partial")  # checkpoints live here until the model is saved
    work.mkdir(parents=True, exist_ok=True)
    cache = (
        topk_cache(align, ctx, base_dir, blocks_file, device)
        if distilling and align.kd_mode == "topk"
        else None
    )
    plan = announce_plan(align, pruned_dir, base_dir, cache, _seq_len(blocks_file), device)
    tmp = tmp_for(out)
    if align.nproc_per_node > 1:
        result = align_torchrun(align, pruned_dir, blocks_file, work, tmp, progress, ctx.gpus, dtype,
                                teacher_dir=base_dir if distilling else None, topk_file=cache)  # fmt: skip
    else:
        model = load_model(pruned_dir).to(device)  # fp32 master weights; bf16 autocast on a GPU
        blocks = load_blocks(blocks_file)
        points: list[tuple[int, float]] = []
        report = with_heldout(progress, model, heldout_file, align, points)
        result = train_causal_lm(
            model, blocks.train, align, checkpoint_dir=work, masks=sparse_masks(pruned_dir),
            progress=_with_deadline(report, deadline_s(align), work),
            distiller=distiller_for(align, base_dir, cache, blocks.train, device),
        ).to_dict()  # fmt: skip
        result["heldout"] = points
        save_pretrained_as(model, tmp, dtype)
    result["memory_plan"] = plan
    AutoTokenizer.from_pretrained(pruned_dir).save_pretrained(tmp)
    shutil.copytree(Path(pruned_dir) / "masks", tmp / "masks")
    (tmp / "train_log.json").write_text(json.dumps(result))
    commit(tmp, out)
    clear_checkpoint(work)
    shutil.rmtree(work, ignore_errors=True)
    return str(out)


def align_key(
    align: AlignConfig,
    pruned_dir: str,
    blocks_file: str,
    device_type: str,
    dtype: torch.dtype,
    base_dir: str | None = None,
) -> dict:
    """What the align step's output depends on: its work dir is `align-<fingerprint of this>`.

    Neither a deadline nor the held-out points (`eval_every`) change the result; nor do the
    distillation keys under `cpt`, so `cpt` work dirs made before those keys existed keep their
    keys. `kd` and `cpt+kd` add the teacher.
    """
    distilling = uses_teacher(align)
    unused = {"deadline_minutes", "eval_every", *(() if distilling else KD_KEYS)}
    key = {
        "align": align.model_dump(exclude=unused),
        "pruned": pruned_dir,
        "corpus": blocks_file,
        "device": device_type,
        "dtype": str(dtype),
    }
    if distilling:
        key["teacher"] = require_base(align, base_dir)
    return key


def _seq_len(blocks_file: str) -> int:
    """The training blocks' length, from the file's header (the blocks themselves are not read)."""
    from safetensors import safe_open

    with safe_open(blocks_file, framework="pt") as f:
        return f.get_slice("train").get_shape()[1]


def _with_deadline(progress: Progress | None, deadline: float | None, work: Path) -> Progress | None:
    """The in-process loop's progress callback, which stops training once the deadline has passed."""
    if deadline is None:
        return progress
    end = time.monotonic() + deadline

    def report(event: dict) -> None:
        if progress is not None:
            progress(event)
        if time.monotonic() > end:
            raise DeadlineExceeded(
                f"alignment ran past align.deadline_minutes={deadline / 60:.4g} and was stopped at step "
                f"{event['step']}/{event['total']}. Its checkpoint in {work} is kept: {DEADLINE_FIX}"
            )

    return report


def train_log(aligned_dir: str) -> dict:
    """The alignment run's loss history and throughput (empty when alignment was off)."""
    log = Path(aligned_dir) / "train_log.json"
    if not log.is_file():
        return {"losses": [], "tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0, "resumed_from": None}
    return json.loads(log.read_text())
