"""Merging a LoRA adapter into the original model's weights: `W + scaling * B @ A`, optionally masked.

The sparse recovery modes need it (`mask`: the delta restricted to the kept weights of each pruned
matrix, `complement`: to the pruned ones; neither is low-rank, so the result is merged weights),
and so does `loram merge`. A 4-bit (bitsandbytes NF4) model is dequantized and the delta added in
16 bits, as QLoRA's users recommend: merging into 4-bit weights would requantize the sum.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from loram_core.errors import LoramError
from loram_core.recover.adapter import Adapter

MaskFn = Callable[[str], torch.Tensor | None]  # weight name -> float/bool `[out, in]` factor, or None


def lora_delta(adapter: Adapter, module: str, keys: dict[str, str], embedding: bool) -> torch.Tensor:
    """`scaling * B @ A` of one targeted module, float32, shaped like the module's weight.

    Args:
        keys: the module's slots from `Adapter.lora_modules()` (`A`, `B`, optionally `B.bias`).
        embedding: peft's embedding LoRA (`A [r, vocab]`, `B [dim, r]`): the delta is transposed
            to the embedding's `[vocab, dim]`.

    Returns:
        float32 `[out, in]` (`[vocab, dim]` for an embedding).
    """
    if "A" not in keys or "B" not in keys:
        raise LoramError(
            f"{adapter.path}: module {module!r} has only lora_{''.join(keys)}; the adapter file is incomplete."
        )
    a, b = adapter.tensors[keys["A"]].float(), adapter.tensors[keys["B"]].float()
    delta = (b @ a) * adapter.scaling(module)
    return delta.T if embedding else delta


def dequantized(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A 16-bit `nn.Linear` with the dequantized weights of a bitsandbytes 4-bit linear (others as is)."""
    weight = module.weight
    if not hasattr(weight, "quant_state"):
        return module
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
    new.weight.data.copy_(w.reshape(module.out_features, module.in_features))
    if module.bias is not None:
        new.bias.data.copy_(module.bias.data.to(dtype))
    return new


@torch.no_grad()
def merge_adapter(
    model: nn.Module, adapter: Adapter, dtype: torch.dtype, mask: MaskFn | None = None
) -> list[str]:
    """Add every LoRA delta of `adapter` to `model`'s weights in place; 4-bit linears become 16-bit.

    Full weights in the adapter file (`modules_to_save`, the embedding copies peft saves) replace
    the model's first, as loading the adapter in peft would.

    Args:
        model: the original model (16-bit, 32-bit or bitsandbytes 4-bit).
        dtype: the dtype of the dequantized linears (others keep theirs).
        mask: for a weight name, a `[out, in]` factor for its delta (`M` or `1 - M`), or None for
            the plain delta.

    Returns:
        The names of the merged modules.
    """
    from loram_core.recover.adapter import param_name, parse_key

    merged = []
    embeddings = {parse_key(k).module for k in adapter.tensors if parse_key(k) and parse_key(k).embedding}
    for name, module in list(model.named_modules()):  # every 4-bit linear, targeted or not, to 16 bits
        new = dequantized(module, dtype) if hasattr(getattr(module, "weight", None), "quant_state") else None
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    params = dict(model.named_parameters())
    for key, tensor in adapter.tensors.items():  # full weights (modules_to_save, peft's embedding copies)
        if parse_key(key) is None:
            target = params[param_name(key)]
            target.data.copy_(tensor.to(target.dtype))
    for name, keys in adapter.lora_modules().items():
        module = model.get_submodule(name)
        delta = lora_delta(adapter, name, keys, name in embeddings)
        factor = mask(f"{name}.weight") if mask is not None else None
        if factor is not None:
            delta = delta * factor.to(delta.dtype)
        module.weight.data.copy_((module.weight.data.float() + delta).to(module.weight.dtype))
        if "B.bias" in keys:  # lora_bias: peft merges scaling * B.bias into the base bias
            if module.bias is None:
                raise LoramError(
                    f"{adapter.path}: {name!r} has a LoRA bias but the model's module has no bias."
                )
            bias = adapter.tensors[keys["B.bias"]].float() * adapter.scaling(name)
            module.bias.data.copy_((module.bias.data.float() + bias).to(module.bias.dtype))
        merged.append(name)
    return merged


def save_merged(model: nn.Module, out_dir: str | Path, source_dir: str | Path | None = None) -> None:
    """Save a merged model as a plain (unquantized) safetensors checkpoint, with the source's tokenizer."""
    from loram_core.models import build_model

    config = model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    plain = build_model(config, "meta")
    plain.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LoramError(
            f"merged model lacks {missing[:5]}; the original checkpoint at {source_dir} is incomplete."
        )
    plain.save_pretrained(out_dir)
    if source_dir is not None:
        _copy_tokenizer(Path(source_dir), Path(out_dir))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "generation_config.json", "chat_template.jinja"):  # fmt: skip
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
