"""The teacher's place in the align step (`align.objective: kd | cpt+kd`): its cache, plan and feed.

`topk_cache` computes the teacher's top-k cache once into the work dir, keyed by the base's and the
training blocks' fingerprints and by what changes its numbers (k, temperature, teacher dtype,
device type), so every later run on the same base and corpus reads it back. `distiller_for` gives
the training loop its objective on a device (the in-process step, or each torchrun rank).
`announce_plan` logs the memory plan before the first step (logger `loram_core.steps.teacher`, INFO;
the Prefect task forwards it to the run's log).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from loram_core.config import AlignConfig, RunContext
from loram_core.distill.teacher import resolve_teacher_dtype, uses_teacher
from loram_core.errors import LoramError
from loram_core.steps._common import commit, step_dir, tmp_for

if TYPE_CHECKING:
    import torch

    from loram_core.distill import Distiller

log = logging.getLogger(__name__)


def require_base(align: AlignConfig, base_dir: str | None) -> str:
    """The base checkpoint a distilling objective needs (the step's `base_dir`), or a clear error."""
    if base_dir is None:
        raise LoramError(
            f"align.objective={align.objective} distils from the original model, but the align step was "
            "given no base_dir: pass the base checkpoint (steps.align(..., base_dir=BASE)), or use "
            "align.objective=cpt."
        )
    return base_dir


def topk_cache(
    align: AlignConfig, ctx: RunContext, base_dir: str, blocks_file: str, device: torch.device
) -> str:
    """The teacher's top-k cache of the corpus's training blocks: found in the work dir, or computed.

    Returns:
        The cache file (`loram_core.distill.topk`), complete: it is written in a temporary
        directory renamed into place, so a run killed while computing it starts it again.
    """
    import torch

    from loram_core.data import load_blocks
    from loram_core.distill import blocks_digest, build_topk_cache, load_teacher
    from loram_core.steps.inputs import base_fingerprint

    train = load_blocks(blocks_file).train
    dtype = resolve_teacher_dtype(align, device)
    key = {"version": 1, "base": base_fingerprint(base_dir), "blocks": blocks_digest(train), "k": align.kd_topk,
           "temperature": align.kd_temperature, "teacher_dtype": dtype, "device": device.type}  # fmt: skip
    out = step_dir(ctx, "kd-topk", key)
    cache = out / "topk.safetensors"
    if cache.is_file():
        return str(cache)
    tmp = tmp_for(out)
    teacher = load_teacher(base_dir, dtype, device)
    batch = align.micro_batch_size if isinstance(align.micro_batch_size, int) else align.batch_size
    build_topk_cache(teacher, train, align.kd_topk, align.kd_temperature, tmp / "topk.safetensors",
                     batch_size=batch, chunk_tokens=align.loss_chunk_tokens, device=device)  # fmt: skip
    (tmp / "topk.json").write_text(
        json.dumps({**key, "base_dir": base_dir, "blocks_file": blocks_file}, indent=2)
    )
    del teacher  # the student trains without it
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return str(commit(tmp, out) / "topk.safetensors")


def distiller_for(
    align: AlignConfig,
    base_dir: str | None,
    cache_file: str | None,
    train_blocks: torch.Tensor,
    device: torch.device,
) -> Distiller | None:
    """The loop's objective on `device`: None for `cpt`; the teacher loaded (online) or its cache opened (topk)."""
    if not uses_teacher(align):
        return None
    from loram_core.distill import TopkCache, load_teacher, make_distiller

    if align.kd_mode == "topk":
        if cache_file is None:
            raise LoramError("align.kd_mode=topk needs the teacher's top-k cache (steps.teacher.topk_cache).")
        return make_distiller(align, cache=TopkCache(cache_file, train_blocks))
    teacher = load_teacher(require_base(align, base_dir), resolve_teacher_dtype(align, device), device)
    return make_distiller(align, teacher=teacher)


def announce_plan(
    align: AlignConfig,
    pruned_dir: str,
    base_dir: str | None,
    cache_file: str | None,
    seq_len: int,
    device: torch.device,
) -> dict:
    """Compute and log the run's memory plan; returns it (`loram_core.distill.memory_plan`).

    Both models are counted on the meta device (no weights load): the student in float32 master
    weights, the teacher in its dtype (NF4: half a byte per decoder-linear weight).
    """
    from loram_core.distill import describe_plan, memory_plan
    from loram_core.models import build_model, decoder_layers, load_config

    student = build_model(load_config(pruned_dir), "meta")
    teacher_bytes = 0
    if uses_teacher(align):
        teacher = build_model(load_config(require_base(align, base_dir)), "meta")
        teacher_bytes = _teacher_bytes(teacher, resolve_teacher_dtype(align, device), decoder_layers(teacher))
    cache = Path(cache_file).stat().st_size if cache_file else 0
    plan = memory_plan(student, align, seq_len, device.type, teacher_bytes, cache)
    log.info(describe_plan(plan))
    return plan


def _teacher_bytes(teacher, dtype: str, layers) -> int:
    from torch import nn

    if dtype != "nf4":
        return sum(p.numel() for p in teacher.parameters()) * (4 if dtype == "float32" else 2)
    linear = {id(m.weight) for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)}
    return sum(p.numel() // 2 if id(p) in linear else 2 * p.numel() for p in teacher.parameters())
