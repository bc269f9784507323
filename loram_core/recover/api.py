"""`recover` (a pruned base's adapter -> the original's) and `merge` (an adapter into the original's weights)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from loram_core.errors import LoramError
from loram_core.models import build_model, family_of
from loram_core.original import Original, resolve_original
from loram_core.recover.adapter import (
    WEIGHTS_FILE,
    Adapter,
    check_against,
    param_name,
    parse_key,
    read_adapter,
    write_adapter,
)
from loram_core.recover.base import original_config, read_base
from loram_core.recover.merge import merge_adapter, save_merged
from loram_core.recover.output import replacing
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
    original: str = ""  # where the original was found and how it was checked (for the CLI)


def recover(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    mode: Mode = "auto",
    original: str | Path | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    force: bool = False,
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
    (shapes from a meta-device model, so nothing is loaded). The adapter's `adapter_config.json`
    names the original (`original`, else the one the base's manifest records, found on this
    machine and checked by fingerprint: `loram_core.original`) and its stock class (`auto_mapping`),
    so `AutoPeftModelForCausalLM.from_pretrained(out)` loads it without remote code.

    Args:
        base: a published version directory or URI, or a pruned checkpoint directory with `masks/`.
        adapter: a peft LoRA adapter directory trained on that base.
        out: the directory to write (created).
        mode: `auto` is `zeroA` for structured bases and `dense` for sparse ones.
        original: the original checkpoint directory (shape checks use its config; `mask` and
            `complement` need its weights), a bucket URI of it, or a hub id; None: the manifest's.
        seed: for `normA`'s draws.
        dtype: the merged checkpoint's dtype (`mask`, `complement`).
        force: replace `out` if it exists (it is replaced only once the new one is complete).

    Raises:
        LoramError: a file missing, a mode that does not fit the base, an adapter that does not fit
            the base (key, shape or rank), an original that is not the base's or cannot be found,
            or an existing `out` without `force`; all before anything is written.
    """
    out = Path(out)
    with replacing(out, force) as tmp:
        return _recover(read_base(base), read_adapter(adapter), out, tmp, mode, original, seed, dtype)


def _recover(
    pruned, lora: Adapter, out: Path, tmp: Path, mode: Mode, original, seed: int, dtype: str
) -> Recovered:
    """`recover` once the base and adapter are read, writing into `tmp` (renamed to `out` after)."""
    mode = ("zeroA" if pruned.structured else "dense") if mode == "auto" else mode
    allowed = STRUCTURED_MODES if pruned.structured else SPARSE_MODES
    if mode not in allowed:
        raise LoramError(
            f"mode {mode!r} does not apply to the base at {pruned.where!r}, which was pruned with "
            f"{pruned.masks.strategy!r}; use one of {list(allowed)}."
        )
    fix = f"Train the adapter on the base at {pruned.where!r}, or pass --base the one it was trained on."
    check_against(lora, build_model(pruned.config, "meta"), f"the pruned base at {pruned.where!r}", fix)
    found = resolve_original(pruned.record, original, pruned.where, pruned.uri)
    config = original_config(pruned, found.path)
    if mode in ("mask", "complement"):
        return _merge_masked(pruned, lora, config, found, out, tmp, mode, dtype)
    result = Recovered(out, mode, found.name, original=found.how)
    full = build_model(config, "meta")
    recovered = Adapter(copy.deepcopy(lora.config), dict(lora.tensors), lora.path)
    _name_the_original(recovered.config, found, config)
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
    write_adapter(recovered, tmp)
    return result


def _name_the_original(adapter_config: dict, found: Original, config) -> None:
    """Point the adapter at the original: its path or hub id, its commit, and its stock class.

    peft records the class the adapter was trained on in `auto_mapping` when the config has no
    `task_type`; trained on a published base with remote code, that is `LoramLlamaForCausalLM` in
    `transformers_modules`, which `AutoPeftModelForCausalLM` refuses to import. The original is a
    stock model, so its stock class is named instead.
    """
    adapter_config["base_model_name_or_path"] = found.name
    if found.revision:
        adapter_config["revision"] = found.revision
    if adapter_config.get("task_type") is None or adapter_config.get("auto_mapping"):
        adapter_config["auto_mapping"] = stock_auto_mapping(config)


