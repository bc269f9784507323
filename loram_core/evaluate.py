"""Evaluation: held-out perplexity and parameter accounting."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Token-level perplexity of `model` on `blocks`.

    Args:
        model: a causal LM returning `.logits` of shape `[batch, seq, vocab]`.
        blocks: int `[n, seq_len]` held-out token blocks.
        batch_size: blocks per forward pass.

    Returns:
        exp of the mean next-token negative log-likelihood over all predicted tokens.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device=device, dtype=torch.long)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
