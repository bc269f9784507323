"""What a held-out point during alignment costs beside a training step (the UI's loss curve).

    .venv/bin/python bench/bench_heldout_points.py [--batch 16] [--repeats 5]

Times, on the demo's architecture (6 layers, 128 wide, GQA; 128-token blocks) in fp32 on the CPU, one
alignment step of the real loop (`train_causal_lm`: forward, backward, AdamW; `--batch` blocks) and one
held-out point (`steps.heldout.heldout_loss`: a forward pass over `HELDOUT_BLOCKS` blocks, no
gradient). Process CPU time, best of `--repeats`, so other jobs on the machine move it less than wall
time. Prints a markdown row for bench/ui/README.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from loram_core.align import train_causal_lm
from loram_core.config import AlignConfig, DemoBaseConfig
from loram_core.demo import demo_architecture
from loram_core.steps.heldout import HELDOUT_BLOCKS, heldout_loss


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main() -> None:
    """Time a training step and a held-out point; print the ratio."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16, help="align.batch_size (the demo's: 16)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    demo = DemoBaseConfig()
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(demo_architecture(demo))
    blocks = torch.randint(0, demo.vocab_size, (256, demo.seq_len), dtype=torch.int32)
    steps = 4
    cfg = AlignConfig(steps=steps, batch_size=args.batch, warmup_steps=0, log_every=steps, precision="fp32")
    train = _best(lambda: train_causal_lm(model, blocks, cfg), args.repeats) / steps
    point = _best(lambda: heldout_loss(model, blocks[:HELDOUT_BLOCKS]), args.repeats)
    print("| batch | training step (CPU s) | held-out point (CPU s) | point / step |")
    print("|---:|---:|---:|---:|")
    print(f"| {args.batch} | {train:.4f} | {point:.4f} | {point / train:.3f} |")


if __name__ == "__main__":
    main()
