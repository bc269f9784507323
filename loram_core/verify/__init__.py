"""Verification of a published base (LoRAM's Fig. 6 ablation): train a LoRA small, recover it, infer large.

`verify` is the pipeline step (cached, run after evaluate and before publish); `run_ablation` the
experiment on given checkpoints; `make_task` / `encode` / `task_loss` the instruction-style task
built from the corpus; `verification_markdown` the model card's section.
"""

from loram_core.verify.ablation import ROWS, run_ablation, verification_markdown
from loram_core.verify.lora import lora_config, train_lora
from loram_core.verify.step import check_aligned, check_verify, require_alignment, verify
from loram_core.verify.task import Example, encode, make_task, task_loss

__all__ = ["ROWS", "Example", "check_aligned", "check_verify", "encode", "lora_config", "make_task", "run_ablation",
           "require_alignment", "task_loss", "train_lora", "verification_markdown", "verify"]  # fmt: skip
