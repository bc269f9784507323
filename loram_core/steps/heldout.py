"""Held-out points during alignment: the pruned model's loss on a few eval blocks every
`align.eval_every` steps, and the original's loss on the same blocks (the loss curve's reference)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from loram_core.config import AlignConfig, RunContext
from loram_core.models import load_model
from loram_core.steps._common import Progress, commit, compute_device, step_dir, tmp_for

if TYPE_CHECKING:
    import torch
    from torch import nn

# Held-out points during alignment score this many eval blocks: a forward pass each, no gradient.
HELDOUT_BLOCKS = 8


def heldout_loss(model: nn.Module, blocks: torch.Tensor) -> float:
    """Mean next-token loss of `model` on `blocks` (ln of their perplexity, as `evaluate` scores them)."""
    import math

    from loram_core.evaluate import perplexity

    return math.log(perplexity(model, blocks, batch_size=HELDOUT_BLOCKS))


def reference_loss(ctx: RunContext, base_dir: str, heldout_file: str) -> float:
    """The original model's held-out loss on the blocks alignment's held-out points are scored on.

    One forward pass over `HELDOUT_BLOCKS` eval blocks on the run's device; cached like a step.
    """
    from safetensors.torch import load_file

    device = compute_device(ctx)
    out = step_dir(ctx, "reference", {"base": base_dir, "eval": heldout_file, "blocks": HELDOUT_BLOCKS,
                                      "device": device.type})  # fmt: skip
    if (out / "loss.json").is_file():
        return json.loads((out / "loss.json").read_text())["loss"]
    from loram_core.device import default_dtype

    blocks = load_file(heldout_file)["blocks"][:HELDOUT_BLOCKS]
    loss = heldout_loss(load_model(base_dir, dtype=default_dtype(device, "auto")).to(device), blocks)
    tmp = tmp_for(out)
    (tmp / "loss.json").write_text(json.dumps({"loss": loss, "blocks": int(blocks.shape[0])}))
    commit(tmp, out)
    return loss


def with_heldout(
    progress: Progress | None,
    model: nn.Module,
    heldout_file: str | None,
    align: AlignConfig,
    points: list[tuple[int, float]],
) -> Progress | None:
    """The loop's progress callback, with the held-out loss added at the first log line at or after
    every `align.eval_every` steps (and at the last step); `points` collects them."""
    if heldout_file is None or align.eval_every is None:
        return progress
    from safetensors.torch import load_file

    blocks = load_file(heldout_file)["blocks"][:HELDOUT_BLOCKS]
    due = [align.eval_every]

    def report(event: dict) -> None:
        if event["step"] >= due[0] or event["step"] == event["total"]:
            event = {**event, "heldout_loss": heldout_loss(model, blocks)}  # eval mode, then train again
            points.append((event["step"], event["heldout_loss"]))
            while due[0] <= event["step"]:
                due[0] += align.eval_every
        if progress is not None:
            progress(event)

    return report
