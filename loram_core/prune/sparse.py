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
    is read back only if a factorization fails. On a GPU the spill is a copy on the device.
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
        # A device-to-device copy: no synchronising transfer into pageable host memory per matrix.
        backup = work.clone()
        yield work, lambda: work.copy_(backup)
        return
    with tempfile.TemporaryFile(prefix="loram-hessian-") as spill:
        work.numpy().tofile(spill)

        def restore_spilled() -> None:
            spill.seek(0)
            spill.readinto(memoryview(work.numpy()).cast("B"))

        yield work, restore_spilled


def _prune_block(
    W1: torch.Tensor,
    hinv1: torch.Tensor,
    n_m: tuple[int, int] | None,
    ratio: float,
    segments: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of SparseGPT's column loop: choose the block's mask, prune, spread each error right.

    A pure function of fixed-shape tensors (`W1 [rows, width]`, updated in place; `hinv1
    [width, width]`), so on a GPU one capture of it as a CUDA graph replays the block's ~9
    kernels per column as one launch (`_BlockGraphs`); the CPU runs it as it is, with the same
    operations in the same order. `segments` are the row counts of matrices stacked on one input
    (q/k/v, gate/up): the unstructured mask is chosen per matrix, as if each were solved alone.

    Returns:
        (Q1 the pruned block, err1 the scaled errors for the lazy update, mask1 True where pruned).
    """
    Q1 = torch.zeros_like(W1)
    err1 = torch.zeros_like(W1)
    d = hinv1.diagonal()
    mask1 = torch.zeros_like(W1, dtype=torch.bool)
    width = W1.shape[1]
    if n_m is None:
        score = W1**2 / d[None, :] ** 2
        first = 0
        for rows in segments:
            k = int(rows * width * ratio)
            if k:
                seg = mask1[first : first + rows].view(-1)
                seg[torch.topk(score[first : first + rows].reshape(-1), k, largest=False).indices] = True
            first += rows
    for i in range(width):
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


class _BlockGraphs:
    """`_prune_block` captured as one CUDA graph per block shape, replayed for every block of that shape.

    Each graph owns static input buffers (the block and its slice of the factor) that a block is
    copied into before the replay; its outputs live in the graph's memory pool and are read out
    before the next replay. Captured once per (rows, width, pattern) per prune: a decoder layer has
    four shapes at most (q/k/v, o, gate/up, down), the narrower last block of a matrix one more.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple, tuple] = {}

    def __call__(self, W1, hinv1, n_m, ratio, segments):  # noqa: ANN001, ANN204 - as _prune_block
        key = (tuple(W1.shape), W1.device, n_m, ratio, segments)
        if key not in self._graphs:
            self._graphs[key] = self._capture(W1, hinv1, n_m, ratio, segments)
        graph, static_w, static_h, outputs = self._graphs[key]
        static_w.copy_(W1)
        static_h.copy_(hinv1)
        graph.replay()
        return outputs

    @staticmethod
    def _capture(W1, hinv1, n_m, ratio, segments):  # noqa: ANN001, ANN205
        static_w, static_h = W1.clone(), hinv1.clone()
        side = torch.cuda.Stream(device=W1.device)
        side.wait_stream(torch.cuda.current_stream(W1.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (library handles, workspaces)
            _prune_block(static_w.clone(), static_h, n_m, ratio, segments)
        torch.cuda.current_stream(W1.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = _prune_block(static_w, static_h, n_m, ratio, segments)
        return graph, static_w, static_h, outputs

    def clear(self) -> None:
        """Free every captured graph and its memory pool."""
        self._graphs.clear()


BLOCK_GRAPHS = _BlockGraphs()


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
    segments: tuple[int, ...] | None = None,
    graphs: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune and update the remaining weights with OBS.

    Columns are processed left to right in blocks; within a block, each pruned weight's error is
    spread over the not-yet-processed columns through the inverse Hessian's Cholesky factor, and
    the block's accumulated error is applied lazily to the columns right of the block. The mask is
    chosen per block (adaptive mask selection) from `w^2 / [H^-1]_jj^2`.

    Matrices that read the same input share its Hessian, and SparseGPT treats every row on its
    own: stacked row-wise (q/k/v, gate/up) they are solved as one matrix with one factorization,
    the same result as one by one. `segments` gives their row counts, so that the unstructured
    mask still removes `ratio` of each matrix.

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
        segments: row counts of the matrices stacked in `weight` (default: one matrix).
        graphs: run each block as a replayed CUDA graph (default: on a CUDA device).

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
    segments = (rows,) if segments is None else tuple(segments)
    if sum(segments) != rows:
        raise ValueError(f"segments {segments} do not add up to the {rows} rows of the weight")
    dead = hessian.diagonal() == 0  # inputs that are always zero: their weights are free to prune
    W[:, dead] = 0
    with _restorable(hessian, owned, dead) as (H, restore):
        hinv = _inverse_cholesky(H, damp, restore)  # a view of H's memory
    del H
    block = BLOCK_GRAPHS if (W.device.type == "cuda" if graphs is None else graphs) else _prune_block
    pruned = torch.zeros_like(W, dtype=torch.bool)
    if n_m is not None and blocksize % n_m[1]:
        blocksize = n_m[1] * max(1, blocksize // n_m[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        Q1, err1, mask1 = block(W[:, i1:i2].clone(), hinv[i1:i2, i1:i2], n_m, ratio, segments)
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)  # in place: no rows x cols temporary
    W[pruned] = 0
    return W.to(weight.dtype), ~pruned
