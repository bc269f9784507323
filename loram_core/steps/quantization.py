"""The quantize step: the 4-bit (bitsandbytes NF4) variant of the aligned or pruned model."""

from __future__ import annotations

from transformers import AutoTokenizer

from loram_core.config import QuantizeConfig, RunContext
from loram_core.quantize import quantize_checkpoint
from loram_core.steps._common import commit, compute_device, step_dir, tmp_for


def quantize(quantize: QuantizeConfig, ctx: RunContext, aligned_dir: str) -> str | None:
    """The 4-bit variant of the aligned (or pruned) model, or None when the section is disabled."""
    if not quantize.enabled:
        return None
    device = compute_device(ctx)
    key = {"quantize": quantize.model_dump(), "aligned": aligned_dir, "device": device.type}
    out = step_dir(ctx, "quantize", key)
    if (out / "config.json").is_file():
        return str(out)
    tmp = tmp_for(out)
    quantize_checkpoint(aligned_dir, tmp, quantize, device=str(device))
    AutoTokenizer.from_pretrained(aligned_dir).save_pretrained(tmp)
    return str(commit(tmp, out))
