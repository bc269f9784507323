"""Structured pruning: remove whole MLP channels and whole KV-head groups from decoder layers.

The coupled groups (LLM-Pruner's dependency groups, written out for the LLaMA layout):
- MLP channel `j`: row `j` of gate and up, column `j` of down;
- KV head `h` (GQA group size `g`): rows of head `h` in k and v (and their biases), rows of query
  heads `h*g .. h*g+g-1` in q (and bias), the same columns of o. Plain MHA is `g = 1`.

Two ways to choose what stays: `random` (seeded, LoRAM-Rand) and first-order Taylor importance
(`structured`, LoRAM-Stru): the salience of a weight is `|W * dL/dW|`, summed over its group.
"""

from __future__ import annotations

import torch
from torch import nn

from loram_core.models import Family, layer_linears, set_activation_checkpointing, set_layer_attributes


def _gqa(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv, heads // kv, hd


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
    kv, group, hd = _gqa(config)
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
    heads = (kept_kv_heads[:, None] * group + torch.arange(group)).flatten()
    return (heads[:, None] * hd + torch.arange(hd)).flatten()


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
    kv, group, hd = _gqa(config)
    lin = layer_linears(layer, family)
    kv_rows = (kept_kv_heads[:, None] * hd + torch.arange(hd)).flatten()
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
    gradient. The model may be dispatched over several devices or offloaded with accelerate's
    `device_map`; inputs go to the device of the embeddings.

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
    hooks = []
    if estimator in ("param_second", "param_mix"):
        for p in scored:  # the hook sees each batch's own gradient, before accumulation

            def add_square(g: torch.Tensor, key: int = id(p)) -> None:
                grad_sq[key] = grad_sq.get(key, 0) + g.detach().float() ** 2

            hooks.append(p.register_hook(add_square))
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
    scores = {}
    for i in layers:
        sal = {}
        for name, module in layer_linears(decoder_layers(model)[i], family).items():
            for kind, p in (("", module.weight), ("_bias", module.bias)):
                if p is not None:
                    sal[name + kind] = salience(p.detach(), p.grad, grad_sq.get(id(p)), estimator)
        scores[i] = group_scores(sal, model.config)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(previous[id(p)])
    return scores


def prune_structured(base_dir, out_dir, cfg, calib: torch.Tensor, progress=None):
    """`random` and `structured` strategies: choose kept groups, cut the layers, save.

    `random` streams the checkpoint one layer at a time (it only needs shapes); `structured` loads
    the whole model, because Taylor importance needs the loss gradient through every layer.
    """
    from loram_core.models import decoder_layers, family_of, load_model
    from loram_core.prune.masks import Masks
    from loram_core.prune.plan import pruned_layer_widths, structured_config

    if cfg.strategy == "random":
        return _prune_random_streamed(base_dir, out_dir, cfg, progress)

    # Taylor needs a backward through the whole model: accelerate may place (or offload) it.
    placement = {"device_map": cfg.device_map} if cfg.device_map else {}
    model = load_model(base_dir, dtype=getattr(torch, cfg.dtype), **placement)
    config = model.config
    family = family_of(config)
    start, stop = cfg.layer_range(config.num_hidden_layers)
    target = pruned_layer_widths(config, cfg.ratio)
    layers = range(start, stop)
    scores = taylor_group_scores(
        model,
        layers,
        calib[: cfg.calib_samples],
        cfg.importance,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    masks = Masks(strategy=cfg.strategy)
    for n, i in enumerate(layers):
        channels = top_keep(scores[i][0], target["intermediate"])
        heads = top_keep(scores[i][1], target["kv_heads"])
        with torch.no_grad():
            apply_structured(decoder_layers(model)[i], family, config, channels, heads)
        masks.kept_channels[i], masks.kept_kv_heads[i] = channels, heads
        if progress is not None:
            progress("prune", n + 1, len(layers))
    model.config = structured_config(config, cfg)
    model.save_pretrained(out_dir)
    return masks


@torch.no_grad()
def _prune_random_streamed(base_dir, out_dir, cfg, progress=None):
    from loram_core.models import family_of, load_config
    from loram_core.prune.masks import Masks
    from loram_core.prune.plan import pruned_layer_widths, structured_config
    from loram_core.prune.sequential import stream_layers

    config = load_config(base_dir)
    family = family_of(config)
    start, stop = cfg.layer_range(config.num_hidden_layers)
    target = pruned_layer_widths(config, cfg.ratio)
    kv, _, _ = _gqa(config)
    generator = torch.Generator().manual_seed(cfg.seed)
    masks = Masks(strategy=cfg.strategy)

    def process(i: int, layer: nn.Module) -> None:
        if start <= i < stop:  # the same draws, in the same order, as selecting on a loaded model
            channels = random_keep(config.intermediate_size, target["intermediate"], generator)
            heads = random_keep(kv, target["kv_heads"], generator)
            apply_structured(layer, family, config, channels, heads)
            masks.kept_channels[i], masks.kept_kv_heads[i] = channels, heads

    stream_layers(base_dir, out_dir, process, progress=progress)
    structured_config(config, cfg).save_pretrained(out_dir)
    return masks
