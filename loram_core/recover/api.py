"""`recover` (a pruned base's adapter -> the original's) and `merge` (an adapter into the original's weights)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from loram_core.errors import LoramError
from loram_core.models import build_model, family_of
from loram_core.recover.adapter import (
    WEIGHTS_FILE,
    Adapter,
    check_against,
    param_name,
    parse_key,
    read_adapter,
    write_adapter,
)
from loram_core.recover.base import original_config, original_name, read_base
from loram_core.recover.merge import merge_adapter, save_merged
from loram_core.recover.structured import grow_cols, grow_rows, kept_indices

Mode = Literal["auto", "zeroA", "normA", "dense", "mask", "complement"]
STRUCTURED_MODES = ("zeroA", "normA")
SPARSE_MODES = ("dense", "mask", "complement")


@dataclass
class Recovered:
    """What `recover` wrote."""

    out_dir: Path
    mode: str
    base_model: str  # the recovered adapter's base_model_name_or_path
    # Modules of the pruned layers: factors grown to the original widths (structured), or delta
    # masked and merged (sparse `mask` / `complement`).
    grown: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # modules passed through (or merged unmasked)
    merged: bool = False  # True: `out_dir` is a merged model checkpoint, not an adapter


def recover(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    mode: Mode = "auto",
    original: str | Path | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Recovered:
    """Recover a LoRA adapter trained on a pruned base for the original model.

    Structured bases (`random`, `structured`): a standard peft adapter for the original, its `B`
    grown with zero rows at pruned outputs (q/k/v, gate/up) and its `A` with columns at pruned
    inputs (o, down): zeros (`zeroA`, the default) or N(0, std 1/r) (`normA`). Sparse bases
    (`semi`, `unstructured`): `dense` writes the adapter unchanged (shapes are the original's);
    `mask` / `complement` write the original model with `scaling * B @ A * M` (or `* (1 - M)`)
    merged into each pruned weight (`M` the keep-mask; unpruned targets get the plain delta), as
    a full safetensors checkpoint in `dtype` (the masked deltas are not low-rank).

    Every tensor is checked against the pruned base before and the original model after recovery
    (shapes from a meta-device model, so nothing is loaded); the adapter's `adapter_config.json`
    names the original (`original`, else the source the base's manifest records).

    Args:
        base: a published version directory or URI, or a pruned checkpoint directory with `masks/`.
        adapter: a peft LoRA adapter directory trained on that base.
        out: the directory to write (created).
        mode: `auto` is `zeroA` for structured bases and `dense` for sparse ones.
        original: the original checkpoint directory (shape checks use its config; `mask` and
            `complement` need its weights) or its name (a hub id).
        seed: for `normA`'s draws.
        dtype: the merged checkpoint's dtype (`mask`, `complement`).

    Raises:
        LoramError: a file missing, a mode that does not fit the base, an adapter that does not fit
            the base (key, shape or rank), or an original that is not the base's.
    """
    pruned = read_base(base)
    lora = read_adapter(adapter)
    mode = ("zeroA" if pruned.structured else "dense") if mode == "auto" else mode
    allowed = STRUCTURED_MODES if pruned.structured else SPARSE_MODES
    if mode not in allowed:
        raise LoramError(
            f"mode {mode!r} does not apply to the base at {pruned.where!r}, which was pruned with "
            f"{pruned.masks.strategy!r}; use one of {list(allowed)}."
        )
    config = original_config(pruned, original)
    name = original_name(pruned, original)
    fix = f"Train the adapter on the base at {pruned.where!r}, or pass --base the one it was trained on."
    check_against(lora, build_model(pruned.config, "meta"), f"the pruned base at {pruned.where!r}", fix)
    out = Path(out)
    if mode in ("mask", "complement"):
        return _merge_masked(pruned, lora, config, name, original, out, mode, dtype)
    result = Recovered(out, mode, name)
    full = build_model(config, "meta")
    recovered = Adapter(copy.deepcopy(lora.config), dict(lora.tensors), lora.path)
    recovered.config["base_model_name_or_path"] = name
    if pruned.structured:
        kept = kept_indices(pruned.masks, config, pruned.config, family_of(config), pruned.where)
        _refuse_full_weights_of_pruned_modules(lora, kept)
        generator = torch.Generator().manual_seed(seed)
        for module, keys in lora.lora_modules().items():
            if module not in kept:
                result.unchanged.append(module)
                continue
            if "A" not in keys or "B" not in keys:
                raise LoramError(
                    f"{lora.path / WEIGHTS_FILE}: module {module!r} has only lora_{'/'.join(keys)}; the adapter "
                    "file is incomplete. Save the adapter again with `save_pretrained`."
                )
            fan_in, fan_out = full.get_submodule(module).in_features, full.get_submodule(module).out_features
            side, idx = kept[module]
            if side == "rows":
                for slot in ("B", "B.bias"):
                    if slot in keys:
                        recovered.tensors[keys[slot]] = grow_rows(lora.tensors[keys[slot]], idx, fan_out)
            else:
                recovered.tensors[keys["A"]] = grow_cols(
                    lora.tensors[keys["A"]], idx, fan_in, mode, generator
                )
            result.grown.append(module)
    else:
        result.unchanged = sorted(lora.lora_modules())
    check_against(recovered, full, "the original model",
                  "This is a bug in recovery; please report it with the base and adapter.")  # fmt: skip
    write_adapter(recovered, out)
    return result


def _refuse_full_weights_of_pruned_modules(lora: Adapter, kept: dict) -> None:
    for key in lora.tensors:
        if parse_key(key) is None and param_name(key).rpartition(".")[0] in kept:
            raise LoramError(
                f"{lora.path / WEIGHTS_FILE}: {key!r} is a full weight of a pruned module (modules_to_save); "
                "the rows or columns pruning removed were never trained, so it has no original-shaped "
                "counterpart. Train the adapter without modules_to_save on the pruned layers' linears."
            )


def _merge_masked(
    pruned, lora: Adapter, config, name: str, original, out: Path, mode: str, dtype: str
) -> Recovered:
    from loram_core.models import load_model

    if original is None or not (Path(original) / "config.json").is_file():
        raise LoramError(
            f"mode {mode!r} merges the masked delta into the original model's weights; pass --original the "
            "original checkpoint directory (config.json + *.safetensors)."
        )
    keep = pruned.masks.keep_masks()

    def factor(weight: str) -> torch.Tensor | None:
        m = keep.get(weight)
        if m is None:
            return None
        return m if mode == "mask" else ~m

    model = load_model(original, dtype=_dtype(dtype))
    merged = merge_adapter(model, lora, _dtype(dtype), factor)
    save_merged(model, out, original)
    return Recovered(out, mode, name, grown=[m for m in merged if f"{m}.weight" in keep],
                     unchanged=[m for m in merged if f"{m}.weight" not in keep], merged=True)  # fmt: skip


def merge(original: str | Path, adapter: str | Path, out: str | Path, dtype: str = "bfloat16") -> list[str]:
    """Merge a LoRA adapter for the original model into its weights and save a 16-bit checkpoint.

    `original` may be a 16/32-bit checkpoint or a bitsandbytes NF4 one (`quantization_config` in
    its config.json): 4-bit linears are dequantized to `dtype` and the delta added there, as
    QLoRA's users recommend, so the result is a plain `dtype` checkpoint in either case.

    Args:
        original: the original model's checkpoint directory.
        adapter: a peft LoRA adapter for it (e.g. what `recover` wrote).
        out: the directory to write the merged checkpoint (+ the original's tokenizer) into.
        dtype: `bfloat16`, `float16` or `float32`.

    Returns:
        The merged modules' names.

    Raises:
        LoramError: the adapter does not fit the original (key, shape or rank), or a file is missing.
    """
    from loram_core.models import load_config, load_model

    torch_dtype = _dtype(dtype)
    lora = read_adapter(adapter)
    config = load_config(original)
    if getattr(config, "loram", None):
        raise LoramError(
            f"{str(original)!r} is a pruned LoRAM base, not an original model; recover the adapter first "
            "(`loram recover`) and merge it into the original checkpoint."
        )
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        delattr(plain, "quantization_config")
    check_against(lora, build_model(plain, "meta"), f"the model at {str(original)!r}",
                  "Pass --adapter an adapter for this model (recover one trained on a pruned base first).")  # fmt: skip
    model = load_model(original, dtype=torch_dtype)
    merged = merge_adapter(model, lora, torch_dtype)
    save_merged(model, out, original)
    return merged


def _dtype(name: str) -> torch.dtype:
    if name not in ("bfloat16", "float16", "float32"):
        raise LoramError(f"dtype {name!r} is not one of bfloat16, float16, float32.")
    return getattr(torch, name)
