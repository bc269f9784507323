"""Shared by the peer-side scripts (`bench/_peer_*.py`), which run in the peers' own venv.

Nothing from `loram_core` may be imported here: the peers' venv does not have it. The perplexity
below is written to compute exactly what `loram_core.evaluate.perplexity` computes (exp of the
mean next-token NLL over all predicted tokens of the held-out blocks, batches of 8).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time

import torch
from safetensors.torch import load_file
from torch import nn


def max_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_data(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration and held-out blocks the bench saved for every contender (int32)."""
    t = load_file(path)
    return t["calib"], t["heldout"]


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device=device, dtype=torch.long)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


def sparsity_of(model: nn.Module, layer_prefix: str = "model.layers.") -> float:
    """Fraction of exact zeros in the decoder layers' linear weights."""
    zeros = total = 0
    for name, p in model.named_parameters():
        if name.startswith(layer_prefix) and name.endswith("proj.weight"):
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / max(1, total)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    """Wall and CPU seconds of a block."""

    def __enter__(self) -> Timer:
        self.t0, self.c0 = time.perf_counter(), cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = cpu_s() - self.c0


class Passes:
    """Timings of repeated pruning passes: best (wall), first, and the peak RSS after the first."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self.rss_first: float | None = None

    def add(self, t: Timer) -> None:
        self.times.append((t.seconds, t.cpu))
        if self.rss_first is None:
            self.rss_first = max_rss_mib()

    def result(self) -> dict:
        best = min(self.times)
        return {
            "prune_s": best[0],
            "cpu_s": best[1],
            "first_s": self.times[0][0],
            "rss_prune_mib": self.rss_first,
        }


def emit(result: dict) -> None:
    """Hand the result back to the bench: one JSON line on stdout, marked."""
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
