"""The evaluate step: held-out perplexity of every model the run made, and the published size."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from safetensors.torch import load_file

from loram_core.config import SPARSE, PipelineConfig
from loram_core.device import default_dtype, describe
from loram_core.evaluate import perplexity
from loram_core.models import load_config, load_model
from loram_core.prune import plan
from loram_core.sizes import size_summary
from loram_core.steps._common import commit, compute_device, step_dir, tmp_for
from loram_core.steps.inputs import prepare_eval

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def evaluate(
    cfg: PipelineConfig,
    base_dir: str,
    pruned_dir: str,
    aligned_dir: str,
    nf4_dir: str | None,
    blocks_file: str | None,
) -> dict:
    """Held-out perplexity of the models this run made, once each, and the published checkpoint's size.

    The original and the pruned model always; the aligned one when alignment ran (`cfg.runs`), and
    the 4-bit variant when given (`aligned_nf4_ppl`, or `pruned_nf4_ppl` without alignment). Models
    are scored one at a time on the run's device (bf16 on a GPU unless `evaluate.dtype` says
    otherwise; the 4-bit one's unquantized modules too) on the `eval` blocks; the result records
    that device and the seconds each took.

    Returns:
        `{"metrics": {...ppl, "recovered", "heldout_tokens"}, "params": size summary, "compute": device facts}`.
    """
    device = compute_device(cfg)
    eval_file = prepare_eval(cfg, base_dir, blocks_file)
    aligned = cfg.runs("align") and aligned_dir != pruned_dir
    key = {
        "dirs": [base_dir, pruned_dir, aligned_dir if aligned else None, nf4_dir],
        "eval": eval_file,
        "evaluate": cfg.evaluate.model_dump(),
        "device": device.type,
    }
    out = step_dir(cfg, "evaluate", key)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    heldout = load_file(eval_file)["blocks"]
    bs, stride = cfg.evaluate.batch_size, cfg.eval.stride  # the windowed protocol (evaluate.windows)
    dtype = default_dtype(device, cfg.evaluate.dtype)
    metrics: dict = {}
    seconds: dict[str, float] = {}
    models = {"original_ppl": base_dir, "pruned_ppl": pruned_dir}
    if aligned:
        models["aligned_ppl"] = aligned_dir
    for name, path in models.items():
        t0 = time.perf_counter()
        metrics[name] = perplexity(load_model(path, dtype=dtype).to(device), heldout, bs, stride)
        seconds[name] = round(time.perf_counter() - t0, 3)
    if nf4_dir is not None:
        name = "aligned_nf4_ppl" if aligned else "pruned_nf4_ppl"
        t0 = time.perf_counter()
        metrics[name] = perplexity(
            _nf4_in(load_model(nf4_dir, dtype=dtype, device_map=str(device)), dtype), heldout, bs, stride
        )
        seconds[name] = round(time.perf_counter() - t0, 3)
    if aligned:
        damage = metrics["pruned_ppl"] - metrics["original_ppl"]
        metrics["recovered"] = (
            (metrics["pruned_ppl"] - metrics["aligned_ppl"]) / damage if damage > 0 else None
        )
    metrics["heldout_tokens"] = heldout.numel()  # the stream; evaluate.protocol counts the scored ones
    p = plan(load_config(base_dir), cfg.prune).to_dict()
    published = aligned_dir if aligned else pruned_dir  # the files publish copies into model/
    params = size_summary(p, published, sparse=cfg.prune.strategy in SPARSE, nf4_dir=nf4_dir)
    compute = {**describe(device), "eval_dtype": str(dtype).removeprefix("torch."), "eval_seconds": seconds}
    result = {"metrics": metrics, "params": params, "compute": compute}
    tmp = tmp_for(out)
    (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
    commit(tmp, out)
    return result


def _nf4_in(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The 4-bit model with its unquantized weights (embeddings, norms, head) in `dtype`, as the others are scored.

    A pre-quantized checkpoint loads them in the dtype they were stored in whatever `dtype` asks for
    (bfloat16 since model/ is published in 16 bits), so without this the NF4 row of a float32
    evaluation had bf16 embeddings, norms and head. The 4-bit weights (uint8) are left as they are.
    """
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model
