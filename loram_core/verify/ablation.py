"""LoRAM's ablation (Fig. 6) on one published base: does a LoRA trained small help the large model?

Rows, all scored on the same held-out task examples (response tokens only):

- `original`: the original model, no LoRA (what the consumer starts from);
- `loram`: a LoRA trained on the published base (pruned + aligned), recovered with `recover`,
  loaded with stock `PeftModel.from_pretrained(original, recovered)`: LoRAM itself;
- `unrecovered`: the same LoRA on the pruned base it was trained on (inference on the small model);
- `unaligned`: a LoRA trained on the base pruned *without* alignment, recovered, on the original;
- `reference` (optional): a LoRA trained on the original itself, the upper bound.

`loram` below `original` is the evidence that recovery transfers what the LoRA learned; the
distance to `unaligned` is what alignment buys; the distance to `reference` what pruning costs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import PeftModel

from loram_core.config import VerifyConfig
from loram_core.models import load_model
from loram_core.recover import recover
from loram_core.verify.lora import train_lora
from loram_core.verify.task import Encoded, task_loss

# key -> (setting, LoRA trained on, inference on)
ROWS: dict[str, tuple[str, str, str]] = {
    "original": ("original, no LoRA", "-", "original"),
    "loram": ("LoRAM: LoRA recovered onto the original", "published base (pruned + aligned)", "original"),
    "unrecovered": ("same LoRA, not recovered", "published base (pruned + aligned)", "published base"),
    "unaligned": ("LoRA on a base pruned without alignment, recovered", "pruned, not aligned", "original"),
    "reference": ("LoRA trained on the original (upper bound)", "original", "original"),
}


def _row(key: str, score, seconds: float | None = None) -> dict:
    setting, trained_on, inferred_on = ROWS[key]
    row = {"key": key, "setting": setting, "trained_on": trained_on, "inferred_on": inferred_on,
           "loss": round(score.loss, 4), "accuracy": round(score.accuracy, 4)}  # fmt: skip
    if seconds is not None:
        row["train_seconds"] = round(seconds, 2)
    return row


def _recovered_on_original(
    base_dir: str, small_base: str, adapter: Path, out: Path, cfg: VerifyConfig, heldout: Encoded, device
):
    """Recover `adapter` (trained on `small_base`) for the original and score it there, loaded by stock peft."""
    result = recover(small_base, adapter, out, mode=cfg.recover_mode, original=base_dir, seed=cfg.seed,
                     dtype="float32")  # fmt: skip
    # Sparse `mask` / `complement` merge the masked delta into the weights; otherwise stock peft loads it.
    model = load_model(out) if result.merged else PeftModel.from_pretrained(load_model(base_dir), str(out))
    score = task_loss(model.to(device), heldout, cfg.batch_size)
    return score, result.mode


def run_ablation(
    cfg: VerifyConfig,
    base_dir: str,
    pruned_dir: str,
    aligned_dir: str,
    train: Encoded,
    heldout: Encoded,
    work: Path,
    device: torch.device,
) -> dict:
    """Train, recover and score the ablation's LoRAs; return its rows and the settings used.

    Args:
        cfg: the `verify` section.
        base_dir: the original checkpoint.
        pruned_dir: the base pruned without alignment (with `masks/`).
        aligned_dir: the published base: pruned and aligned (with `masks/`).
        train / heldout: the encoded task sets.
        work: a directory for the adapters (`<name>/` trained, `<name>-recovered/`).
        device: where to train and score.

    Returns:
        `{"recover_mode", "rows": [{key, setting, trained_on, inferred_on, loss, accuracy, ...}]}`.
    """
    rows = [_row("original", task_loss(load_model(base_dir).to(device), heldout, cfg.batch_size))]
    mode = cfg.recover_mode
    for key, small in (("loram", aligned_dir), ("unaligned", pruned_dir)):
        t0 = time.perf_counter()
        peft_model, _ = train_lora(load_model(small), train, cfg, work / key, device)
        seconds = time.perf_counter() - t0
        if key == "loram":
            unrecovered = task_loss(peft_model, heldout, cfg.batch_size)
        del peft_model
        score, mode = _recovered_on_original(
            base_dir, small, work / key, work / f"{key}-recovered", cfg, heldout, device
        )
        rows.append(_row(key, score, seconds))
        if key == "loram":
            rows.append(_row("unrecovered", unrecovered))
    if cfg.reference:
        t0 = time.perf_counter()
        peft_model, _ = train_lora(load_model(base_dir), train, cfg, work / "reference", device)
        rows.append(
            _row("reference", task_loss(peft_model, heldout, cfg.batch_size), time.perf_counter() - t0)
        )
    return {"recover_mode": mode, "rows": rows}
