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

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loram_core.config import PipelineConfig, fingerprint
from loram_core.data import files_fingerprint, load_blocks, resolve_files
from loram_core.device import describe, resolve_device
from loram_core.sources import corpus_split, heldout_rule
from loram_core.verify.ablation import run_ablation
from loram_core.verify.checks import check_aligned
from loram_core.verify.task import TaskSource, encode, make_task, task_fingerprint


def verify_key(cfg: PipelineConfig, dirs: list[str], blocks_file: str, device: str) -> dict:
    """Everything the verification depends on: its section, the three checkpoints, the corpus and its split.

    The corpus enters by its settings, its files' bytes and the held-out rule (`heldout_rule`: the
    fraction and what it is a share of, `eval.heldout_fraction` included), besides the blocks file
    that alignment trained on (whose windows the held-out prompts are checked against).
    """
    return {
        "verify": cfg.verify.model_dump(),
        "dirs": dirs,
        "corpus": cfg.corpus.model_dump(),
        "files": files_fingerprint(resolve_files(cfg.corpus, cfg.base.cache_dir)),
        "heldout": list(heldout_rule(cfg)),
        "blocks": blocks_file,
        "device": device,
    }


def task_source(cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, blocks_file: str) -> TaskSource:
    """The task's text: the corpus split by the pipeline's one rule, and all the text training saw.

    Training saw the training documents (each text file's kept paragraphs joined as written) and,
    cut into windows, the blocks alignment trains on: both are what held-out prompts must not occur in.
    """
    split = corpus_split(cfg, tokenizer)
    windows = tokenizer.batch_decode(load_blocks(blocks_file).train.tolist())
    return TaskSource(
        split.parts(heldout=False), split.parts(heldout=True), split.texts(heldout=False) + windows
    )


def verify(cfg: PipelineConfig, base_dir: str, pruned_dir: str, aligned_dir: str, blocks_file: str) -> dict:
    """Run (or reuse) the ablation for this pipeline's base; returns the `verification` record.

    Args:
        cfg: the pipeline config (`verify`, `corpus`, `eval`, `device`, `workdir` are used).
        base_dir: the original checkpoint.
        pruned_dir: the prune step's output (the base without alignment).
        aligned_dir: the align step's output (the base that is published).
        blocks_file: the corpus blocks alignment trained on.

    Returns:
        `{"task", "lora", "recover_mode", "seeds", "rows", "device", "seconds"}`, as the manifest records it.

    Raises:
        LoramError: the base is not pruned-aligned, or the corpus is too small for the task sets.
    """
    check_aligned(pruned_dir, aligned_dir)
    device = resolve_device(cfg.device)
    v = cfg.verify
    key = verify_key(cfg, [base_dir, pruned_dir, aligned_dir], blocks_file, device.type)
    out = Path(cfg.workdir).expanduser() / f"verify-{fingerprint(key)}"
    if (out / "verification.json").is_file():
        return json.loads((out / "verification.json").read_text())
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train, heldout, counts = make_task(task_source(cfg, tokenizer, blocks_file), v.words, v.train_examples,
                                       v.heldout_examples, v.seed, v.task, v.response_words)  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, examples in (("train", train), ("heldout", heldout)):
        (tmp / f"task-{name}.jsonl").write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))
    result = run_ablation(v, base_dir, pruned_dir, aligned_dir, encode(train, tokenizer), encode(heldout, tokenizer),
                          tmp, device)  # fmt: skip
    fraction, unit = heldout_rule(cfg)
    verification = {
        "task": {"name": v.task, "words": v.words, "response_words": v.response_words if v.task == "continue" else None,
                 "train_examples": len(train), "heldout_examples": len(heldout),
                 "heldout": {"fraction": fraction, "of": unit}, **counts,
                 "fingerprint": task_fingerprint(train + heldout)},
        "lora": {k: v.model_dump(mode="json")[k] for k in ("rank", "alpha", "target_modules", "steps",
                                                          "batch_size", "lr", "seed", "seeds")},
        **result,
        "device": f"{describe(device)['device']} ({describe(device)['name']})",
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    (tmp / "verification.json").write_text(json.dumps(verification, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return verification
