"""FLoRA: AdamW-like training whose momentum lives in a resampled random low-rank projection.

Hao, Cao & Mou, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors" (ICML 2024,
arXiv 2402.03293). For a weight matrix ``W`` of shape ``(m, n)`` AdamW keeps two ``(m, n)``
moments. Flora keeps instead:

* the first moment compressed by a Gaussian projection ``A`` of shape ``(r, d)``,
  ``A ~ N(0, 1/r)`` so that ``E[A^T A] = I``. ``d`` is the smaller side of ``W``: the state is
  ``(m, r)`` when ``n <= m`` (``M = G A^T``) and ``(r, n)`` otherwise (``M = A G``). ``A`` is
  never stored: it is regenerated from a per-matrix seed each step;
* every ``kappa`` steps a new seed is drawn and the momentum is carried over into the new
  projection (``M <- (M A_old) A_new^T``), the paper's momentum-transfer step, so that the
  accumulated update is not confined to one rank-``r`` subspace;
* the second moment factored into row and column means (Adafactor, Shazeer & Stern 2018).

Only the momentum's history is compressed: each step combines it with the current gradient at
full rank. The update's RMS is then capped at 1, as in the paper and Adafactor.

That is ``r * max(m, n) + m + n`` numbers per matrix instead of ``2 * m * n``. Vectors (norms,
biases), tensors that are not matrices, and matrices with ``min(m, n) <= rank`` get plain Adam
state, as they are small or would not be compressed.

Sparse weights (``masks``): the projection would spread a pruned position's gradient over kept
weights, and decompressing the momentum puts values at pruned positions. With a keep-mask, the
gradient is zeroed at pruned positions before it is compressed, the decompressed momentum and the
update are zeroed there, and the factored second moment and the RMS cap are taken over kept
positions only (row and column means over their kept entries, normalised by the mean over all kept
entries), so a pruned position counts nowhere and a dense mask gives the unmasked numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
# Added to squared gradients before factoring, so that a row or column that never saw a gradient
# has a positive (not zero) second moment and the rank-1 estimate never divides by zero.
_SQ_FLOOR = 1e-30


def mix_seed(*values: int) -> int:
    """Hashes integers into a seed in ``[0, 2**63)`` (SplitMix64 finalizer).

    Seeds are derived by hashing instead of drawing from a global RNG, so they depend only on
    what is saved in the optimizer state and a resumed run draws exactly the same projections.

    Args:
        values: Integers to hash, e.g. ``(base_seed, param_index)`` or ``(old_seed,)``.

    Returns:
        A non-negative seed accepted by ``torch.Generator.manual_seed``.
    """
    z = 0
    for v in values:
        z = (z + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def projection(seed: int, rank: int, dim: int, device: torch.device | str) -> Tensor:
    """Regenerates the random projection for a seed.

    Args:
        seed: The per-matrix seed kept in the optimizer state.
        rank: ``r``, the number of rows.
        dim: ``d``, the side of the matrix being compressed.
        device: Where to draw it (a generator on that device, so nothing crosses devices).

    Returns:
        ``A`` of shape ``(rank, dim)``, float32, entries ``N(0, 1/rank)``.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    a = torch.randn(rank, dim, generator=generator, device=device, dtype=torch.float32)
    return a.div_(math.sqrt(rank))


def _down(full: Tensor, a: Tensor, cols: bool) -> Tensor:
    """``(m, n) -> (m, r)`` if ``cols`` else ``(r, n)``."""
    return full @ a.T if cols else a @ full


def _up(compressed: Tensor, a: Tensor, cols: bool) -> Tensor:
    """``(m, r)`` or ``(r, n)`` back to ``(m, n)``: an unbiased estimate of what was compressed."""
    return compressed @ a if cols else a.T @ compressed


class _Keep:
    """A sparse weight's keep-mask and its counts, computed once (float32, clamped to 1: a row with
    no kept entry gets no update anyway)."""

    def __init__(self, mask: Tensor) -> None:
        self.pruned = ~mask
        kept = mask.float()
        self.per_row = kept.sum(dim=1).clamp_(min=1.0) if mask.dim() == 2 else None
        self.per_col = kept.sum(dim=0).clamp_(min=1.0) if mask.dim() == 2 else None
        self.count = kept.sum().clamp_(min=1.0)


