"""Taylor importance of structured groups, LLM-Pruner's estimators, on a whole model or streamed.

Four pure steps, each testable on one layer's tensors: per-weight salience from the weight, the
calibration gradient and (second order) the per-block squared gradients (`salience`); a score per
channel of each linear (`channel_scores`); the group's linears combined per position
(`reduce_group`); a head's positions summed (`group_scores`). `taylor_group_scores` gathers the
gradients with one backward pass of the whole model, `taylor_group_scores_streamed` with one
decoder layer resident at a time; both give the same scores.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loram_core.models import Family, attention_shape, layer_linears, set_activation_checkpointing
from loram_core.prune.streaming import (
    StreamedModel,
    capture_layer_inputs,
    heap_returns_memory,
    layer_output,
)

SECOND_ORDER = ("param_second", "param_mix")


def salience(
    weight: torch.Tensor, grad: torch.Tensor, acc_grad: torch.Tensor | None, estimator: str
) -> torch.Tensor:
    """Per-weight Taylor salience, as LLM-Pruner's `TaylorImportance` forms it before any reduction.

    Args:
        weight, grad: `[out, in]`; `grad` is dL/dW of the mean loss over all calibration blocks.
        acc_grad: `[out, in]`, the mean over the N blocks of each block's own squared gradient,
            `sum_j g_j^2 / N` (LLM-Pruner's `acc_grad`, the Fisher diagonal); second order only.
        estimator: `param_first` and `vector`: `W g`; `param_second`: `W acc W`; `param_mix`:
            `W g - W acc W / 2` (signed: `channel_scores` takes the absolute value).

    Returns:
        float32 `[out, in]`.
    """
    w = weight.float()
    if estimator in ("param_first", "vector"):
        return w * grad.float()
    second = w * acc_grad.float() * w
    return second if estimator == "param_second" else w * grad.float() - 0.5 * second


def channel_scores(sal: torch.Tensor, dim: int, estimator: str) -> torch.Tensor:
    """One linear's score per channel: `dim=1` scores its rows (output channels), `dim=0` its columns.

    `vector` sums the signed salience over the channel's weights and takes the absolute value;
    the `param_*` estimators sum absolute values (LLM-Pruner's `vectorize` and `param` branches).
    Returns float64 (products in `prod` reductions stay representable).
    """
    score = sal.sum(dim).abs() if estimator == "vector" else sal.abs().sum(dim)
    return score.double()


def reduce_group(members: torch.Tensor, reduction: str) -> torch.Tensor:
    """Combine the members of a coupled group, `[k, n]` -> `[n]` (LLM-Pruner's `_reduce`).

    `first` is the group's root, the member listed first.
    """
    if reduction == "sum":
        return members.sum(0)
    if reduction == "mean":
        return members.mean(0)
    if reduction == "max":
        return members.max(0).values
    if reduction == "prod":
        return members.prod(0)
    if reduction == "first":
        return members[0]
    raise ValueError(f"unknown group reduction {reduction!r}")


def group_scores(
    sal: dict[str, torch.Tensor], config, estimator: str = "param_first", reduction: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the coupled groups of one layer from its linears' per-weight salience.

    As LLM-Pruner: every member linear is scored per channel first (`channel_scores`); members
    wider than the group's dimension are summed onto it (query rows, and o's columns, onto the
    positions of the KV head they read, in transformers' `repeat_kv` layout); the members are
    reduced per position (`reduce_group`); the positions of one head are then summed (its
    `consecutive_groups` of `head_dim`). Members, root first: gate, up, down for an MLP channel;
    k, v, q, o for a KV head with GQA (root k, as LLM-Pruner's llama3.py) or q, k, v, o without
    (root q, as its hf_prune.py). Biases are not scored (LLM-Pruner scores weights only).

    Args:
        sal: per-weight salience (`salience`) by short name (q, k, v, o, gate, up, down), `[out, in]`.

    Returns:
        (channel scores `[intermediate]`, KV-head scores `[n_kv]`), float64, non-negative.
    """
    kv, group, hd = attention_shape(config)

    def score(name: str, dim: int) -> torch.Tensor:
        return channel_scores(sal[name], dim, estimator)

    channel = reduce_group(torch.stack([score("gate", 1), score("up", 1), score("down", 0)]), reduction)
    q = score("q", 1).view(kv, group, hd).sum(1).flatten()
    o = score("o", 0).view(kv, group, hd).sum(1).flatten()
    k, v = score("k", 1), score("v", 1)
    members = [k, v, q, o] if group > 1 else [q, k, v, o]
    heads = reduce_group(torch.stack(members), reduction).view(kv, hd).sum(1)
    return channel, heads


def _per_sample_square_hooks(params: list[nn.Parameter], acc_grad: dict[int, torch.Tensor], n: int) -> list:
    """Hooks adding each backward pass's gradient, squared, into `acc_grad` as LLM-Pruner's `acc_grad`.

    Each pass is one calibration block whose loss is weighted `1/n` (so that `.grad` accumulates
    the mean loss's gradient): the hook sees `g_j / n`, and adds `g_j^2 / n`. After all `n`
    blocks, `acc_grad` is `sum_j g_j^2 / n`.
    """
    hooks = []
    for p in params:

        def add_square(g: torch.Tensor, key: int = id(p)) -> None:
            g = g.detach().float() * n
            acc_grad[key] = acc_grad.get(key, 0) + g * g / n

        hooks.append(p.register_hook(add_square))
    return hooks


def _layer_scores(layer: nn.Module, family: Family, config, acc_grad: dict, estimator: str, reduction: str):
    """Group scores of one decoder layer from its linears' accumulated `.grad` (and `acc_grad`)."""
    sal = {
        name: salience(m.weight.detach(), m.weight.grad, acc_grad.get(id(m.weight)), estimator)
        for name, m in layer_linears(layer, family).items()
    }
    return group_scores(sal, config, estimator, reduction)


def taylor_group_scores(
    model: nn.Module,
    layers: range,
    calib: torch.Tensor,
    estimator: str,
    batch_size: int = 4,
    gradient_checkpointing: bool = False,
    reduction: str = "sum",
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Accumulate gradients of the LM loss over calibration blocks; score every pruned layer's groups.

    Memory beyond the weights: one gradient per scored linear (accumulated in place by autograd
    over the batches, as LLM-Pruner's single large backward would) and, for the second-order
    estimators, one running mean of per-block squared gradients; these run one block per
    backward pass (N passes for N blocks, as LLM-Pruner's loop over its examples), whatever
    `batch_size`. Nothing else in the model gets a gradient. The model may be dispatched over several devices with accelerate's `device_map`
    (not offloaded: see `prune_structured`); inputs go to the device of the embeddings.

    Args:
        model: the original model (the loss is the plain next-token loss).
        layers: indices of the layers to score.
        calib: int `[n, seq_len]` calibration blocks.
        estimator: see `salience`.
        batch_size: blocks per forward/backward pass for the first-order estimators.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        reduction: see `reduce_group`.

    Returns:
        layer -> (channel scores `[I]`, KV-head scores `[n_kv]`), float64.
    """
    from loram_core.models import decoder_layers, family_of

    family = family_of(model.config)
    scored = [lin.weight for i in layers for lin in layer_linears(decoder_layers(model)[i], family).values()]
    wanted = {id(p) for p in scored}
    previous = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)  # no gradient (or its memory) for what is not scored
    acc_grad: dict[int, torch.Tensor] = {}
    if estimator in SECOND_ORDER:
        batch_size = 1  # each block's own gradient is squared
    hooks = _per_sample_square_hooks(scored, acc_grad, calib.shape[0]) if estimator in SECOND_ORDER else []
    if gradient_checkpointing:
        set_activation_checkpointing(model, True)
        model.train()  # transformers only checkpoints in training mode; dropout is 0 in these families
    device = model.get_input_embeddings().weight.device
    model.zero_grad(set_to_none=True)
    try:
        for start in range(0, calib.shape[0], batch_size):
            batch = calib[start : start + batch_size].to(device=device, dtype=torch.long)
            n = batch.shape[0] / calib.shape[0]  # weight batches so the sum is the mean over all blocks
            (model(input_ids=batch, labels=batch).loss * n).backward()
    finally:
        for h in hooks:
            h.remove()
        if gradient_checkpointing:
            set_activation_checkpointing(model, False)
            model.eval()
    scores = {
        i: _layer_scores(decoder_layers(model)[i], family, model.config, acc_grad, estimator, reduction)
        for i in layers
    }
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(previous[id(p)])
    return scores


def taylor_group_scores_streamed(
    base_dir: Path,
    layers: range,
    calib: torch.Tensor,
    estimator: str,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
    progress=None,
    device: torch.device | str = "cpu",
    reduction: str = "sum",
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The scores of `taylor_group_scores`, with one decoder layer resident at a time on `device`.

    The forward pass runs layer by layer, writing the input hidden states of every layer from
    `layers.start` up to a temporary directory; the head's loss gives the gradient at the last
    layer's output. The backward pass then runs from the last layer down to `layers.start`: each
    layer is read again, run on its saved inputs and backpropagated with the gradient from the
    layer above. The gradient w.r.t. its input goes on down; its weights' gradients, accumulated
    over the batches as in a whole-model backward, become group scores and are freed at once.

    Resident: one layer and its linears' gradients, one batch's activations, and the hidden
    states and gradients of all calibration blocks at one layer boundary. On disk (`$TMPDIR`):
    `(L - layers.start) x blocks x seq_len x hidden` values. Compute: two forward passes and
    one backward, as with gradient checkpointing. Scores come back on the CPU. The second-order
    estimators run one block per pass (each block's gradient is squared on its own).
    """
    device = torch.device(device)
    if estimator in SECOND_ORDER:
        batch_size = 1
    stream = StreamedModel(base_dir, dtype, device)
    n_layers = stream.config.num_hidden_layers
    steps = iter(range(1, 2 * n_layers - layers.start + 1))

    def tick() -> None:
        done = next(steps)
        if progress is not None:
            progress("taylor", done, 2 * n_layers - layers.start)

    try:
        stream.prefetch(0)
        stream.load_rest()
        captured = capture_layer_inputs(stream.model, calib, batch_size)
        ids = [
            calib[s : s + batch_size].to(device=device, dtype=torch.long)
            for s in range(0, len(calib), batch_size)
        ]
        kwargs = [kw for _, kw in captured]
        with tempfile.TemporaryDirectory(prefix="loram-taylor-") as spill, heap_returns_memory() as trim:
            spill_dir = Path(spill)
            hidden = _forward_saving_inputs(
                stream, [h for h, _ in captured], kwargs, layers.start, spill_dir, trim, tick
            )
            del captured
            grads = _head_gradients(stream, hidden, ids, len(calib))
            del hidden
            stream.drop_rest()
            return _backward_scoring(
                stream, layers, kwargs, grads, (estimator, reduction), spill_dir, trim, tick
            )
    finally:
        stream.close()


@torch.no_grad()
def _forward_saving_inputs(
    stream: StreamedModel, hidden: list[torch.Tensor], kwargs: list[dict], first_saved: int, spill: Path,
    trim: Callable[[], None], tick: Callable[[], None],
) -> list[torch.Tensor]:  # fmt: skip
    """Run every layer on the calibration batches; save the inputs of layers `>= first_saved` to `spill`."""
    n_layers = len(stream.layers)
    for i in range(n_layers):
        if i >= first_saved:
            save_file(
                {str(b): h.to("cpu").contiguous() for b, h in enumerate(hidden)},
                str(spill / f"{i}.safetensors"),
            )
        # After the last layer, the backward pass starts again from it: prefetch it once more.
        layer = stream.load_layer(i, prefetch_next=min(i + 1, n_layers - 1))
        hidden = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
        stream.drop_layer(i)
        trim()
        tick()
    return hidden


def _head_gradients(
    stream: StreamedModel, hidden: list[torch.Tensor], ids: list[torch.Tensor], n_blocks: int
) -> list[torch.Tensor]:
    """Gradients of the mean next-token loss w.r.t. the last layer's output, batch by batch."""
    grads = []
    for h, x in zip(hidden, ids, strict=True):
        h = h.detach().requires_grad_()
        logits = stream.model.lm_head(stream.model.model.norm(h)).float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        # Weighted by the batch's share: the gradients sum to those of the mean over all blocks.
        (loss * x.shape[0] / n_blocks).backward()
        grads.append(h.grad)
    return grads


def _backward_scoring(
    stream: StreamedModel, layers: range, kwargs: list[dict], grads: list[torch.Tensor],
    scoring: tuple[str, str], spill: Path, trim: Callable[[], None], tick: Callable[[], None],
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Backpropagate from the top layer down to `layers.start`, scoring each layer in `layers` (on the CPU).

    `scoring` is (estimator, reduction); with a second-order estimator every batch is one block.
    """
    config, family = stream.config, stream.family
    estimator, reduction = scoring
    n_blocks = sum(g.shape[0] for g in grads)
    scores = {}
    for i in reversed(range(layers.start, len(stream.layers))):
        layer = stream.load_layer(i, prefetch_next=i - 1 if i > layers.start else None)
        scored = [lin.weight for lin in layer_linears(layer, family).values()] if i in layers else []
        for p in layer.parameters():
            p.requires_grad_(False)
        for p in scored:
            p.requires_grad_(True)
        acc_grad: dict[int, torch.Tensor] = {}
        hooks = _per_sample_square_hooks(scored, acc_grad, n_blocks) if estimator in SECOND_ORDER else []
        inputs = load_file(str(spill / f"{i}.safetensors"), device=str(stream.device))
        (spill / f"{i}.safetensors").unlink()
        below = i > layers.start  # the lowest scored layer passes no gradient down
        for b, (kw, g) in enumerate(zip(kwargs, grads, strict=True)):
            x = inputs.pop(str(b)).requires_grad_(below)
            torch.autograd.backward(layer_output(layer(x, **kw)), g)
            grads[b] = x.grad
            del x
        for hook in hooks:
            hook.remove()
        if i in layers:
            channel, heads = _layer_scores(layer, family, config, acc_grad, estimator, reduction)
            scores[i] = (channel.cpu(), heads.cpu())
        stream.drop_layer(i)
        trim()
        tick()
    return scores
