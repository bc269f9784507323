"""Next-token loss without the whole vocabulary-logits tensor, and the FLOP count behind MFU.

For a `[batch, seq]` block the model's own loss materialises `[batch, seq, vocab]` logits in fp32
(with a 128k vocabulary and 8 x 2048 tokens: 8 GiB, plus as much again for its gradient), often
more than the decoder's activations. `causal_lm_loss` runs the head and the cross-entropy over
`chunk_tokens` positions at a time under activation checkpointing: each chunk's logits exist only
while that chunk is computed, in forward and again in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int | None) -> torch.Tensor:
    """Mean next-token cross-entropy of a transformers causal LM on unpadded blocks.

    Args:
        model: a `*ForCausalLM` with `.model` (the decoder) and `.lm_head` (not wrapped by DDP/FSDP:
            the chunked path calls the two directly).
        input_ids: int64 `[batch, seq]`; every position but the last predicts the next.
        chunk_tokens: positions per head/loss chunk; None uses the model's own loss.

    Returns:
        A scalar float32 loss equal to `model(input_ids, labels=input_ids).loss`.
    """
    if chunk_tokens is None:
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(
            _chunk_nll, flat[start:stop], targets[start:stop], model.lm_head, use_reentrant=False
        )
    return total / targets.numel()


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """FLOPs of one training token (forward + backward), as MFU counts them (PaLM, appendix B).

    `6 N` for the N weights of every linear layer (the head included, embeddings excluded: a lookup
    is no matmul), plus `12 x q_width x seq_len` per decoder layer for the attention scores and
    their use (`q_width` = heads x head_dim of that layer, so pruned widths count as pruned). The
    causal mask's skipped half is counted, as PaLM and most MFU reports do; a frozen head's
    skipped weight gradient is counted too. Both overstate the work slightly.
    """
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = sum(
        12 * m.q_proj.out_features * seq_len
        for m in model.modules()
        if hasattr(m, "q_proj") and hasattr(m, "o_proj")
    )
    return 6.0 * linear + attention
