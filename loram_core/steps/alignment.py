"""The align step: continual pre-training of the pruned model, in-process or under torchrun."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from transformers import AutoTokenizer

from loram_core.align import clear_checkpoint, train_causal_lm
from loram_core.config import AlignConfig, RunContext
from loram_core.data import load_blocks
from loram_core.dtypes import published_dtype, save_pretrained_as
from loram_core.launch import DeadlineExceeded
from loram_core.models import load_config, load_model
from loram_core.steps._common import Progress, commit, compute_device, step_dir, tmp_for
from loram_core.steps.pruning import sparse_masks
from loram_core.steps.torchrun import DEADLINE_FIX, align_torchrun, deadline_s


def align(
    align: AlignConfig, ctx: RunContext, pruned_dir: str, blocks_file: str, progress: Progress | None = None
) -> str:
    """Continual pre-training of the pruned model; resumes from the last checkpoint after a crash.

    Trains float32 master weights and saves the model in the published dtype (`ctx.dtype`; with
    `auto` the pruned checkpoint's own 16-bit dtype, which the prune step took from the base).

    Args:
        align: the `align` section (`nproc_per_node` > 1 runs it under torchrun).
        ctx: the run's work dir and device.
        pruned_dir: the pruned checkpoint (`prune`).
        blocks_file: the corpus's packed blocks (`prepare_corpus`); trained on its training split.
        progress: called with `{"step", "total", "loss", ...}` as training goes.
    """
    device = compute_device(ctx)
    dtype = published_dtype(load_config(pruned_dir), ctx.dtype)
    key = {
        "align": align.model_dump(exclude={"deadline_minutes"}),  # a deadline does not change the result
        "pruned": pruned_dir,
        "corpus": blocks_file,
        "device": device.type,
        "dtype": str(dtype),
    }
    out = step_dir(ctx, "align", key)
    if (out / "config.json").is_file():
        return str(out)
    if not align.enabled:
        return pruned_dir
    work = out.with_name(out.name + ".partial")  # checkpoints live here until the model is saved
    work.mkdir(parents=True, exist_ok=True)
    tmp = tmp_for(out)
    if align.nproc_per_node > 1:
        result = align_torchrun(align, pruned_dir, blocks_file, work, tmp, progress, ctx.gpus, dtype)
    else:
        model = load_model(pruned_dir).to(device)  # fp32 master weights; bf16 autocast on a GPU
        blocks = load_blocks(blocks_file)
        result = train_causal_lm(
            model, blocks.train, align, checkpoint_dir=work, masks=sparse_masks(pruned_dir),
            progress=_with_deadline(progress, deadline_s(align), work),
        ).to_dict()  # fmt: skip
        save_pretrained_as(model, tmp, dtype)
    AutoTokenizer.from_pretrained(pruned_dir).save_pretrained(tmp)
    shutil.copytree(Path(pruned_dir) / "masks", tmp / "masks")
    (tmp / "train_log.json").write_text(json.dumps(result))
    commit(tmp, out)
    clear_checkpoint(work)
    shutil.rmtree(work, ignore_errors=True)
    return str(out)


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
