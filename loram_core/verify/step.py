"""The pipeline's `verify` step: the cached run of the ablation (its checks: `verify.checks`).

It runs after evaluate and before publish (when `verify.enabled`), so the version is published
once, with the evidence in its model card and manifest: versions stay immutable. Like every step
it writes into `<workdir>/verify-<hash of inputs and settings>` via a temporary directory, so a
re-run (or `loram verify` on a config whose steps are done) only pays for what changed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from transformers import AutoTokenizer

from loram_core.config import PipelineConfig, fingerprint
from loram_core.data import read_documents, resolve_files
from loram_core.device import describe, resolve_device
from loram_core.verify.ablation import run_ablation
from loram_core.verify.checks import check_aligned
from loram_core.verify.task import TASK_NAME, encode, make_task, task_fingerprint


def verify(cfg: PipelineConfig, base_dir: str, pruned_dir: str, aligned_dir: str, blocks_file: str) -> dict:
    """Run (or reuse) the ablation for this pipeline's base; returns the `verification` record.

    Args:
        cfg: the pipeline config (`verify`, `corpus`, `device`, `workdir` are used).
        base_dir: the original checkpoint.
        pruned_dir: the prune step's output (the base without alignment).
        aligned_dir: the align step's output (the base that is published).
        blocks_file: the corpus blocks (part of the cache key: the task comes from the same corpus).

    Returns:
        `{"task", "lora", "recover_mode", "rows", "device", "seconds"}`, as the manifest records it.

    Raises:
        LoramError: the base is not pruned-aligned, or the corpus is too small for the task sets.
    """
    check_aligned(pruned_dir, aligned_dir)
    device = resolve_device(cfg.device)
    v, c = cfg.verify, cfg.corpus
    key = {"verify": v.model_dump(), "dirs": [base_dir, pruned_dir, aligned_dir], "corpus": blocks_file,
           "split": [c.paths, c.format, c.text_field, c.heldout_fraction], "device": device.type}  # fmt: skip
    out = Path(cfg.workdir).expanduser() / f"verify-{fingerprint(key)}"
    if (out / "verification.json").is_file():
        return json.loads((out / "verification.json").read_text())
    t0 = time.perf_counter()
    docs = read_documents(resolve_files(c, cfg.base.cache_dir), c.format, c.text_field)
    train, heldout = make_task(
        docs, v.words, v.train_examples, v.heldout_examples, c.heldout_fraction, v.seed
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, examples in (("train", train), ("heldout", heldout)):
        (tmp / f"task-{name}.jsonl").write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))
    result = run_ablation(v, base_dir, pruned_dir, aligned_dir, encode(train, tokenizer), encode(heldout, tokenizer),
                          tmp, device)  # fmt: skip
    verification = {
        "task": {"name": TASK_NAME, "words": v.words, "train_examples": len(train),
                 "heldout_examples": len(heldout), "fingerprint": task_fingerprint(train + heldout)},
        "lora": {k: v.model_dump(mode="json")[k] for k in ("rank", "alpha", "target_modules", "steps",
                                                          "batch_size", "lr", "seed")},
        **result,
        "device": f"{describe(device)['device']} ({describe(device)['name']})",
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    (tmp / "verification.json").write_text(json.dumps(verification, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return verification
