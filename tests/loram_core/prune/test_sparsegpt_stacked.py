"""SparseGPT's GPU-shaped path (stacked shared inputs, one block function) gives the CPU path's masks."""

from __future__ import annotations

import pytest
import torch

from loram_core.config import PruneConfig
from loram_core.models import LINEAR_NAMES, layer_linears, load_model
from loram_core.prune import prune_checkpoint, sequential
from loram_core.prune.sparse import _prune_block, sparsegpt


def _old_block(W1, hinv1, n_m, ratio):
    """The column loop of one block as `sparsegpt` ran it before the block function (transcribed)."""
    Q1 = torch.zeros_like(W1)
    err1 = torch.zeros_like(W1)
    d = hinv1.diagonal()
    if n_m is None:
        score = W1**2 / d[None, :] ** 2
        k = int(score.numel() * ratio)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if k:
            mask1.view(-1)[torch.topk(score.view(-1), k, largest=False).indices] = True
    else:
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
    for i in range(W1.shape[1]):
        if n_m is not None and i % n_m[1] == 0:
            span = W1[:, i : i + n_m[1]] ** 2 / d[None, i : i + n_m[1]] ** 2
            mask1.scatter_(1, i + torch.topk(span, n_m[0], dim=1, largest=False).indices, True)
        w = W1[:, i]
        q = w.masked_fill(mask1[:, i], 0)
        Q1[:, i] = q
        e = (w - q) / d[i]
        W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
        err1[:, i] = e
    return Q1, err1, mask1


@pytest.mark.parametrize("n_m", [(2, 4), None])
def test_block_function_is_the_old_column_loop(n_m) -> None:
    g = torch.Generator().manual_seed(0)
    W1 = torch.randn(48, 32, generator=g)
    a = torch.randn(32, 32, generator=g)
    hinv1 = torch.linalg.cholesky(torch.linalg.inv(a @ a.T + 32 * torch.eye(32)), upper=True)
    expected = _old_block(W1.clone(), hinv1, n_m, 0.5)
    got = _prune_block(W1.clone(), hinv1, n_m, 0.5, (48,))
    for x, y in zip(got, expected, strict=True):
        assert torch.equal(x, y)


def test_stacked_solve_equals_each_matrix_alone() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g) * torch.exp(0.7 * torch.randn(64, generator=g))
    h = 2 * x.T @ x / 512
    ws = [torch.randn(rows, 64, generator=g) for rows in (32, 8, 8)]  # q, k, v of a GQA layer
    for n_m, ratio in (((2, 4), 0.5), (None, 0.5), (None, 0.3)):
        alone = [sparsegpt(w, h, ratio, n_m, blocksize=16) for w in ws]
        stacked_w, stacked_keep = sparsegpt(torch.cat(ws), h, ratio, n_m, blocksize=16, segments=(32, 8, 8))
        assert torch.equal(stacked_keep, torch.cat([k for _, k in alone]))
        torch.testing.assert_close(stacked_w, torch.cat([w for w, _ in alone]), rtol=1e-5, atol=1e-6)
        if n_m is None:  # the ratio holds per matrix, not only over the stack
            for (_, keep), w in zip(alone, ws, strict=True):
                assert (~keep).sum().item() == pytest.approx(w.numel() * ratio, abs=2 * 4)


def _per_linear_prune_layer(layer, family, inputs, cfg, ratio):
    """`prune_layer` as it was: every linear solved alone (the shared Hessian factored once per linear)."""
    groups = sequential.TRUE_SEQUENTIAL if cfg.true_sequential else (LINEAR_NAMES,)
    keep = {}
    for names in groups:
        by_name = layer_linears(layer, family)
        linears = {getattr(family, n): by_name[n] for n in names}
        shared = tuple(
            tuple(getattr(family, n) for n in group if n in names) for group in family.shared_inputs
        )
        hessians = sequential._hessians(layer, linears, inputs, tuple(s for s in shared if s))
        for path, lin in linears.items():
            hessian = hessians.pop(path)
            new_w, keep[path] = sparsegpt(lin.weight.data, hessian, ratio, tuple(cfg.n_m) if cfg.strategy == "semi"
                                          else None, damp=cfg.damp, blocksize=cfg.blocksize)  # fmt: skip
            lin.weight.data.copy_(new_w)
    return keep


@pytest.mark.parametrize("true_sequential", [False, True])
@pytest.mark.parametrize("strategy", ["semi", "unstructured"])
def test_streamed_prune_keeps_the_per_linear_masks(
    tiny_checkpoint, tmp_path, monkeypatch, strategy: str, true_sequential: bool
) -> None:
    calib = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(2))
    cfg = PruneConfig(
        strategy=strategy, ratio=0.5, calib_samples=8, blocksize=16, true_sequential=true_sequential
    )
    new = prune_checkpoint(tiny_checkpoint, tmp_path / "new", cfg, calib).keep_masks()
    monkeypatch.setattr(sequential, "prune_layer", _per_linear_prune_layer)
    old = prune_checkpoint(tiny_checkpoint, tmp_path / "old", cfg, calib).keep_masks()
    assert new.keys() == old.keys() and len(new) == 7 * 4  # seven linears in each of the 4 layers
    for name in old:
        assert torch.equal(new[name], old[name]), name
    a, b = load_model(tmp_path / "new"), load_model(tmp_path / "old")
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
