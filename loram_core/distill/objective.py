"""The alignment objectives that use the original as teacher: `kd` and `cpt+kd` (`align.objective`).

A `Distiller` replaces the next-token loss of a micro-batch (`loram_core.loss.causal_lm_loss`) by

    kd:      T^2 * mean_i KL(p_i || q_i)
    cpt+kd:  (1 - w) * mean_i CE_i + w * T^2 * mean_i KL(p_i || q_i)      (w = align.kd_weight)

over the same positions (every position of a block but the last), as torchtune's KD recipe mixes
its two losses (`kd_ratio`). `p` comes from the teacher: `online`, its forward on the same
micro-batch (no gradient, on the student's device); `topk`, its cached top-k rows of those blocks
(`loram_core.distill.topk`) with the tail lumped. With `chunk_tokens` the head, the cross-entropy
and the KL run over that many positions at a time under activation checkpointing, the teacher's
head too (online), so neither model's vocabulary logits ever all exist at once; the teacher's last
hidden states (`[tokens, hidden]`) are what stays resident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loram_core.distill.kl import kl_sum, topk_kl_sum

if TYPE_CHECKING:
    from loram_core.distill.topk import TopkCache


@dataclass
class Distiller:
    """The loss of one micro-batch under `kd` or `cpt+kd`, fed by a resident teacher or its top-k cache.

    Attributes:
        kd_share: the distillation term's weight (1 for `kd`, `kd_weight` for `cpt+kd`).
        temperature: `T` of both softmaxes.
        teacher: the frozen original on the student's device (`online`), or None.
        cache: the teacher's top-k cache (`topk`), or None.
    """

    kd_share: float
    temperature: float
    teacher: nn.Module | None = None
    cache: TopkCache | None = None
    ce: bool = False  # whether the next-token term is part of the objective (`cpt+kd`)

    def loss(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None,
        chunk_tokens: int | None,
    ) -> torch.Tensor:
        """The objective's mean over the micro-batch's predicting positions (a float32 scalar).

        Args:
            model: the student, a `*ForCausalLM` (or its DDP/FSDP wrapper when `chunk_tokens` is None).
            input_ids: int64 `[batch, seq]`.
            positions: int `[batch]`, the blocks' indices in the training blocks (the top-k cache's
                rows); None: `0..batch-1` (the micro-batch probe, which trains on the first blocks).
            chunk_tokens: positions per head/loss chunk; None: the model's full logits at once.
        """
        targets = input_ids[:, 1:].reshape(-1)
        soft = self._teacher_side(input_ids, positions)
        if chunk_tokens is None:
            logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
            return self._terms(logits.reshape(-1, logits.shape[-1]).float(), targets, *soft) / targets.numel()
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, flat.shape[0], chunk_tokens):
            part = slice(start, start + chunk_tokens)
            total = total + checkpoint(
                self._chunk, flat[part], targets[part], model.lm_head, *(t[part] for t in soft),
                use_reentrant=False,
            )  # fmt: skip
        return total / targets.numel()

    def _teacher_side(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """Per predicting position: the teacher's last hidden state (online) or its top-k rows (topk)."""
        if self.teacher is not None:
            with torch.no_grad():
                hidden = self.teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
            return (hidden.reshape(-1, hidden.shape[-1]),)
        if positions is None:
            positions = torch.arange(input_ids.shape[0])
        logp, idx, tail = self.cache.rows(positions)
        device = input_ids.device
        k = logp.shape[-1]
        return (logp.reshape(-1, k).to(device), idx.reshape(-1, k).to(device), tail.reshape(-1).to(device))

    def _chunk(
        self, hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, *soft: torch.Tensor
    ) -> torch.Tensor:
        return self._terms(head(hidden).float(), targets, *soft)

    def _terms(self, logits: torch.Tensor, targets: torch.Tensor, *soft: torch.Tensor) -> torch.Tensor:
        """The objective summed over `logits`' positions: float32 `[n, vocab]` -> scalar."""
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher.lm_head(soft[0]).float()
            kl = kl_sum(logits, teacher_logits, self.temperature)
        else:
            kl = topk_kl_sum(logits, *soft, self.temperature)
        kd = self.temperature**2 * kl
        if not self.ce:
            return kd
        # The same cross-entropy as the `cpt` path (loss.py's _chunk_nll), so that kd_weight=0 is `cpt`.
        ce = F.cross_entropy(logits, targets, reduction="sum")
        return (1 - self.kd_share) * ce + self.kd_share * kd
