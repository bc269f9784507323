"""The verification table as the card, the CLI and the Prefect artifact show it, from the record alone.

Pure formatting: it imports nothing heavy, so the card (and the CLI that prints its tables) never
loads the ablation's training stack.

Spread: each LoRA row's sample standard deviation over its seeds. A difference between two rows'
means counts as larger than the spread when it exceeds the two standard deviations summed (the
original row, which trains nothing, has none); with one seed there is no spread and no such claim.
"""

from __future__ import annotations

_TASKS = {
    "reverse-words": "reverse {words} words",
    "continue": "give the {response_words} words that follow {words} words",
}


def _spread(row: dict) -> float | None:
    return row.get("loss_std")


def comparisons(verification: dict) -> dict[str, dict]:
    """Each row against LoRAM's: `{key: {"diff": row - loram (mean task loss), "spread", "beyond"}}`.

    `diff > 0`: LoRAM's loss is lower. `spread` is the two rows' standard deviations summed (None
    when neither has one: a single seed); `beyond` whether `|diff| > spread` (None without a spread).
    """
    rows = {r["key"]: r for r in verification["rows"]}
    loram = rows.get("loram")
    if loram is None:
        return {}
    out = {}
    for key, r in rows.items():
        if key == "loram":
            continue
        stds = [s for s in (_spread(r), _spread(loram)) if s is not None]
        spread = sum(stds) if stds else None
        diff = r["loss"] - loram["loss"]
        out[key] = {"diff": diff, "spread": spread, "beyond": None if spread is None else abs(diff) > spread}
    return out


def _loss(r: dict) -> str:
    std = _spread(r)
    return f"{r['loss']:.3f}" if std is None else f"{r['loss']:.3f} ± {std:.3f}"


def _vs(c: dict | None) -> str:
    if c is None:
        return "-"
    verdict = {True: "beyond the spread", False: "within the spread", None: "one seed: no spread"}[
        c["beyond"]
    ]
    return f"{c['diff']:+.3f} ({verdict})"


def table_rows(verification: dict) -> list[dict[str, str]]:
    """The table's rows as strings: setting, LoRA trained on, inference on, task loss (mean ± std), vs LoRAM, accuracy."""
    comp = comparisons(verification)
    out = []
    for r in verification["rows"]:
        acc = f"{100 * r['accuracy']:.1f}%"
        if r.get("accuracy_std") is not None:
            acc += f" ± {100 * r['accuracy_std']:.1f}"
        out.append({
            "setting": r["setting"], "LoRA trained on": r["trained_on"], "inference on": r["inferred_on"],
            "task loss": _loss(r), "vs LoRAM": _vs(comp.get(r["key"])), "token accuracy": acc,
        })  # fmt: skip
    return out


def _verdicts(verification: dict) -> str:
    """The sentence saying which differences to LoRAM are larger than the spread."""
    comp = comparisons(verification)
    names = {r["key"]: r["setting"] for r in verification["rows"]}
    beyond = [f"{names[k]} ({c['diff']:+.3f})" for k, c in comp.items() if c["beyond"]]
    within = [f"{names[k]} ({c['diff']:+.3f})" for k, c in comp.items() if c["beyond"] is False]
    if not any(c["beyond"] is not None for c in comp.values()):
        return "One seed per row: no spread was measured, so no difference is claimed beyond it."
    text = "Differences to LoRAM's mean larger than the spread (the two rows' standard deviations summed): "
    text += ("; ".join(beyond) if beyond else "none") + ". Within the spread: "
    return text + ("; ".join(within) if within else "none") + " (positive: LoRAM's loss is lower)."


def verification_markdown(verification: dict | None) -> str:
    """The model card's verification section (empty when the version was published without one)."""
    if not verification:
        return ""
    task, lora = verification["task"], verification["lora"]
    cols = ("setting", "LoRA trained on", "inference on", "task loss", "vs LoRAM", "token accuracy")
    table = "\n".join("| " + " | ".join(r[c] for c in cols) + " |" for r in table_rows(verification))
    loaded = (
        "merged into the original's weights (the masked delta is not low-rank)"
        if verification["recover_mode"] in ("mask", "complement")
        else "loaded with stock `PeftModel.from_pretrained(original, recovered)`"
    )
    what = _TASKS.get(task["name"], "{words} words").format(
        words=task["words"], response_words=task.get("response_words")
    )
    seeds = verification.get("seeds") or [lora["seed"]]
    spread = (
        f"Each LoRA row is trained with {len(seeds)} seeds ({', '.join(map(str, seeds))}: LoRA init and batch "
        "order; the task sets stay the same) and shows the mean ± the sample standard deviation over them."
        if len(seeds) > 1
        else "Each LoRA row is trained with one seed."
    )
    unseen = ""
    if "heldout_seen_in_training" in task:
        unseen = (
            f" ({task['heldout_seen_in_training']} of {task['heldout_candidates']} held-out candidates dropped: "
            "their prompt's or response's words occur in the training text or training windows)"
        )
    return f"""
## Verification: train small, infer large

A LoRA (rank {lora["rank"]}, alpha {lora["alpha"]:g}, on {", ".join(lora["target_modules"])}; {lora["steps"]}
steps of {lora["batch_size"]}) was trained with peft on an instruction-style task built from the corpus
(`{task["name"]}`: {what}; {task["train_examples"]} training examples from training paragraphs, {task["heldout_examples"]}
held-out ones from held-out paragraphs, split by the same rule as alignment and evaluation; task fingerprint
`{task["fingerprint"]}`){unseen}, recovered to the original's shape (`loram recover`, mode `{verification["recover_mode"]}`)
and {loaded}. Held-out task loss is the mean next-token cross-entropy over response tokens only (lower is better);
token accuracy is the teacher-forced argmax. {spread} The rows are LoRAM's ablation (Fig. 6 of the paper):

| {" | ".join(cols)} |
|---|---|---|---:|---:|---:|
{table}

{_verdicts(verification)}

Computed on {verification.get("device", "n/a")} in {verification.get("seconds", 0):.0f} s.
"""
