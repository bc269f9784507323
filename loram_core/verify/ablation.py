"""LoRAM's ablation (Fig. 6) on one published base: does a LoRA trained small help the large model?

Rows, all scored on the same held-out task examples (response tokens only):

- `original`: the original model, no LoRA (what the consumer starts from);
- `loram`: a LoRA trained on the published base (pruned + aligned), recovered with `recover`,
  loaded with stock `PeftModel.from_pretrained(original, recovered)`: LoRAM itself;
- `unrecovered`: the same LoRA on the pruned base it was trained on (inference on the small model);
- `unaligned`: a LoRA trained on the base pruned *without* alignment, recovered, on the original;
- `neither`: that LoRA on the pruned base it was trained on (no alignment, no recovery);
- `reference` (optional): a LoRA trained on the original itself, the upper bound.

Every LoRA row is trained `verify.seeds` times (LoRA init and batch order seeded `seed`, `seed+1`,
...; the task sets stay the same), and reports the mean and the sample standard deviation over
the seeds. `loram` below `original` is the evidence that recovery transfers what the LoRA learned;
the distance to `unaligned` is what alignment buys, to `unrecovered` what inferring large buys, to
`reference` what pruning costs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from peft import PeftModel

from loram_core.config import VerifyConfig
from loram_core.models import load_model
from loram_core.recover import recover
from loram_core.verify.lora import train_lora
from loram_core.verify.task import Encoded, TaskScore, task_loss

# key -> (setting, LoRA trained on, inference on)
ROWS: dict[str, tuple[str, str, str]] = {
    "original": ("original, no LoRA", "-", "original"),
    "loram": ("LoRAM: LoRA recovered onto the original", "published base (pruned + aligned)", "original"),
    "unrecovered": ("same LoRA, not recovered", "published base (pruned + aligned)", "published base"),
    "unaligned": ("LoRA on a base pruned without alignment, recovered", "pruned, not aligned", "original"),
    "neither": (
        "that LoRA, not recovered (no alignment, no recovery)",
        "pruned, not aligned",
        "pruned, not aligned",
    ),
    "reference": ("LoRA trained on the original (upper bound)", "original", "original"),
}


def _row(key: str, scores: list[TaskScore], seconds: list[float] | None = None) -> dict:
    """One table row: mean and spread over seeds (`std` is the sample standard deviation; None for one value)."""
    setting, trained_on, inferred_on = ROWS[key]
    losses = [s.loss for s in scores]
    accuracies = [s.accuracy for s in scores]
    row = {
        "key": key, "setting": setting, "trained_on": trained_on, "inferred_on": inferred_on,
        "loss": round(statistics.fmean(losses), 4),
        "loss_std": round(statistics.stdev(losses), 4) if len(losses) > 1 else None,
        "accuracy": round(statistics.fmean(accuracies), 4),
        "accuracy_std": round(statistics.stdev(accuracies), 4) if len(accuracies) > 1 else None,
        "losses": [round(x, 4) for x in losses],
        "accuracies": [round(x, 4) for x in accuracies],
    }  # fmt: skip
    if seconds is not None:
        row["train_seconds"] = round(sum(seconds), 2)
    return row


def _recovered_on_original(
    base_dir: str, small_base: str, adapter: Path, out: Path, cfg: VerifyConfig, seed: int, heldout: Encoded,
    device: torch.device,
) -> tuple[TaskScore, str]:  # fmt: skip
    """Recover `adapter` (trained on `small_base`) for the original and score it there, loaded by stock peft."""
    result = recover(small_base, adapter, out, mode=cfg.recover_mode, original=base_dir, seed=seed,
                     dtype="float32")  # fmt: skip
    # Sparse `mask` / `complement` merge the masked delta into the weights; otherwise stock peft loads it.
    model = load_model(out) if result.merged else PeftModel.from_pretrained(load_model(base_dir), str(out))
    score = task_loss(model.to(device), heldout, cfg.batch_size)
    return score, result.mode


def _adapter_dir(work: Path, key: str, i: int) -> Path:
    # The first seed's adapters keep the plain names (`loram/`, `loram-recovered/`): what a reader opens.
    return work / (key if i == 0 else f"{key}-seed{i}")


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
    """Train, recover and score the ablation's LoRAs for every seed; return its rows and the settings used.

    Args:
        cfg: the `verify` section (`seeds` LoRAs per row, seeded `seed`, `seed + 1`, ...).
        base_dir: the original checkpoint.
        pruned_dir: the base pruned without alignment (with `masks/`).
        aligned_dir: the published base: pruned and aligned (with `masks/`).
        train / heldout: the encoded task sets.
        work: a directory for the adapters (`<name>/` trained, `<name>-recovered/`; `-seed<i>` after
            the name for the second seed on).
        device: where to train and score.

    Returns:
        `{"recover_mode", "seeds": [...], "rows": [{key, setting, trained_on, inferred_on, loss,
        loss_std, losses, accuracy, accuracy_std, accuracies, ...}]}`.
    """
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    rows = [_row("original", [task_loss(load_model(base_dir).to(device), heldout, cfg.batch_size)])]
    mode = cfg.recover_mode
    scores: dict[str, list[TaskScore]] = {k: [] for k in ROWS}
    seconds: dict[str, list[float]] = {k: [] for k in ("loram", "unaligned", "reference")}
    for i, seed in enumerate(seeds):
        seeded = cfg.model_copy(update={"seed": seed})
        for key, small, small_key in (
            ("loram", aligned_dir, "unrecovered"),
            ("unaligned", pruned_dir, "neither"),
        ):
            adapter = _adapter_dir(work, key, i)
            t0 = time.perf_counter()
            peft_model, _ = train_lora(load_model(small), train, seeded, adapter, device)
            seconds[key].append(time.perf_counter() - t0)
            scores[small_key].append(task_loss(peft_model, heldout, cfg.batch_size))  # inferred small
            del peft_model
            score, mode = _recovered_on_original(
                base_dir,
                small,
                adapter,
                adapter.with_name(adapter.name + "-recovered"),
                cfg,
                seed,
                heldout,
                device,
            )
            scores[key].append(score)
        if cfg.reference:
            t0 = time.perf_counter()
            peft_model, _ = train_lora(
                load_model(base_dir), train, seeded, _adapter_dir(work, "reference", i), device
            )
            seconds["reference"].append(time.perf_counter() - t0)
            scores["reference"].append(task_loss(peft_model, heldout, cfg.batch_size))
    for key in ("loram", "unrecovered", "unaligned", "neither", "reference"):
        if scores[key]:
            rows.append(_row(key, scores[key], seconds.get(key)))
    return {"recover_mode": mode, "seeds": seeds, "rows": rows}
