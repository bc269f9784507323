"""Structured pruning: remove whole MLP channels and whole KV-head groups from decoder layers.

The coupled groups (LLM-Pruner's dependency groups, written out for the LLaMA layout):
- MLP channel `j`: row `j` of gate and up, column `j` of down;
- KV head `h` (GQA group size `g`): rows of head `h` in k and v (and their biases), rows of query
  heads `h*g .. h*g+g-1` in q (and bias), the same columns of o. Plain MHA is `g = 1`.

Two ways to choose what stays: `random` (seeded, LoRAM-Rand) and Taylor importance (`structured`,
LoRAM-Stru) with LLM-Pruner's estimators (`loram_core.prune.taylor`; the default, `param_first`
with `sum`, is `|W * dL/dW|` summed over each coupled group).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loram_core.models import Family, attention_shape, layer_linears, set_layer_attributes
from loram_core.prune.streaming import stream_layers
from loram_core.prune.taylor import taylor_group_scores, taylor_group_scores_streamed


def random_keep(n: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """`keep` of `n` indices, chosen uniformly with `generator`, sorted (int64)."""
    return torch.randperm(n, generator=generator)[:keep].sort().values


def top_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, sorted (int64)."""
    return torch.topk(scores, keep).indices.sort().values


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

    target = pruned_layer_widths(config, cfg.ratio, cfg.round_to)
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

    target = pruned_layer_widths(config, cfg.ratio, cfg.round_to)
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
        base_dir, layers, calib, cfg.importance, dtype, progress=progress, device=device,
        reduction=cfg.group_reduction,
    )  # fmt: skip


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
        model, layers, calib, cfg.importance, gradient_checkpointing=cfg.gradient_checkpointing,
        reduction=cfg.group_reduction,
    )  # fmt: skip
    return {i: (channel.cpu(), heads.cpu()) for i, (channel, heads) in scores.items()}


def _cut_streamed(base_dir, out_dir, config, kept: dict, dtype: torch.dtype, progress=None, device="cpu"):
    """Write the checkpoint with `kept[i] = (channels, kv_heads)` of layer `i`, one layer at a time."""
    from loram_core.models import family_of

    family = family_of(config)

    def process(i: int, layer: nn.Module) -> None:
        if i in kept:
            apply_structured(layer, family, config, *kept[i])

    return stream_layers(base_dir, out_dir, process, progress=progress, dtype=dtype, device=device)
