"""Structured pruning: remove whole MLP channels and whole KV-head groups from decoder layers.

The coupled groups (LLM-Pruner's dependency groups, written out for the LLaMA layout):
- MLP channel `j`: row `j` of gate and up, column `j` of down;
- KV head `h` (GQA group size `g`): rows of head `h` in k and v (and their biases), rows of query
  heads `h*g .. h*g+g-1` in q (and bias), the same columns of o. Plain MHA is `g = 1`.

Two ways to choose what stays: `random` (seeded, LoRAM-Rand) and first-order Taylor importance
(`structured`, LoRAM-Stru): the salience of a weight is `|W * dL/dW|`, summed over its group.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loram_core.models import (
    Family,
    attention_shape,
    layer_linears,
    set_activation_checkpointing,
    set_layer_attributes,
)
from loram_core.prune.streaming import (
    StreamedModel,
    capture_layer_inputs,
    heap_returns_memory,
    layer_output,
    stream_layers,
)


def random_keep(n: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """`keep` of `n` indices, chosen uniformly with `generator`, sorted (int64)."""
    return torch.randperm(n, generator=generator)[:keep].sort().values


def top_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, sorted (int64)."""
    return torch.topk(scores, keep).indices.sort().values


def salience(
    weight: torch.Tensor, grad: torch.Tensor, grad_sq: torch.Tensor | None, estimator: str
) -> torch.Tensor:
    """Per-weight Taylor salience (LLM-Pruner's estimators).

    Args:
        weight, grad: same shape; `grad` is dL/dW summed over calibration batches.
        grad_sq: sum over batches of the squared batch gradient (Fisher diagonal), for second order.
        estimator: `param_first` |W g|, `vector` W g (signed; the group sum is taken before abs),
            `param_second` |W h W| / 2, `param_mix` first + second.
    """
    w, g = weight.float(), grad.float()
    if estimator == "vector":
        return w * g
    first = (w * g).abs()
    if estimator == "param_first":
        return first
    second = (w * grad_sq.float() * w).abs() / 2
    return second if estimator == "param_second" else first + second


def group_scores(sal: dict[str, torch.Tensor], config) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-weight salience over coupled groups.

    Args:
        sal: salience by short module name (q, k, v, o, gate, up, down), each shaped like the
            weight `[out, in]`; optional `q_bias`, `k_bias`, `v_bias` shaped `[out]`.

    Returns:
        (channel scores `[intermediate]`, KV-head scores `[n_kv]`), float32, non-negative.
    """
    kv, group, hd = attention_shape(config)
    channel = sal["gate"].sum(1) + sal["up"].sum(1) + sal["down"].sum(0)
    q_rows = sal["q"].sum(1) + (sal.get("q_bias", 0))
    k_rows = sal["k"].sum(1) + (sal.get("k_bias", 0))
    v_rows = sal["v"].sum(1) + (sal.get("v_bias", 0))
    o_cols = sal["o"].sum(0)
    per_kv = (k_rows + v_rows).view(kv, hd).sum(1)
    per_q = (q_rows + o_cols).view(kv, group * hd).sum(1)
    return channel.abs(), (per_kv + per_q).abs()


def kept_query_rows(kept_kv_heads: torch.Tensor, group: int, hd: int) -> torch.Tensor:
    """Row indices of q (= column indices of o) that belong to the kept KV heads' query groups."""
    device = kept_kv_heads.device
    heads = (kept_kv_heads[:, None] * group + torch.arange(group, device=device)).flatten()
    return (heads[:, None] * hd + torch.arange(hd, device=device)).flatten()


def _slice_linear(
    lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    w = lin.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data[rows] if rows is not None else lin.bias.data)
    return new


def apply_structured(
    layer: nn.Module, family: Family, config, kept_channels: torch.Tensor, kept_kv_heads: torch.Tensor
) -> None:
    """Cut a decoder layer down to the kept MLP channels and KV heads (in place).

    Args:
        layer: one decoder layer of the original widths.
        kept_channels: sorted int indices into the MLP's intermediate dimension.
        kept_kv_heads: sorted int indices into the KV heads.
    """
    kv, group, hd = attention_shape(config)
    lin = layer_linears(layer, family)
    kept_kv_heads = kept_kv_heads.to(lin["q"].weight.device)
    kept_channels = kept_channels.to(lin["q"].weight.device)
    kv_rows = (kept_kv_heads[:, None] * hd + torch.arange(hd, device=kept_kv_heads.device)).flatten()
    q_rows = kept_query_rows(kept_kv_heads, group, hd)
    new = {
        "q": _slice_linear(lin["q"], rows=q_rows),
        "k": _slice_linear(lin["k"], rows=kv_rows),
        "v": _slice_linear(lin["v"], rows=kv_rows),
        "o": _slice_linear(lin["o"], cols=q_rows),
        "gate": _slice_linear(lin["gate"], rows=kept_channels),
        "up": _slice_linear(lin["up"], rows=kept_channels),
        "down": _slice_linear(lin["down"], cols=kept_channels),
    }
    for name, module in new.items():
        parent, _, attr = getattr(family, name).rpartition(".")
        setattr(layer.get_submodule(parent), attr, module)
    n_kv = len(kept_kv_heads)
    set_layer_attributes(
        layer, family, {"intermediate": len(kept_channels), "heads": n_kv * group, "kv_heads": n_kv}
    )


