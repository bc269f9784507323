"""The CUDA-only paths of issue 25 (`pytest -m gpu` on a GPU machine; skipped elsewhere).

SparseGPT's block replayed as a CUDA graph against the same block run eagerly, the bf16 Hessian
accumulated with `out_dtype=float32` against the fp32 upcast, the `micro_batch_size: auto` probe on
a real device, and bf16-master training on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from loram_core.align import train_causal_lm
from loram_core.prune.sparse import sparsegpt
from tests.conftest import tiny_model
from tests.loram_core.test_align import _blocks, _cfg

pytestmark = pytest.mark.gpu


def _problem(rows: int = 96, cols: int = 256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, cols, generator=g) * torch.exp(0.7 * torch.randn(cols, generator=g))
    return torch.randn(rows, cols, generator=g).cuda(), (2 * x.T @ x / 2048).cuda()


@pytest.mark.parametrize(("n_m", "segments"), [((2, 4), (64, 16, 16)), (None, (64, 16, 16)), (None, None)])
def test_graph_replayed_blocks_give_the_eager_masks(n_m, segments) -> None:
    w, h = _problem()
    eager_w, eager_keep = sparsegpt(w, h, 0.5, n_m, segments=segments, graphs=False)
    graph_w, graph_keep = sparsegpt(w, h, 0.5, n_m, segments=segments, graphs=True)
    assert torch.equal(graph_keep, eager_keep)
    torch.testing.assert_close(graph_w, eager_w, rtol=0, atol=0)  # the same kernels, replayed


def test_bf16_hessian_accumulates_in_fp32_like_the_upcast() -> None:
    x = torch.randn(4096, 512, device="cuda").to(torch.bfloat16)
    upcast = x.float().T @ x.float()
    direct = torch.mm(x.T, x, out_dtype=torch.float32)  # what sequential._hessians adds up on CUDA
    assert direct.dtype == torch.float32
    torch.testing.assert_close(direct, upcast, rtol=1e-3, atol=1e-2)


def test_auto_micro_batch_fits_and_trains_on_the_gpu() -> None:
    model = tiny_model().cuda()
    result = train_causal_lm(
        model, _blocks(), _cfg(steps=4, micro_batch_size="auto", precision="bf16-master")
    )
    assert result.micro_batch_size == 4 and result.probe_seconds > 0  # a tiny model: the whole batch fits
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.losses[-1][1] < result.losses[0][1]
