"""Modeling code shipped inside a published LoRAM version whose decoder layers differ in width.

This file is copied into `model/` (and `model-nf4/`) of a version and registered in its
`config.json` through `auto_map`, so that stock transformers builds the pruned model:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True)

It imports only torch and transformers (it runs on a consumer's machine without loram-provider).
Each class is the family's stock `*ForCausalLM` whose layers' projections are rebuilt at the widths
in the config's `loram` section (`intermediate_sizes`, `num_attention_heads_per_layer`,
`num_key_value_heads_per_layer`) before the weights load; bitsandbytes NF4 (`quantization_config`
in the config) then swaps those linears for `Linear4bit` of the same shapes. The config's
`model_type` is `loram_<family>`, which stock transformers does not know, so a load without
`trust_remote_code=True` fails with transformers' own message instead of loading wrong shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# bitsandbytes' fast NF4 kernel for CPUs with AVX512-BF16 repacks each weight at its first
# inference call, and that repacking requires the output width to be a multiple of 32 and the
# input width a multiple of the quantization block (64). Pruned widths often are not.
CPU_PACK_OUT_MULTIPLE = 32

_PATHS = {  # short name -> (parent module, attribute) inside a decoder layer
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


def layer_widths(config: Any) -> list[dict[str, int]]:
    """Per-layer `intermediate`, `heads` and `kv_heads` from the config's `loram` section."""
    n = config.num_hidden_layers
    loram = getattr(config, "loram", None) or {}
    kv_default = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    inter = loram.get("intermediate_sizes") or [config.intermediate_size] * n
    heads = loram.get("num_attention_heads_per_layer") or [config.num_attention_heads] * n
    kv = loram.get("num_key_value_heads_per_layer") or [kv_default] * n
    return [{"intermediate": inter[i], "heads": heads[i], "kv_heads": kv[i]} for i in range(n)]


def resize_layers(model: nn.Module) -> None:
    """Rebuild each decoder layer's seven projections at the layer's widths (empty: weights load later)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = config.hidden_size
    for layer, w in zip(model.model.layers, layer_widths(config), strict=True):
        attn, inter = w["heads"] * head_dim, w["intermediate"]
        kv = w["kv_heads"] * head_dim
        shapes = {"q": (hidden, attn), "k": (hidden, kv), "v": (hidden, kv), "o": (attn, hidden),
                  "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}  # fmt: skip
        for name, (fan_in, fan_out) in shapes.items():
            parent_name, attr = _PATHS[name]
            parent = getattr(layer, parent_name)
            old = getattr(parent, attr)
            if (old.in_features, old.out_features) != (fan_in, fan_out):
                new = nn.Linear(fan_in, fan_out, bias=old.bias is not None, device=old.weight.device,
                                dtype=old.weight.dtype)  # fmt: skip
                setattr(parent, attr, new)
        # The GQA group size is unchanged by pruning: KV heads go together with their query groups.
        layer.self_attn.num_key_value_groups = w["heads"] // w["kv_heads"]
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = inter


def cpu_packable(module: nn.Module) -> bool:
    """Whether bitsandbytes' AVX512-BF16 repacking accepts this `Linear4bit`'s widths.

    The rule (bitsandbytes 0.50, `_convert_weight_packed_for_cpu`): output features a multiple of
    32, and input features a multiple of the quantization block size (64 by default).
    """
    blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
    return module.out_features % CPU_PACK_OUT_MULTIPLE == 0 and module.in_features % blocksize == 0


def keep_bnb_cpu_path_safe(model: nn.Module) -> int:
    """Send the NF4 linears whose widths the fast CPU kernel cannot repack to bitsandbytes' generic path.

    The generic path computes the same product, only slower; GPUs are unaffected. Returns how many
    linears were switched.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and not cpu_packable(module):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def keep_nf4_trainable(model: nn.Module) -> int:
    """Send every NF4 linear to bitsandbytes' differentiable path, for good; call it before training.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a `Linear4bit`'s weight for a fast kernel
    at its first forward in eval mode without gradients, and from then on always computes that
    layer with the kernel (`gemv_4bit`), which has no backward: no gradient flows back through the
    layer, so a LoRA before it (e.g. `gate_proj` before `down_proj`) silently never learns. This
    unpacks weights already repacked (bitsandbytes' own inverse, as it does when saving) and turns
    the repacking off, so every later forward takes the generic path, whose backward is exact.
    Training continues from the repacked weights, whose absmax bitsandbytes rounded to bf16 (the
    values its fast kernel computed with). Returns how many linears were switched or unpacked.
    """
    switched = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        packed = bool(getattr(state, "packing_format_for_cpu", False))
        if packed:
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        if packed or getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def guard_nf4_cpu_paths(model: nn.Module, args: Any = None) -> None:
    """A forward pre-hook: odd widths off the fast CPU kernel; a forward that may backpropagate
    (gradients enabled) on the differentiable path (`keep_nf4_trainable`)."""
    keep_bnb_cpu_path_safe(model)
    if torch.is_grad_enabled():
        keep_nf4_trainable(model)


class _LoramMixin:
    """Resizes layers after the stock constructor; guards the NF4 CPU paths before each forward."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_layers(self)
        # Quantized linears replace ours after __init__, so the guard runs at each call (a cheap
        # scan); a hook, not a `forward` override, keeps forward's signature (Trainer reads it).
        self.register_forward_pre_hook(guard_nf4_cpu_paths)


class LoramLlamaConfig(LlamaConfig):
    """A LLaMA config whose `loram` section gives per-layer widths."""

    model_type = "loram_llama"


class LoramMistralConfig(MistralConfig):
    """A Mistral config whose `loram` section gives per-layer widths."""

    model_type = "loram_mistral"


class LoramQwen2Config(Qwen2Config):
    """A Qwen2 config whose `loram` section gives per-layer widths."""

    model_type = "loram_qwen2"


class LoramQwen3Config(Qwen3Config):
    """A Qwen3 config whose `loram` section gives per-layer widths."""

    model_type = "loram_qwen3"


class LoramLlamaForCausalLM(_LoramMixin, LlamaForCausalLM):
    """`LlamaForCausalLM` with per-layer widths."""

    config_class = LoramLlamaConfig


class LoramMistralForCausalLM(_LoramMixin, MistralForCausalLM):
    """`MistralForCausalLM` with per-layer widths."""

    config_class = LoramMistralConfig


class LoramQwen2ForCausalLM(_LoramMixin, Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` with per-layer widths."""

    config_class = LoramQwen2Config


class LoramQwen3ForCausalLM(_LoramMixin, Qwen3ForCausalLM):
    """`Qwen3ForCausalLM` with per-layer widths."""

    config_class = LoramQwen3Config
