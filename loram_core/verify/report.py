"""The model card's verification section, rendered from the `verification` record alone.

Pure formatting: it imports nothing heavy, so the card (and the CLI that prints its tables) never
loads the ablation's training stack.
"""

from __future__ import annotations


def verification_markdown(verification: dict | None) -> str:
    """The model card's verification section (empty when the version was published without one)."""
    if not verification:
        return ""
    task, lora = verification["task"], verification["lora"]
    rows = verification["rows"]
    original = next(r["loss"] for r in rows if r["key"] == "original")
    lines = [f"| {r['setting']} | {r['trained_on']} | {r['inferred_on']} | {r['loss']:.3f} | "
             f"{r['loss'] - original:+.3f} | {100 * r['accuracy']:.1f}% |" for r in rows]  # fmt: skip
    table = "\n".join(lines)
    loaded = (
        "merged into the original's weights (the masked delta is not low-rank)"
        if verification["recover_mode"] in ("mask", "complement")
        else "loaded with stock `PeftModel.from_pretrained(original, recovered)`"
    )
    return f"""
## Verification: train small, infer large

A LoRA (rank {lora["rank"]}, alpha {lora["alpha"]:g}, on {", ".join(lora["target_modules"])}; {lora["steps"]}
steps of {lora["batch_size"]}) was trained with peft on an instruction-style task built from the corpus
(`{task["name"]}`: reverse {task["words"]} words; {task["train_examples"]} training examples, {task["heldout_examples"]}
held-out ones from held-out documents, task fingerprint `{task["fingerprint"]}`), recovered to the original's
shape (`loram recover`, mode `{verification["recover_mode"]}`) and {loaded}. Held-out task loss is the mean next-token
cross-entropy over response tokens only (lower is better); token accuracy is the teacher-forced argmax.
The rows are LoRAM's ablation (Fig. 6 of the paper):

| setting | LoRA trained on | inference on | task loss | vs original | token accuracy |
|---|---|---|---:|---:|---:|
{table}

Computed on {verification.get("device", "n/a")} in {verification.get("seconds", 0):.0f} s.
"""
