"""Alignment with the original as teacher (`align.objective: kd | cpt+kd`): knowledge distillation.

| module | holds |
|---|---|
| `kl` | the tensor math: forward KL at a temperature, the teacher's top-k, the top-k KL with the tail lumped, its bound |
| `objective` | `Distiller`: a micro-batch's `kd` / `cpt+kd` loss, chunked like the next-token loss |
| `topk` | the teacher's top-k cache: written once as safetensors while computed, read batch by batch |
| `teacher` | loading the frozen teacher, the config's refusals, building a `Distiller` |
| `plan` | the memory plan logged before the first step |

Names load on first use (`__getattr__`), so the preflight's checks never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "KD_KEYS": "teacher",
    "Distiller": "objective",
    "kl_sum": "kl",
    "tail_gap_bound": "kl",
    "teacher_topk": "kl",
    "topk_kl_sum": "kl",
    "TopkCache": "topk",
    "blocks_digest": "topk",
    "build_topk_cache": "topk",
    "cache_bytes": "topk",
    "check_distillation": "teacher",
    "load_teacher": "teacher",
    "make_distiller": "teacher",
    "resolve_teacher_dtype": "teacher",
    "uses_teacher": "teacher",
    "describe_plan": "plan",
    "memory_plan": "plan",
    "tensor_bytes": "plan",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name` on first access (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module 'loram_core.distill' has no attribute {name!r}")
    return getattr(importlib.import_module(f"loram_core.distill.{_HOME[name]}"), name)
