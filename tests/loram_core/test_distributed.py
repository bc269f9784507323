"""Alignment under torchrun: two CPU processes (Gloo), DDP and FSDP2, through the pipeline step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loram_core import steps
from loram_core.config import load_config
from loram_core.data import Blocks, save_blocks
from loram_core.models import load_model
from loram_core.prune import Masks, save_masks
from tests.conftest import tiny_model, tiny_tokenizer
from tests.loram_core.test_align import _blocks

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pruned(tmp_path: Path) -> tuple[str, str]:
    d = tmp_path / "pruned"
    tiny_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    save_masks(Masks(strategy="random"), d / "masks" / "masks.safetensors")
    blocks = tmp_path / "blocks.safetensors"
    save_blocks(blocks, Blocks(train=_blocks(), heldout=_blocks(8)), {})
    return str(d), str(blocks)


@pytest.mark.parametrize(("parallel", "dtype"), [("ddp", "float32"), ("fsdp", "bfloat16")])
def test_two_process_alignment_matches_one_process_with_the_same_global_batch(
    tmp_path, pruned, parallel, dtype
) -> None:
    """Both save in the published dtype: float32 compares the trajectories' weights at full precision;
    bfloat16 (the default from this float32 base) shows the torchrun worker writes the same dtype."""
    pruned_dir, blocks = pruned
    common = ["align.steps=8", "align.lr=0.003", "align.warmup_steps=2", "align.log_every=2", "align.precision=fp32",
              "align.checkpoint_every=4", f"publish.dtype={'auto' if dtype == 'bfloat16' else dtype}"]  # fmt: skip
    two = load_config(
        REPO / "configs" / "demo.yaml",
        common
        + [
            f"workdir={tmp_path / 'w2'}",
            "align.batch_size=2",
            "align.nproc_per_node=2",
            f"align.parallel={parallel}",
        ],
    )
    one = load_config(
        REPO / "configs" / "demo.yaml", common + [f"workdir={tmp_path / 'w1'}", "align.batch_size=4"]
    )
    events = []
    out2 = steps.align(two.align, two.context, pruned_dir, blocks, events.append)
    out1 = steps.align(one.align, one.context, pruned_dir, blocks)
    assert [e["step"] for e in events] == [2, 4, 6, 8]  # rank 0's progress reached the task
    log2, log1 = (json.loads((Path(o) / "train_log.json").read_text()) for o in (out2, out1))
    assert log2["tokens"] == log1["tokens"] == 8 * 4 * 32
    # Same samples per step, gradients averaged across ranks: the same trajectory up to float rounding.
    for (s2, l2), (s1, l1) in zip(log2["losses"], log1["losses"], strict=True):
        assert s2 == s1 and l2 == pytest.approx(l1, rel=1e-4)
    for out in (out2, out1):
        assert json.loads((Path(out) / "config.json").read_text())["dtype"] == dtype
    a, b = load_model(out2), load_model(out1)
    # float32: float rounding only; bfloat16: each side rounds its float32 weights, so equal values
    # can land one bfloat16 step (2^-8 relative) apart.
    rtol = 1e-3 if dtype == "float32" else 2**-7
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-5, msg=name)
    assert not (Path(out2) / "train_result.json").exists()
