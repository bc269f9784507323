"""The distillation divergences: KL from the teacher's next-token distribution to the student's.

Forward KL, `KL(p || q) = sum_v p_v (log p_v - log q_v)` with `p = softmax(teacher / T)` and
`q = softmax(student / T)`: what Megatron/ModelOpt's `LogitsKLLoss` computes by default (the loss
NVIDIA's Minitron distils with, at T = 1) and what torchtune's `ForwardKLLoss` minimises (torchtune
drops the teacher's entropy `-sum p log p`, a constant for the student: same gradient, but a loss
that is not zero at the optimum). The training loss multiplies it by `T^2` (Hinton et al. 2015), so
its gradient `T (q - p)` keeps its size whatever the temperature.

The top-k form keeps the teacher's `k` most likely tokens `S` and lumps the rest of its mass into
one bucket, `tail_p = 1 - sum_S p`, against the student's mass outside `S`, `tail_q`:

    KL_k = sum_{v in S} p_v (log p_v - log q_v) + tail_p (log tail_p - log tail_q)

By the chain rule of KL divergence (coarse-graining the vocabulary into S's tokens and one bucket),

    KL - KL_k = tail_p * KL(p_tail || q_tail) >= 0,

where `p_tail`, `q_tail` are both distributions conditioned on the tail; and by Jensen,

    KL(p_tail || q_tail) <= log sum_{v not in S} p_tail_v^2 / q_tail_v <= log max_{v not in S} p_tail_v / q_tail_v,

so the top-k loss never overstates the full one, and understates it by at most the teacher's tail
mass times that log-ratio (zero when `k` is the vocabulary). `tail_gap_bound` computes the bound;
tests/loram_core/test_distill.py checks it on a tiny model. Every function takes float32 logits of
`n` positions (`[n, vocab]`) and returns a sum over positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Fills the teacher's top-k positions before the student's tail logsumexp: finite, so a row whose
# every entry is filled (k = vocab) gives a finite log-mass and no NaN gradient.
_FILL = torch.finfo(torch.float32).min


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed forward KL from the teacher's to the student's tempered distribution.

    Args:
        student_logits: float32 `[n, vocab]` (with gradient).
        teacher_logits: float32 `[n, vocab]` (no gradient needed).
        temperature: `T`; both logits are divided by it before the softmax.

    Returns:
        A float32 scalar, `sum_i KL(p_i || q_i)` (not scaled by `T^2`).
    """
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True)


def teacher_topk(
    teacher_logits: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's `k` largest tempered log-probabilities per position and its log-mass outside them.

    Args:
        teacher_logits: float32 `[n, vocab]`.
        k: tokens kept per position (at most `vocab`).
        temperature: `T`.

    Returns:
        `(log_p [n, k] float32, indices [n, k] int64, log_tail [n] float32)`; `log_tail` is
        `log(1 - sum exp(log_p))` computed without cancellation (a logsumexp over the other tokens),
        `-inf` when `k` is the whole vocabulary.
    """
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    top, idx = log_p.topk(k, dim=-1)
    if k == log_p.shape[-1]:
        return top, idx, torch.full(top.shape[:-1], float("-inf"), device=top.device)
    return top, idx, torch.logsumexp(log_p.scatter(-1, idx, _FILL), dim=-1)


def topk_kl_sum(
    student_logits: torch.Tensor,
    log_p: torch.Tensor,
    indices: torch.Tensor,
    log_tail: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Summed top-k forward KL with the teacher's remaining mass lumped into one bucket (module doc).

    Args:
        student_logits: float32 `[n, vocab]` (with gradient).
        log_p, indices, log_tail: the teacher's `teacher_topk` at the same temperature: `[n, k]`
            float32, `[n, k]` int64, `[n]` float32.
        temperature: `T`.

    Returns:
        A float32 scalar, `sum_i KL_k(p_i || q_i)` (not scaled by `T^2`).
    """
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    kept = torch.sum(log_p.exp() * (log_p - log_q.gather(-1, indices)))
    if indices.shape[-1] == log_q.shape[-1]:
        return kept
    log_tail_q = torch.logsumexp(log_q.scatter(-1, indices, _FILL), dim=-1)
    tail_p = log_tail.exp()
    # A teacher tail of exactly zero contributes nothing (0 log 0 = 0), not 0 * -inf.
    tail = torch.where(tail_p > 0, tail_p * (log_tail - log_tail_q), torch.zeros_like(tail_p))
    return kept + tail.sum()


def tail_gap_bound(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """Per position, the bound on `KL - KL_k`: `tail_p * log max_{v not in S} p_tail_v / q_tail_v`.

    Args:
        student_logits, teacher_logits: float32 `[n, vocab]`.
        k: the teacher's kept tokens per position (`S`: its `k` most likely).
        temperature: `T`.

    Returns:
        float32 `[n]`, each at least the position's `KL - KL_k` (module doc); zero when `k = vocab`.
    """
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    _, idx = log_p.topk(k, dim=-1)
    if k == log_p.shape[-1]:
        return torch.zeros(log_p.shape[0], device=log_p.device)
    tail = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, idx, False)
    neg = torch.tensor(float("-inf"), device=log_p.device)
    log_tail_p = torch.logsumexp(torch.where(tail, log_p, neg), dim=-1, keepdim=True)
    log_tail_q = torch.logsumexp(torch.where(tail, log_q, neg), dim=-1, keepdim=True)
    ratio = torch.where(tail, (log_p - log_tail_p) - (log_q - log_tail_q), neg).amax(dim=-1)
    return log_tail_p.squeeze(-1).exp() * ratio
