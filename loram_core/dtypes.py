"""The dtype a published checkpoint is written in, and writing a checkpoint in it.

Alignment trains float32 master weights and the prune step may compute in float32 too, but what a
consumer downloads and loads is 16-bit: the base's own dtype when that is bfloat16 or float16, else
bfloat16 (`publish.dtype` overrides; float32 is allowed). The prune step writes its checkpoint in
that dtype and alignment saves its model in it, so the perplexities the run reports are those of
the files as published, and their sizes are those of the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

SETTINGS = ("auto", "bfloat16", "float16", "float32")
SIXTEEN_BIT = ("bfloat16", "float16")


def config_dtype(config: Any) -> str | None:
    """The dtype a transformers config (or its `config.json` dict) declares, as a name (`"bfloat16"`).

    Reads `dtype` (transformers 5) or the older `torch_dtype`; None when neither is set.
    """
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    value = get("dtype") or get("torch_dtype")
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def published_dtype(base_config: Any, setting: str = "auto") -> torch.dtype:
    """The dtype published weights are stored in.

    Args:
        base_config: the original model's config (a transformers config or a `config.json` dict).
        setting: `publish.dtype`: `auto`, `bfloat16`, `float16` or `float32`.

    Returns:
        `setting` when it names a dtype; for `auto` the base's dtype if it is bfloat16 or float16,
        else bfloat16 (a float32 base, or one that declares none).
    """
    import torch

    if setting not in SETTINGS:
        raise ValueError(f"publish.dtype={setting!r}: expected one of {', '.join(SETTINGS)}")
    if setting != "auto":
        return getattr(torch, setting)
    base = config_dtype(base_config)
    return getattr(torch, base) if base in SIXTEEN_BIT else torch.bfloat16


def save_pretrained_as(model: nn.Module, out_dir: str | Path, dtype: torch.dtype, **kwargs: Any) -> None:
    """`model.save_pretrained(out_dir)` with its floating-point weights in `dtype`.

    The model is cast in place (it is about to be discarded: no second copy in memory), and
    `config.json` declares `dtype`, so `from_pretrained(..., dtype="auto")` loads what is stored.

    Args:
        model: a transformers `PreTrainedModel` (on any device; the weights are saved from the CPU).
        out_dir: the directory to write.
        dtype: the weights' dtype in the files.
        kwargs: passed to `save_pretrained` (e.g. `max_shard_size`).
    """
    model.to(device="cpu", dtype=dtype)
    model.save_pretrained(out_dir, **kwargs)
    _declare(Path(out_dir), dtype)


def cast_checkpoint(model_dir: str | Path, dtype: torch.dtype) -> bool:
    """Rewrite a saved checkpoint's floating-point tensors in `dtype`, one safetensors file at a time.

    Integer tensors and each file's metadata are kept; `config.json` is made to declare `dtype`.
    Peak memory is one file's tensors (a streamed checkpoint has one file per decoder layer).

    Args:
        model_dir: a directory of `*.safetensors` files and `config.json`.
        dtype: the target dtype.

    Returns:
        Whether any tensor changed dtype.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed, total = False, 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            metadata = fh.metadata()
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - no iteration
        cast = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
        total += sum(t.numel() * t.element_size() for t in cast.values())
        if any(cast[n].dtype != t.dtype for n, t in tensors.items()):
            changed = True
            del tensors
            part = file.with_name(file.name + ".part")
            save_file(cast, str(part), metadata=metadata)
            os.replace(part, file)
    index = Path(model_dir) / "model.safetensors.index.json"
    if changed and index.is_file():  # the standard index states the tensors' total size
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _declare(Path(model_dir), dtype)
    return changed


def _declare(model_dir: Path, dtype: torch.dtype) -> None:
    """Make `config.json` state the weights' dtype (`dtype`, and `torch_dtype` where an older writer put it)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    updated = {**config, "dtype": name, **({"torch_dtype": name} if "torch_dtype" in config else {})}
    if updated != config:
        path.write_text(json.dumps(updated, indent=2, sort_keys=True) + "\n")
