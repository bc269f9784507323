"""The pruning-mask file, `masks/masks.safetensors` (format `loram-masks`, version 1).

Consumers read it without our code, so it stays simple:
- structured: `model.layers.{i}.mlp.kept_channels` and `model.layers.{i}.self_attn.kept_kv_heads`,
  sorted int32 indices into the original model;
- sparse: under each pruned weight's own name, the row-major flattened keep-mask (1 = kept) packed
  eight per byte with `numpy.packbits(..., bitorder="little")` as uint8; the metadata entry under
  the same name holds the weight's shape as `"rows,cols"`;
- sparse, also: metadata `layerwise` (`uniform` or `owl`) and `layer_ratios`, a JSON object of
  each pruned layer's ratio by layer index (`{"0": 0.68, ...}`): what OWL decided per layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loram_core.errors import LoramError

FORMAT = "loram-masks"
VERSION = "1"


@dataclass
class Masks:
    """Kept indices (structured) or keep-masks (sparse) of one pruned model."""

    strategy: str
    kept_channels: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> int indices
    kept_kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> int indices
    # weight name -> (packed keep-bits uint8, (rows, cols)): packed as soon as a layer is pruned, so a
    # streamed prune holds 1 bit per weight of the model, not a byte.
    sparse: dict[str, tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=dict)
    layerwise: str | None = None  # sparse: `uniform` or `owl`
    layer_ratios: dict[int, float] = field(default_factory=dict)  # sparse: layer -> its ratio

    def add_sparse(self, name: str, keep: torch.Tensor) -> None:
        """Record a bool keep-mask `[rows, cols]` for the weight `name`."""
        self.sparse[name] = (pack_mask(keep), (keep.shape[0], keep.shape[1]))

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Every sparse keep-mask unpacked to bool `[rows, cols]` (what alignment re-applies)."""
        return {name: unpack_mask(bits, shape) for name, (bits, shape) in self.sparse.items()}


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool `[rows, cols]` -> uint8 `[ceil(rows*cols/8)]`, little bit order."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8), bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_mask`."""
    bits = np.unpackbits(packed.numpy(), bitorder="little", count=shape[0] * shape[1])
    return torch.from_numpy(bits.astype(bool)).view(shape)


def save_masks(masks: Masks, path: str | Path) -> None:
    """Write `masks` to `path` in the `loram-masks` v1 format (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "version": VERSION, "strategy": masks.strategy}
    if masks.layerwise is not None:
        meta["layerwise"] = masks.layerwise
    if masks.layer_ratios:
        meta["layer_ratios"] = json.dumps({str(i): r for i, r in sorted(masks.layer_ratios.items())})
    for i, idx in masks.kept_channels.items():
        tensors[f"model.layers.{i}.mlp.kept_channels"] = idx.to(torch.int32).contiguous()
    for i, idx in masks.kept_kv_heads.items():
        tensors[f"model.layers.{i}.self_attn.kept_kv_heads"] = idx.to(torch.int32).contiguous()
    for name, (bits, (rows, cols)) in masks.sparse.items():
        tensors[name] = bits
        meta[name] = f"{rows},{cols}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load_masks(path: str | Path) -> Masks:
    """Read a mask file; raises `LoramError` if it is not a `loram-masks` v1 file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise LoramError(
                f"{str(path)!r} is not a {FORMAT} v{VERSION} file (metadata {meta.get('format')!r} "
                f"v{meta.get('version')!r}); it was not written by loram-provider."
            )
        masks = Masks(strategy=meta["strategy"], layerwise=meta.get("layerwise"))
        masks.layer_ratios = {int(i): r for i, r in json.loads(meta.get("layer_ratios", "{}")).items()}
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_tensor(name)
            layer = int(name.split(".")[2])
            if name.endswith(".mlp.kept_channels"):
                masks.kept_channels[layer] = t
            elif name.endswith(".self_attn.kept_kv_heads"):
                masks.kept_kv_heads[layer] = t
            else:
                rows, cols = (int(x) for x in meta[name].split(","))
                masks.sparse[name] = (t, (rows, cols))
    return masks
