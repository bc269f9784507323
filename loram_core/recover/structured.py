"""Structured recovery: grow the LoRA factors of pruned linears back to the original widths.

A pruned linear lost rows (its output: q/k/v, gate/up) or columns (its input: o, down). With
`delta = B @ A` (`B [out, r]`, `A [r, in]`), rows of the delta are rows of `B` and columns are
columns of `A`, so `B` gets zero rows at pruned outputs and `A` gets columns at pruned inputs:
zeros (`zeroA`: the recovered delta is the trained one on kept rows/columns and exactly zero
elsewhere) or, as the LoRAM reference scripts do for `normA`, draws from N(0, std = 1/r).
"""

from __future__ import annotations

import torch

from loram_core.errors import LoramError
from loram_core.models import Family, attention_shape
from loram_core.prune.masks import Masks
from loram_core.prune.structured import kept_query_rows

# Which side of each linear pruning cut: "rows" (the output, LoRA B) or "cols" (the input, LoRA A).
CUT_SIDE = {"q": "rows", "k": "rows", "v": "rows", "o": "cols", "gate": "rows", "up": "rows", "down": "cols"}


def kept_indices(
    masks: Masks, config, pruned_config, family: Family, where: str
) -> dict[str, tuple[str, torch.Tensor]]:
    """Module path -> (side, kept indices into the original rows or cols) of each pruned linear.

    Args:
        masks: structured masks (`kept_channels`, `kept_kv_heads` per pruned layer).
        config: the original model's config (its GQA layout gives the q/o rows of each KV head).
        pruned_config: the pruned base's config; its `loram` widths must agree with the masks.

    Returns:
        e.g. `model.layers.3.self_attn.q_proj` -> ("rows", int64 `[kept q rows]`); the side is
        `CUT_SIDE`'s: "rows" for the output (LoRA B), "cols" for the input (LoRA A).

    Raises:
        LoramError: the masks do not describe this base (a layer missing, widths or indices off).
    """
    kv, group, hd = attention_shape(config)
    loram = pruned_config.loram
    pruned_layers = sorted(set(masks.kept_channels) | set(masks.kept_kv_heads))
    missing = [
        i
        for i in loram.get("pruned_layers", [])
        if i not in masks.kept_channels or i not in masks.kept_kv_heads
    ]
    if missing:
        raise LoramError(
            f"the masks of the base at {where!r} lack layers {missing} that its config.json lists as pruned; "
            "masks/masks.safetensors is incomplete or from another base. Use the masks published with it."
        )
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for i in pruned_layers:
        channels, heads = masks.kept_channels[i].long(), masks.kept_kv_heads[i].long()
        _check(
            channels,
            config.intermediate_size,
            loram["intermediate_sizes"][i],
            f"layer {i} MLP channels",
            where,
        )
        _check(heads, kv, loram["num_key_value_heads_per_layer"][i], f"layer {i} KV heads", where)
        q_rows = kept_query_rows(heads, group, hd)
        kv_rows = kept_query_rows(heads, 1, hd)  # a KV head's rows: its group of one
        rows = {
            "q": q_rows,
            "k": kv_rows,
            "v": kv_rows,
            "o": q_rows,
            "gate": channels,
            "up": channels,
            "down": channels,
        }
        for name, idx in rows.items():
            out[f"{family.layers}.{i}.{getattr(family, name)}"] = (CUT_SIDE[name], idx)
    return out


def _check(idx: torch.Tensor, full: int, width: int, what: str, where: str) -> None:
    ok = len(idx) == width and (len(idx) == 0 or (int(idx.min()) >= 0 and int(idx.max()) < full))
    if not ok or (len(idx) > 1 and not bool(torch.all(idx[1:] > idx[:-1]))):
        raise LoramError(
            f"the masks of the base at {where!r} keep {len(idx)} {what} (of {full}), but its config.json says "
            f"{width} (or the indices are not sorted and in range); the masks belong to another base. Use the "
            "masks published with it."
        )


def grow_rows(b: torch.Tensor, kept: torch.Tensor, full: int) -> torch.Tensor:
    """`B [kept, r]` -> `[full, r]`: the trained rows at `kept`, zeros elsewhere (same dtype)."""
    out = b.new_zeros((full, *b.shape[1:]))
    out[kept] = b
    return out


def grow_cols(
    a: torch.Tensor, kept: torch.Tensor, full: int, fill: str, generator: torch.Generator
) -> torch.Tensor:
    """`A [r, kept]` -> `[r, full]`: the trained columns at `kept`; zeros (`zeroA`) or N(0, 1/r²) (`normA`) elsewhere."""
    r = a.shape[0]
    if fill == "normA":
        out = (
            torch.empty((r, full), dtype=torch.float32).normal_(0.0, 1.0 / r, generator=generator).to(a.dtype)
        )
    else:
        out = a.new_zeros((r, full))
    out[:, kept] = a
    return out
