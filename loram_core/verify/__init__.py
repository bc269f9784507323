"""Verification of a published base (LoRAM's Fig. 6 ablation): train a LoRA small, recover it, infer large.

`verify` is the pipeline step (cached, run after evaluate and before publish); `run_ablation` the
experiment on given checkpoints; `make_task` / `encode` / `task_loss` the instruction-style task
built from the corpus; `check_verify` / `require_alignment` its checks; `verification_markdown`
the model card's section.

Names load on first use (`__getattr__`), so importing the checks or the card's section never
imports peft or the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "ROWS": "ablation",
    "run_ablation": "ablation",
    "verification_markdown": "report",
    "comparisons": "report",
    "table_rows": "report",
    "lora_config": "lora",
    "train_lora": "lora",
    "check_aligned": "checks",
    "check_verify": "checks",
    "require_alignment": "checks",
    "verify": "step",
    "verify_key": "step",
    "task_source": "step",
    "TaskSource": "task",
    "Example": "task",
    "encode": "task",
    "make_task": "task",
    "task_loss": "task",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name` on first access (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module 'loram_core.verify' has no attribute {name!r}")
    return getattr(importlib.import_module(f"loram_core.verify.{_HOME[name]}"), name)
