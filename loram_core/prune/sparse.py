"""Sparse solvers for one weight matrix: SparseGPT, Wanda and magnitude.

Each takes a weight `W [rows, cols]` and the calibration Hessian `H = 2/N * X^T X [cols, cols]`
of the layer's inputs, and returns `(pruned W, keep-mask)`. `n_m=(n, m)` asks for n zeros in
every m consecutive weights of a row (2:4 for semi-structured); otherwise `ratio` of each matrix
is removed.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator

import torch

from loram_core.errors import LoramError


def _nm_prune_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where pruned: the n lowest scores in every group of m columns. score `[rows, cols]`."""
    rows, cols = score.shape
    if cols % m:
        raise LoramError(f"n:m sparsity {n}:{m} needs the input width ({cols}) to be a multiple of {m}.")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def magnitude(
    weight: torch.Tensor, ratio: float, n_m: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the smallest |W|: per matrix at `ratio`, or n:m per row group."""
    score = weight.float().abs()
    if n_m is not None:
        pruned = _nm_prune_mask(score, *n_m)
    else:
        k = int(score.numel() * ratio)
        pruned = torch.zeros_like(score, dtype=torch.bool)
        if k:
            pruned.view(-1)[torch.topk(score.view(-1), k, largest=False).indices] = True
    return weight.masked_fill(pruned, 0), ~pruned


def wanda(
    weight: torch.Tensor, hessian: torch.Tensor, ratio: float, n_m: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda (Sun et al. 2023): score `|W| * ||x_j||`, compared within each output row."""
    # diag(H) is proportional to the squared input norm per column.
    score = weight.float().abs() * hessian.diagonal().float().clamp_min(0).sqrt()[None, :]
    if n_m is not None:
        pruned = _nm_prune_mask(score, *n_m)
    else:
        k = int(score.shape[1] * ratio)
        pruned = torch.zeros_like(score, dtype=torch.bool)
        if k:
            pruned.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return weight.masked_fill(pruned, 0), ~pruned


def _inverse_cholesky(hessian: torch.Tensor, damp: float, restore: Callable[[], None]) -> torch.Tensor:
    """Upper Cholesky factor of `(H + damping)^-1`, computed in `hessian`'s own memory.

    LAPACK works on column-major matrices; `hessian.mT` is one (H is symmetric, so it is the same
    matrix), and torch then factors, inverts and factors again in place with no `cols x cols`
    copy: with intermediate sizes of tens of thousands each copy costs gigabytes. The returned
    factor is that column-major view. A failed factorization leaves `hessian` overwritten, so
    `restore()` must put the undamped H back before the next attempt, with ten times the damping.
    """
    lapack = hessian.mT
    mean = lapack.diagonal().mean().item()
    info = torch.zeros((), dtype=torch.int32, device=hessian.device)
    for attempt in range(6):
        if attempt:
            restore()
        lapack.diagonal().add_(damp * 10**attempt * mean)
        torch.linalg.cholesky_ex(lapack, out=(lapack, info))
        if info.item() != 0:
            continue
        torch.cholesky_inverse(lapack, out=lapack)
        torch.linalg.cholesky_ex(lapack, upper=True, out=(lapack, info))
        if info.item() == 0:
            return lapack
    raise LoramError(
        f"the calibration Hessian is not positive definite even with damping {damp * 10**5:g} x its mean "
        "diagonal: the calibration data is too small or degenerate for this layer. Raise "
        f"prune.calib_samples, or prune.damp (now {damp})."
    )


@contextlib.contextmanager
def _restorable(
    hessian: torch.Tensor, owned: bool, dead: torch.Tensor
) -> Iterator[tuple[torch.Tensor, Callable[[], None]]]:
    """The float32 matrix to factor, and a function that restores it after a failed attempt.

    Both have 1 on the diagonal of `dead` inputs (always zero, so H is singular there). Not owned:
    a copy of the caller's Hessian, restored from it. Owned: the caller's own tensor, restored from
    a copy spilled to an unlinked temporary file: the page cache holds it, not the process, and it
    is read back only if a factorization fails. On a GPU the spill is a copy in host memory.
    """
    if not owned:
        work = hessian.detach().clone().float()

        def restore() -> None:
            work.copy_(hessian)
            work[dead, dead] = 1

        work[dead, dead] = 1
        yield work, restore
        return
    work = hessian.detach()
    work[dead, dead] = 1
    if work.device.type != "cpu":
        host = work.to("cpu")
        yield work, lambda: work.copy_(host)
        return
    with tempfile.TemporaryFile(prefix="loram-hessian-") as spill:
        work.numpy().tofile(spill)

        def restore_spilled() -> None:
            spill.seek(0)
            spill.readinto(memoryview(work.numpy()).cast("B"))

        yield work, restore_spilled


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    ratio: float,
    n_m: tuple[int, int] | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
    overwrite_hessian: bool = False,
    overwrite_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune and update the remaining weights with OBS.

    Columns are processed left to right in blocks; within a block, each pruned weight's error is
    spread over the not-yet-processed columns through the inverse Hessian's Cholesky factor, and
    the block's accumulated error is applied lazily to the columns right of the block. The mask is
    chosen per block (adaptive mask selection) from `w^2 / [H^-1]_jj^2`.

    Args:
        weight: `[rows, cols]`, any float dtype; returned in the same dtype.
        hessian: `[cols, cols]` float32, `2/N X^T X` of the inputs.
        ratio: fraction removed (ignored when `n_m` is set).
        n_m: (n, m) pruning n of every m consecutive weights of a row.
        damp: added to the diagonal as a fraction of its mean.
        blocksize: columns per lazy-update block (a multiple of m for n:m).
        overwrite_hessian: damp and factor `hessian` (float32, contiguous) in place instead of a
            copy (one `cols x cols` buffer less; the caller must not use it afterwards).
        overwrite_weight: prune a float32 `weight` in place (one `rows x cols` buffer less).

    Returns:
        (pruned weight, bool keep-mask), both `[rows, cols]`.
    """
    W = (
        weight.detach()
        if overwrite_weight and weight.dtype == torch.float32
        else weight.detach().clone().float()
    )
    owned = overwrite_hessian and hessian.dtype == torch.float32 and hessian.is_contiguous()
    rows, cols = W.shape
    dead = hessian.diagonal() == 0  # inputs that are always zero: their weights are free to prune
    W[:, dead] = 0
    with _restorable(hessian, owned, dead) as (H, restore):
        hinv = _inverse_cholesky(H, damp, restore)  # a view of H's memory
    del H
    pruned = torch.zeros_like(W, dtype=torch.bool)
    if n_m is not None and blocksize % n_m[1]:
        blocksize = n_m[1] * max(1, blocksize // n_m[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        if n_m is None:
            score = W1**2 / d[None, :] ** 2
            k = int(score.numel() * ratio)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                mask1.view(-1)[torch.topk(score.view(-1), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                span = W1[:, i : i + n_m[1]] ** 2 / d[None, i : i + n_m[1]] ** 2
                mask1.scatter_(1, i + torch.topk(span, n_m[0], dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            e = (w - q) / d[i]
            W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)  # in place: no rows x cols temporary
    W[pruned] = 0
    return W.to(weight.dtype), ~pruned