def stock_auto_mapping(config) -> dict[str, str]:
    """peft's `auto_mapping` for the stock causal-LM class of `config`'s model type.

    Raises:
        LoramError: transformers has no causal-LM class for the model type.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise LoramError(
            f"the original's model_type {config.model_type!r} has no causal-LM class in transformers "
            f"{transformers.__version__}; pass --original a LLaMA, Mistral or Qwen2 family checkpoint."
        )
    return {"base_model_class": name, "parent_library": getattr(transformers, name).__module__}


def _refuse_full_weights_of_pruned_modules(lora: Adapter, kept: dict) -> None:
    for key in lora.tensors:
        if parse_key(key) is None and param_name(key).rpartition(".")[0] in kept:
            raise LoramError(
                f"{lora.path / WEIGHTS_FILE}: {key!r} is a full weight of a pruned module (modules_to_save); "
                "the rows or columns pruning removed were never trained, so it has no original-shaped "
                "counterpart. Train the adapter without modules_to_save on the pruned layers' linears."
            )


def _merge_masked(
    pruned, lora: Adapter, config, found: Original, out: Path, tmp: Path, mode: str, dtype: str
) -> Recovered:
    from loram_core.models import load_model

    if found.path is None:
        raise LoramError(
            f"mode {mode!r} merges the masked delta into the original model's weights, and {found.how} is not on "
            "this machine; pass --original the original checkpoint directory (config.json + *.safetensors)."
        )
    original = found.path
    keep = pruned.masks.keep_masks()

    def factor(weight: str) -> torch.Tensor | None:
        m = keep.get(weight)
        if m is None:
            return None
        return m if mode == "mask" else ~m

    model = load_model(original, dtype=_dtype(dtype))
    merged = merge_adapter(model, lora, _dtype(dtype), factor)
    save_merged(model, tmp, original)
    return Recovered(out, mode, found.name, grown=[m for m in merged if f"{m}.weight" in keep],
                     unchanged=[m for m in merged if f"{m}.weight" not in keep], merged=True,
                     original=found.how)  # fmt: skip


def merge(
    original: str | Path | None,
    adapter: str | Path,
    out: str | Path,
    dtype: str = "bfloat16",
    force: bool = False,
) -> list[str]:
    """Merge a LoRA adapter for the original model into its weights and save a 16-bit checkpoint.

    `original` may be a 16/32-bit checkpoint or a bitsandbytes NF4 one (`quantization_config` in
    its config.json): 4-bit linears are dequantized to `dtype` and the delta added there, as
    QLoRA's users recommend, so the result is a plain `dtype` checkpoint in either case.

    Args:
        original: the original model's checkpoint directory; None: the one the adapter names
            (`base_model_name_or_path`: a directory, or a hub id in the local hub cache).
        adapter: a peft LoRA adapter for it (e.g. what `recover` wrote).
        out: the directory to write the merged checkpoint (+ the original's tokenizer) into.
        dtype: `bfloat16`, `float16` or `float32`.
        force: replace `out` if it exists (once the new one is complete).

    Returns:
        The merged modules' names.

    Raises:
        LoramError: the adapter does not fit the original (key, shape or rank), a file is missing,
            the original cannot be found, or `out` exists without `force`; before anything is written.
    """
    torch_dtype = _dtype(dtype)
    out = Path(out)
    with replacing(out, force) as tmp:
        lora = read_adapter(adapter)
        original_dir = _merge_original(original, lora)
        return _merge(original_dir, lora, tmp, torch_dtype)


def _merge_original(original: str | Path | None, lora: Adapter) -> Path:
    """The original checkpoint directory a merge reads: `original`, else the one the adapter names."""
    from loram_core.original import given_original

    hint = "An adapter trained on a pruned base needs `loram recover` first; merge what it writes."
    if original is not None:
        found = given_original(str(original), hint)
        what = f"--original {str(original)!r}"
    else:
        named = lora.config.get("base_model_name_or_path")
        if not named:
            raise LoramError(
                f"{lora.path / 'adapter_config.json'} names no base model (base_model_name_or_path); pass "
                "--original the original checkpoint directory."
            )
        try:
            revision = f"@{lora.config['revision']}" if lora.config.get("revision") else ""
            found = given_original(
                str(named) + revision if not Path(str(named)).is_dir() else str(named), hint
            )
        except LoramError as err:
            raise LoramError(
                f"the adapter names its base model {named!r} (adapter_config.json), which is not usable here: "
                f"{err} Pass --original the original checkpoint directory."
            ) from None
        what = f"the adapter's base model {named!r}"
    if found.path is None:
        raise LoramError(
            f"{what} is a hub id that is not in the local hub cache; download it first "
            f"(`hf download {found.name}`) or pass --original the checkpoint directory."
        )
    return found.path


def _merge(original: Path, lora: Adapter, out: Path, torch_dtype) -> list[str]:
    from loram_core.models import load_config, load_model

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
