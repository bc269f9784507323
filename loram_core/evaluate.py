"""Held-out perplexity by the standard windowed protocol.

The protocol the pruning literature scores WikiText with (SparseGPT, Wanda, llm-compressor, and
lm-eval's rolling windows): the held-out text as one token stream, cut into non-overlapping
windows of `window` tokens, each window a fresh context; every token but a window's first is
predicted and the perplexity is exp of the mean negative log-likelihood over all predicted tokens.
`stride < window` gives the overlapping windows of Hugging Face's perplexity guide: windows start
every `stride` tokens and each scores only the tokens no earlier window scored (its last
`stride`), so every scored token but the first window's sees at least `window - stride` tokens of
context. Pure counting (`windows`, `protocol`) imports nothing heavy, so the card can use it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def windows(n_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """The windows over a stream of `n_tokens`: `(begin, end, scored)` each, as HF's guide loops.

    Windows begin at 0, stride, 2*stride, ...; each ends `window` tokens later or at the stream's
    end, and the loop stops at the window that reaches the end. A window scores its last
    `end - previous end` tokens, except a token at the window's own start (no context): so with
    `stride == window` (the default) each window scores its `window - 1` predicted tokens.

    Args:
        n_tokens: length of the stream.
        window: tokens per window (the model's context in this evaluation).
        stride: tokens between window starts, 1 <= stride <= window; None: `window`.
    """
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be between 1 and the window ({window})")
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        targets = end - prev_end
        out.append((begin, end, targets - 1 if end - targets == begin else targets))
        prev_end = end
        if end == n_tokens:
            break
    return out


def protocol(n_tokens: int, window: int, stride: int | None = None) -> dict:
    """What the card and manifest say of an evaluation: window, stride, windows and scored tokens."""
    w = windows(n_tokens, window, stride)
    return {
        "name": "windowed",
        "tokens": n_tokens,
        "window": window,
        "stride": window if stride is None else stride,
        "windows": len(w),
        "scored_tokens": sum(s for _, _, s in w),
    }


def protocol_sentence(p: dict) -> str:
    """One sentence naming the protocol and its token counts (for the card)."""
    if p["stride"] == p["window"]:
        how = f"{p['windows']:,} non-overlapping windows of {p['window']:,} tokens"
    else:
        how = (
            f"{p['windows']:,} windows of {p['window']:,} tokens starting every {p['stride']:,} tokens, each "
            "scoring only the tokens no earlier window scored"
        )
    return (
        f"Perplexity by the standard windowed protocol (as SparseGPT, Wanda, llm-compressor and lm-eval score "
        f"WikiText): the held-out text as one stream of {p['tokens']:,} tokens, {how}; {p['scored_tokens']:,} "
        "tokens scored, each predicted from the tokens before it in its window."
    )


def perplexity(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, stride: int | None = None
) -> float:
    """Perplexity of `model` on a held-out stream by the windowed protocol (`windows`).

    Args:
        model: a causal LM returning `.logits` of shape `[batch, seq, vocab]`.
        blocks: int `[n, window]`: the held-out stream cut into consecutive windows (row-major, so
            `blocks.flatten()` is the stream); its row length is the window.
        batch_size: windows per forward pass.
        stride: tokens between window starts (<= window); None: non-overlapping windows.

    Returns:
        exp of the mean next-token negative log-likelihood over the scored tokens.
    """
    nll, count = windowed_nll(model, blocks, batch_size, stride)
    return math.exp(nll / count)


def windowed_nll(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, stride: int | None = None
) -> tuple[float, int]:
    """(summed negative log-likelihood, scored tokens) of `model` on the stream `blocks` (see `perplexity`)."""
    import torch
    from torch import nn

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stream = blocks.reshape(-1)
    todo = windows(stream.numel(), blocks.shape[1], stride)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        i = 0
        while i < len(todo):
            # A batch of windows of one length (only the last window of a strided loop can be shorter).
            length = todo[i][1] - todo[i][0]
            batch = [todo[i]]
            while len(batch) < batch_size and i + len(batch) < len(todo):
                nxt = todo[i + len(batch)]
                if nxt[1] - nxt[0] != length:
                    break
                batch.append(nxt)
            i += len(batch)
            ids = torch.stack([stream[b:e] for b, e, _ in batch]).to(device=device, dtype=torch.long)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(batch), -1)
            for row, (_, _, scored) in zip(nll, batch, strict=True):
                total_nll += row[row.numel() - scored :].sum().item()
                total_tokens += scored
    model.train(was_training)
    return total_nll, total_tokens