def _store(dst: Tensor, src: Tensor) -> None:
    """Writes an fp32 working copy back into state kept in the parameter's dtype."""
    if src is not dst:
        dst.copy_(src)


class Flora(torch.optim.Optimizer):
    """Flora with Adam-style bias correction and decoupled (AdamW) weight decay.

    Optimizer state holds only tensors and Python ints (``step``, ``seed``), so
    ``state_dict()`` survives ``torch.save`` / ``torch.load(weights_only=True)`` and a resumed run
    is bit-identical to an uninterrupted one. State tensors take the parameter's dtype, as torch's
    ``load_state_dict`` casts them to it anyway; arithmetic runs in float32.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate, read from ``param_group["lr"]`` each step (LR schedulers work).
        betas: ``(beta1, beta2)`` for the first and second moments.
        eps: Added to the root of the second moment.
        weight_decay: Decoupled decay: ``W <- W * (1 - lr * weight_decay)`` each step.
        rank: ``r``, rank of the momentum projection.
        kappa: Steps between projection resamplings.
        seed: Base seed; matrix ``i`` (counting over all groups) starts from ``mix_seed(seed, i)``.
        masks: Parameter -> bool keep-mask of its shape (sparse weights): statistics and updates over
            kept positions only (see the module docstring). Not part of ``state_dict()``: pass the
            same masks to the optimizer a run resumes with.
        clip_threshold: Caps the RMS of a compressed matrix's update (the paper normalizes by
            it); random projection inflates the update's magnitude by about ``sqrt(d / r)``, and
            this keeps the step size on AdamW's scale.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 8,
        kappa: int = 100,
        seed: int = 0,
        clip_threshold: float = 1.0,
        masks: Mapping[Tensor, Tensor] | None = None,
    ) -> None:
        if lr < 0 or weight_decay < 0 or eps < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if rank < 1 or kappa < 1:
            raise ValueError(f"rank and kappa must be >= 1, got rank={rank}, kappa={kappa}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            kappa=kappa,
            seed=seed,
            clip_threshold=clip_threshold,
        )
        super().__init__(params, defaults)
        self._keep: dict[Tensor, _Keep] = {}
        for p, mask in (masks or {}).items():
            if tuple(mask.shape) != tuple(p.shape):
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} for a parameter of shape {tuple(p.shape)}"
                )
            self._keep[p] = _Keep(mask.to(p.device, torch.bool))

    @staticmethod
    def compresses(shape: torch.Size | tuple[int, ...], rank: int) -> bool:
        """Whether a parameter of this shape gets compressed momentum (else plain Adam state)."""
        return len(shape) == 2 and min(shape) > rank

    def momentum(self, p: Tensor) -> Tensor | None:
        """The first moment of ``p`` as it would be decompressed now, for inspection.

        Args:
            p: A parameter of this optimizer.

        Returns:
            Float32 tensor shaped like ``p`` (``None`` before ``p``'s first step).
        """
        state = self.state.get(p)
        if not state:
            return None
        if "seed" not in state:
            return state["exp_avg"].float().clone()
        cols = p.shape[1] <= p.shape[0]
        rank = state["exp_avg"].shape[1] if cols else state["exp_avg"].shape[0]
        a = projection(state["seed"], rank, min(p.shape), p.device)
        full = _up(state["exp_avg"].float(), a, cols)
        keep = self._keep.get(p)
        return full if keep is None else full.masked_fill_(keep.pruned, 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step.

        Args:
            closure: Optional closure that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, if a closure was given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            for p in group["params"]:
                index += 1  # counts every parameter, as state_dict() does, so seeds are stable
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Flora does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group, index)
                state["step"] += 1
                grad = p.grad.float()
                keep = self._keep.get(p)
                if keep is not None:  # a pruned position's gradient must not enter any statistic
                    grad = grad.masked_fill(keep.pruned, 0)
                if "seed" in state:
                    direction = self._flora_direction(state, grad, group, keep)
                else:
                    direction = self._adam_direction(state, grad, group)
                p32 = p.float()
                if group["weight_decay"] != 0:
                    p32.mul_(1.0 - group["lr"] * group["weight_decay"])
                p32.add_(direction, alpha=-group["lr"])
                _store(p, p32)
        return loss

    @staticmethod
    def _init_state(p: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> None:
        state["step"] = 0
        if not Flora.compresses(p.shape, group["rank"]):
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return
        m, n = p.shape
        # Compress the smaller side d: the reconstruction's noise grows like d / r, and keeping
        # the longer side intact keeps rows apart (an embedding's unseen tokens get no update).
        compressed = (m, group["rank"]) if n <= m else (group["rank"], n)
        state["seed"] = mix_seed(group["seed"], index)
        state["exp_avg"] = torch.zeros(compressed, dtype=p.dtype, device=p.device)
        state["exp_avg_sq_row"] = torch.zeros(m, dtype=p.dtype, device=p.device)
        state["exp_avg_sq_col"] = torch.zeros(n, dtype=p.dtype, device=p.device)

    @staticmethod
    def _adam_direction(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        beta1, beta2 = group["betas"]
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"].float(), state["exp_avg_sq"].float()
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        _store(state["exp_avg"], exp_avg)
        _store(state["exp_avg_sq"], exp_avg_sq)
        denom = (exp_avg_sq / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
        return (exp_avg / (1.0 - beta1**t)).div_(denom)

    @staticmethod
    def _flora_direction(
        state: dict[str, Any], grad: Tensor, group: dict[str, Any], keep: _Keep | None = None
    ) -> Tensor:
        """Updates the compressed state of one ``(m, n)`` matrix; returns its ``(m, n)`` step.

        ``keep`` (sparse weights): ``grad`` is already zero at pruned positions; the step is zero
        there and its statistics count kept positions only.
        """
        beta1, beta2 = group["betas"]
        rank, t = group["rank"], state["step"]
        m, n = grad.shape
        cols = n <= m
        a = projection(state["seed"], rank, min(m, n), grad.device)

        exp_avg = state["exp_avg"].float()
        # Only the history needs compressing: the step uses this gradient at full rank (as the
        # authors' code does), which trains far better at small r than decompressing it too.
        full = _up(exp_avg, a, cols).mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg.mul_(beta1).add_(_down(grad, a, cols), alpha=1.0 - beta1)

        row, col = state["exp_avg_sq_row"].float(), state["exp_avg_sq_col"].float()
        if keep is None:
            sq = grad.square().add_(_SQ_FLOOR)
            row_mean, col_mean = sq.mean(dim=1), sq.mean(dim=0)
        else:  # means over kept entries (zeros at pruned positions would halve a 2:4 row's)
            full.masked_fill_(keep.pruned, 0)
            sq = grad.square()
            row_mean = sq.sum(dim=1).div_(keep.per_row).add_(_SQ_FLOOR)
            col_mean = sq.sum(dim=0).div_(keep.per_col).add_(_SQ_FLOOR)
        row.mul_(beta2).add_(row_mean, alpha=1.0 - beta2)
        col.mul_(beta2).add_(col_mean, alpha=1.0 - beta2)
        _store(state["exp_avg_sq_row"], row)
        _store(state["exp_avg_sq_col"], col)
        # Rank-1 estimate v_ij = row_i * col_j / mean(row); both factors carry the (1 - beta2^t)
        # bias and the ratio keeps one, removed here as Adam does. With a mask, mean(row) is the
        # mean over kept entries (rows weighted by their kept counts).
        row_norm = row.mean() if keep is None else (row * keep.per_row).sum() / keep.count
        v_hat = torch.outer(row, col).div_(row_norm * (1.0 - beta2**t))
        direction = full.div_(1.0 - beta1**t)
        direction.div_(v_hat.sqrt_().add_(group["eps"]))
        if keep is None:
            rms = direction.square().mean().sqrt()
        else:
            rms = direction.square().sum().div_(keep.count).sqrt()
        direction.div_((rms / group["clip_threshold"]).clamp_(min=1.0))

        if t % group["kappa"] == 0:
            # Resample: carry the momentum into the next projection instead of dropping it.
            new_seed = mix_seed(state["seed"])
            a_new = projection(new_seed, rank, min(m, n), grad.device)
            exp_avg = _down(_up(exp_avg, a, cols), a_new, cols)
            state["seed"] = new_seed
        _store(state["exp_avg"], exp_avg)
        return direction