def _square_hooks(params: list[nn.Parameter], grad_sq: dict[int, torch.Tensor]) -> list:
    """Hooks summing each batch's own squared gradient (before accumulation) into `grad_sq`."""
    hooks = []
    for p in params:

        def add_square(g: torch.Tensor, key: int = id(p)) -> None:
            grad_sq[key] = grad_sq.get(key, 0) + g.detach().float() ** 2

        hooks.append(p.register_hook(add_square))
    return hooks


def _layer_scores(layer: nn.Module, family: Family, config, grad_sq: dict, estimator: str):
    """Group scores of one decoder layer from its linears' accumulated `.grad`."""
    sal = {}
    for name, module in layer_linears(layer, family).items():
        for kind, p in (("", module.weight), ("_bias", module.bias)):
            if p is not None:
                sal[name + kind] = salience(p.detach(), p.grad, grad_sq.get(id(p)), estimator)
    return group_scores(sal, config)


def taylor_group_scores(
    model: nn.Module,
    layers: range,
    calib: torch.Tensor,
    estimator: str,
    batch_size: int = 4,
    gradient_checkpointing: bool = False,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Accumulate gradients of the LM loss over calibration blocks; score every pruned layer's groups.

    Memory beyond the weights: one gradient per scored linear (accumulated in place by autograd
    over the batches, as LLM-Pruner's single large backward would) and, for the second-order
    estimators, one running sum of squared batch gradients. Nothing else in the model gets a
    gradient. The model may be dispatched over several devices with accelerate's `device_map`
    (not offloaded: see `prune_structured`); inputs go to the device of the embeddings.

    Args:
        model: the original model (the loss is the plain next-token loss).
        layers: indices of the layers to score.
        calib: int `[n, seq_len]` calibration blocks.
        estimator: see `salience`.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).

    Returns:
        layer -> (channel scores `[I]`, KV-head scores `[n_kv]`).
    """
    from loram_core.models import decoder_layers, family_of

    family = family_of(model.config)
    scored = [p for i in layers for lin in layer_linears(decoder_layers(model)[i], family).values()
              for p in lin.parameters()]  # fmt: skip
    wanted = {id(p) for p in scored}
    previous = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)  # no gradient (or its memory) for what is not scored
    grad_sq: dict[int, torch.Tensor] = {}
    hooks = _square_hooks(scored, grad_sq) if estimator in ("param_second", "param_mix") else []
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
        i: _layer_scores(decoder_layers(model)[i], family, model.config, grad_sq, estimator) for i in layers
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
    one backward, as with gradient checkpointing. Scores come back on the CPU.
    """
    device = torch.device(device)
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
            return _backward_scoring(stream, layers, kwargs, grads, estimator, spill_dir, trim, tick)
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
    stream: StreamedModel, layers: range, kwargs: list[dict], grads: list[torch.Tensor], estimator: str,
    spill: Path, trim: Callable[[], None], tick: Callable[[], None],
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Backpropagate from the top layer down to `layers.start`, scoring each layer in `layers` (on the CPU)."""
    config, family = stream.config, stream.family
    scores = {}
    for i in reversed(range(layers.start, len(stream.layers))):
        layer = stream.load_layer(i, prefetch_next=i - 1 if i > layers.start else None)
        scored = (
            [p for lin in layer_linears(layer, family).values() for p in lin.parameters()]
            if i in layers
            else []
        )
        for p in layer.parameters():
            p.requires_grad_(False)
        for p in scored:
            p.requires_grad_(True)
        grad_sq: dict[int, torch.Tensor] = {}
        hooks = _square_hooks(scored, grad_sq) if estimator in ("param_second", "param_mix") else []
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
            channel, heads = _layer_scores(layer, family, config, grad_sq, estimator)
            scores[i] = (channel.cpu(), heads.cpu())
        stream.drop_layer(i)
        trim()
        tick()
    return scores


def prune_structured(
    base_dir: Path,
    out_dir: Path,
    cfg,
    calib: torch.Tensor,
    progress=None,
    device: torch.device | str = "cpu",
):
    """`random` and `structured` strategies: choose the kept groups, then cut the layers, streamed.

    `random` needs only shapes. `structured` scores with Taylor importance: streamed one layer at
    a time through `device` by default (`taylor_group_scores_streamed`), or, with
    `prune.device_map`, on the whole model placed by accelerate (several GPUs). Either way the cut
    streams the checkpoint through `device`.
    """
    from loram_core.device import default_dtype
    from loram_core.models import load_config
    from loram_core.prune.masks import Masks
    from loram_core.prune.plan import structured_config

    config = load_config(base_dir)
    device = torch.device(device)
    dtype = default_dtype(device, cfg.dtype)
    layers = range(*cfg.layer_range(config.num_hidden_layers))
    # Streamed Taylor reports its forward steps and backward steps, then the cut one per layer.
    scoring = (
        2 * config.num_hidden_layers - layers.start
        if cfg.strategy == "structured" and not cfg.device_map
        else 0
    )
    if cfg.strategy == "random":
        kept = _random_kept(config, layers, cfg)
    else:
        scores = _taylor_scores(base_dir, layers, calib[: cfg.calib_samples], cfg, dtype, device,
                                _offset(progress, 0, scoring, config))  # fmt: skip
        kept = _top_kept(config, scores, cfg)
    masks = Masks(strategy=cfg.strategy)
    for i, (channels, heads) in kept.items():
        masks.kept_channels[i], masks.kept_kv_heads[i] = channels, heads
    cut_progress = _offset(progress, scoring, scoring, config) if scoring else progress
    written = _cut_streamed(base_dir, out_dir, config, kept, dtype, cut_progress, device)
    structured_config(written, cfg).save_pretrained(out_dir)
    return masks


def _random_kept(config, layers: range, cfg) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """LoRAM-Rand: per pruned layer, a seeded uniform choice of the channels and KV heads that stay."""
    from loram_core.prune.plan import pruned_layer_widths

    target = pruned_layer_widths(config, cfg.ratio)
    kv, _, _ = attention_shape(config)
    generator = torch.Generator().manual_seed(cfg.seed)
    return {
        i: (random_keep(config.intermediate_size, target["intermediate"], generator),
            random_keep(kv, target["kv_heads"], generator))
        for i in layers
    }  # fmt: skip


def _top_kept(config, scores: dict, cfg) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """LoRAM-Stru: per pruned layer, the highest-scoring channels and KV heads stay."""
    from loram_core.prune.plan import pruned_layer_widths

    target = pruned_layer_widths(config, cfg.ratio)
    return {
        i: (top_keep(channel, target["intermediate"]), top_keep(heads, target["kv_heads"]))
        for i, (channel, heads) in scores.items()
    }


def _taylor_scores(base_dir: Path, layers: range, calib: torch.Tensor, cfg, dtype: torch.dtype,
                   device: torch.device, progress) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Group scores of every pruned layer: streamed through `device`, or whole-model with `device_map`."""
    if cfg.device_map:
        return _whole_model_scores(base_dir, layers, calib, cfg, dtype)
    return taylor_group_scores_streamed(
        base_dir, layers, calib, cfg.importance, dtype, progress=progress, device=device
    )


def _offset(progress, before: int, scoring: int, config):
    """One phase's progress as steps of the whole prune: `scoring` steps, then one per layer cut."""
    if progress is None:
        return None
    total = scoring + config.num_hidden_layers
    return lambda what, done, _total: progress(what, before + done, total)


def _whole_model_scores(base_dir, layers: range, calib: torch.Tensor, cfg, dtype: torch.dtype):
    from loram_core.errors import ConfigError
    from loram_core.models import load_model

    model = load_model(base_dir, dtype=dtype, device_map=cfg.device_map)
    if any(p.device.type == "meta" for p in model.parameters()):  # accelerate's offloaded weights
        raise ConfigError(
            f"prune.device_map={cfg.device_map!r} offloads part of the model to CPU or disk, where "
            "accelerate drops the weights' gradients, so Taylor scores cannot be computed there. Leave "
            "prune.device_map unset to score one layer at a time (streamed, no whole-model memory), or "
            "give it devices that hold the whole model."
        )
    scores = taylor_group_scores(
        model, layers, calib, cfg.importance, gradient_checkpointing=cfg.gradient_checkpointing
    )
    return {i: (channel.cpu(), heads.cpu()) for i, (channel, heads) in scores.items()}


def _cut_streamed(base_dir, out_dir, config, kept: dict, dtype: torch.dtype, progress=None, device="cpu"):
    """Write the checkpoint with `kept[i] = (channels, kv_heads)` of layer `i`, one layer at a time."""
    from loram_core.models import family_of

    family = family_of(config)

    def process(i: int, layer: nn.Module) -> None:
        if i in kept:
            apply_structured(layer, family, config, *kept[i])

    return stream_layers(base_dir, out_dir, process, progress=progress, dtype=dtype, device=device)
