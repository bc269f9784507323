"""Pruning quality on the demo's pretrained base: only orderings whose gap dwarfs the spread.

Each test asserts an ordering with a margin, stated in its docstring beside the gaps measured on
two separately pretrained demo bases: A, the one `bench/PRUNE.md` was made on (dense 60.20), and
B, this machine's (dense 57.57; `bench/QUALITY.md`, made by `bench/bench_quality.py`, which also
runs every setting at 1, 2 and 4 torch threads: the largest spread is 0.0065%; these tests pin
1 thread). The base moves between builds far more than threads do, so margins are sized from
the smaller of the two gaps. Orderings with small or unstable gaps (SparseGPT vs magnitude at
50% unstructured: +0.8% / +1.3%; vs Wanda: +1.7% / +3.3%) are benchmarks: `bench/bench_quality.py`
and `bench/bench_prune.py` report them, the suite does not assert them.
"""

from __future__ import annotations

import pytest

from loram_core.config import PruneConfig
from loram_core.evaluate import perplexity
from loram_core.models import load_model
from loram_core.prune import prune_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pinned_threads")]


def _ppl(demo_base, demo_blocks, tmp_path, **prune) -> float:
    cfg = PruneConfig(calib_samples=32, **prune)
    out = tmp_path / "-".join(f"{k}={v}" for k, v in prune.items())
    prune_checkpoint(demo_base, out, cfg, demo_blocks.train[:32])
    return perplexity(load_model(out), demo_blocks.heldout)


def test_sparsegpt_at_half_sparsity_costs_little(demo_base, demo_blocks, tmp_path) -> None:
    """50% unstructured SparseGPT costs a little: +2.2% (A), +1.1% (B) over dense.

    Asserted: above dense (by 1.1-2.2%, against a thread spread of 0.0001%) and below +8%, 3.6x
    the larger measured cost; a broken solver lands far above (magnitude 2:4 is +6.5-12%).
    """
    dense = perplexity(load_model(demo_base), demo_blocks.heldout)
    sparsegpt = _ppl(
        demo_base, demo_blocks, tmp_path, strategy="unstructured", ratio=0.5, sparse_method="sparsegpt"
    )
    assert dense < sparsegpt < dense * 1.08, (dense, sparsegpt)


def test_sparsegpt_beats_wanda_and_magnitude_at_two_four(demo_base, demo_blocks, tmp_path) -> None:
    """2:4: magnitude +5.9% (A) / +6.5% (B) and Wanda +6.7% / +6.2% above SparseGPT.

    Asserted: both baselines at least 2% above SparseGPT, under a third of the smallest gap;
    SparseGPT 2:4 spreads by 0.0065% over thread counts, the baselines not at all.
    """
    ppl = {
        m: _ppl(demo_base, demo_blocks, tmp_path, strategy="semi", sparse_method=m)
        for m in ("sparsegpt", "wanda", "magnitude")
    }
    assert ppl["magnitude"] > 1.02 * ppl["sparsegpt"] and ppl["wanda"] > 1.02 * ppl["sparsegpt"], ppl


def test_taylor_structured_beats_random_at_the_same_ratio(demo_base, demo_blocks, tmp_path) -> None:
    """Ratio 0.5 on layers 1-4: random is +9.4% (A) / +4.2% (B) above Taylor.

    The gap depends on the base (which weights a seeded random choice hits), so the margin is
    sized from the smaller: random at least 1.5% above Taylor, 2.8x below it; neither moves with
    the thread count.
    """
    common = dict(ratio=0.5, keep_first=1, keep_last=1)
    taylor = _ppl(demo_base, demo_blocks, tmp_path, strategy="structured", **common)
    random_ppl = _ppl(demo_base, demo_blocks, tmp_path, strategy="random", **common)
    assert random_ppl > 1.015 * taylor, (taylor, random_ppl)
