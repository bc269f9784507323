"""Pruning quality on the demo's pretrained model: the solvers must beat their cheap baselines."""

from __future__ import annotations

import pytest

from loram_core.config import PruneConfig
from loram_core.evaluate import perplexity
from loram_core.models import load_model
from loram_core.prune import prune_checkpoint

pytestmark = pytest.mark.slow


def _ppl(demo_base, demo_blocks, tmp_path, **prune) -> float:
    cfg = PruneConfig(calib_samples=32, **prune)
    out = tmp_path / "-".join(f"{k}={v}" for k, v in prune.items())
    prune_checkpoint(demo_base, out, cfg, demo_blocks.train[:32])
    return perplexity(load_model(out), demo_blocks.heldout)


def test_sparsegpt_beats_magnitude_at_half_sparsity(demo_base, demo_blocks, tmp_path) -> None:
    dense = perplexity(load_model(demo_base), demo_blocks.heldout)
    sparsegpt = _ppl(
        demo_base, demo_blocks, tmp_path, strategy="unstructured", ratio=0.5, sparse_method="sparsegpt"
    )
    wanda = _ppl(demo_base, demo_blocks, tmp_path, strategy="unstructured", ratio=0.5, sparse_method="wanda")
    magnitude = _ppl(
        demo_base, demo_blocks, tmp_path, strategy="unstructured", ratio=0.5, sparse_method="magnitude"
    )
    assert dense < sparsegpt < magnitude
    assert sparsegpt < wanda


def test_sparsegpt_beats_magnitude_at_two_four(demo_base, demo_blocks, tmp_path) -> None:
    sparsegpt = _ppl(demo_base, demo_blocks, tmp_path, strategy="semi", sparse_method="sparsegpt")
    magnitude = _ppl(demo_base, demo_blocks, tmp_path, strategy="semi", sparse_method="magnitude")
    assert sparsegpt < magnitude


def test_taylor_structured_beats_random_at_the_same_ratio(demo_base, demo_blocks, tmp_path) -> None:
    common = dict(ratio=0.5, keep_first=1, keep_last=1)
    taylor = _ppl(demo_base, demo_blocks, tmp_path, strategy="structured", **common)
    random_ppl = _ppl(demo_base, demo_blocks, tmp_path, strategy="random", **common)
    assert taylor < random_ppl
