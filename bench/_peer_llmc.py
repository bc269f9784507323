"""Peer side: llmcompressor's one-shot SparseGPT / Wanda on the bench's model and data.

Runs in the peers' venv (bench/.peers-venv), never imports loram_core. Prints one
`BENCH_RESULT {json}` line: prune seconds (model load + oneshot), peak RSS at the end of pruning,
held-out perplexity and the sparsity reached.

    python bench/_peer_llmc.py --base DIR --data FILE --method sparsegpt --pattern 2:4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peer_common import Passes, Timer, emit, load_data, perplexity, sparsity_of  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    p.add_argument("--pattern", default="unstructured", help="unstructured or n:m such as 2:4")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--repeat", type=int, default=1, help="pruning passes (a fresh model each)")
    p.add_argument("--dtype", default="float32", help="weights' dtype (bfloat16 on a GPU, as ours there)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from loguru import logger
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    logger.remove()  # its per-module INFO lines would drown the bench's output
    logger.add(sys.stderr, level="ERROR")
    calib, heldout = load_data(args.data)
    # One block per batch: llmcompressor's Hessian is a mean over batches, ours over tokens; with
    # equal-length blocks both are the same X^T X up to a scale SparseGPT is invariant to.
    loader = DataLoader(
        [{"input_ids": b.long(), "attention_mask": torch.ones_like(b, dtype=torch.long)} for b in calib],
        batch_size=1,
    )
    mask = "0:0" if args.pattern == "unstructured" else args.pattern
    ratio = (
        args.ratio if args.pattern == "unstructured" else int(mask.split(":")[0]) / int(mask.split(":")[1])
    )
    common = dict(sparsity=ratio, mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"])

    passes = Passes()
    for _ in range(args.repeat):
        if args.method == "sparsegpt":
            recipe = SparseGPTModifier(**common, block_size=args.blocksize, dampening_frac=args.damp)
        else:
            recipe = WandaPruningModifier(**common)
        with Timer() as t:
            model = AutoModelForCausalLM.from_pretrained(args.base, dtype=getattr(torch, args.dtype))
            oneshot(
                model=model,
                dataset=loader,
                recipe=recipe,
                num_calibration_samples=len(calib),
                pipeline="sequential",
            )
        passes.add(t)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        model.to("cuda")
    ppl = perplexity(model, heldout)
    import importlib.metadata as md

    emit(
        {
            **passes.result(),
            "ppl": ppl,
            "sparsity": sparsity_of(model),
            "gpu_peak_gib": gpu_peak,
            "version": f"llmcompressor {md.version('llmcompressor')}",
        }
    )


if __name__ == "__main__":
    main()
