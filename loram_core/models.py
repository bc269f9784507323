"""Model access: the supported families, per-layer widths of pruned models, loading and saving.

A structurally pruned model has decoder layers of different widths. Its `config.json` keeps the
standard fields and adds a `loram` section with the per-layer widths; `load_model` builds the
family's stock class and resizes each layer's linears before the weights are loaded, so the same
path serves plain, pruned and bitsandbytes-quantized checkpoints.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from loram_core.errors import LoramError


@dataclass(frozen=True)
class Family:
    """Where a decoder family keeps its modules. Differences between families live here only."""

    layers: str = "model.layers"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    # Linears that read the same input tensor (their calibration statistics are computed once).
    shared_inputs: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("gate", "up"))


# LLaMA, Mistral and Qwen2 share the module layout (Qwen2 adds q/k/v biases, handled generically).
FAMILIES: dict[str, Family] = {"llama": Family(), "mistral": Family(), "qwen2": Family(), "qwen3": Family()}

LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def family_of(config: PretrainedConfig) -> Family:
    """The module layout of `config`'s model family; refuses families we do not support."""
    try:
        return FAMILIES[config.model_type]
    except KeyError:
        raise LoramError(
            f"model_type {config.model_type!r} is not supported; supported families: {sorted(FAMILIES)}."
        ) from None


def head_dim(config: PretrainedConfig) -> int:
    """Width of one attention head (an explicit `head_dim`, or hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """`(n_kv_heads, query heads per KV head, head_dim)` of the original model; plain MHA has a group of 1."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return kv, heads // kv, head_dim(config)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers."""
    family = family_of(model.config)
    return model.get_submodule(family.layers)


def layer_linears(layer: nn.Module, family: Family) -> dict[str, nn.Linear]:
    """The seven linears of one decoder layer, by short name (q, k, v, o, gate, up, down)."""
    return {name: layer.get_submodule(getattr(family, name)) for name in LINEAR_NAMES}


def layer_widths(config: PretrainedConfig) -> list[dict[str, int]]:
    """Per-layer widths: `intermediate`, `heads`, `kv_heads`, from the `loram` section or the config."""
    n = config.num_hidden_layers
    loram = getattr(config, "loram", None) or {}
    inter = loram.get("intermediate_sizes") or [config.intermediate_size] * n
    heads = loram.get("num_attention_heads_per_layer") or [config.num_attention_heads] * n
    kv = (
        loram.get("num_key_value_heads_per_layer")
        or [getattr(config, "num_key_value_heads", None) or config.num_attention_heads] * n
    )
    return [{"intermediate": inter[i], "heads": heads[i], "kv_heads": kv[i]} for i in range(n)]


def _new_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features,
        out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def resize_layer(layer: nn.Module, family: Family, widths: dict[str, int], head_size: int) -> None:
    """Replace a layer's linears by empty ones of the given widths (weights are loaded afterwards)."""
    lin = layer_linears(layer, family)
    hidden = lin["q"].in_features
    shapes = {
        "q": (hidden, widths["heads"] * head_size),
        "k": (hidden, widths["kv_heads"] * head_size),
        "v": (hidden, widths["kv_heads"] * head_size),
        "o": (widths["heads"] * head_size, hidden),
        "gate": (hidden, widths["intermediate"]),
        "up": (hidden, widths["intermediate"]),
        "down": (widths["intermediate"], hidden),
    }
    for name, (fan_in, fan_out) in shapes.items():
        old = lin[name]
        if (old.in_features, old.out_features) != (fan_in, fan_out):
            parent_path, _, attr = getattr(family, name).rpartition(".")
            setattr(layer.get_submodule(parent_path), attr, _new_linear(old, fan_in, fan_out))
    set_layer_attributes(layer, family, widths)


def set_layer_attributes(layer: nn.Module, family: Family, widths: dict[str, int]) -> None:
    """Keep the bookkeeping attributes some families read in forward in step with the widths."""
    attn = layer.get_submodule(family.q.rpartition(".")[0])
    # The GQA group size is unchanged by pruning: KV heads go together with their query groups.
    attn.num_key_value_groups = widths["heads"] // widths["kv_heads"]
    mlp = layer.get_submodule(family.gate.rpartition(".")[0])
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = widths["intermediate"]


@functools.cache
def _pruned_class(base_cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A subclass of a stock CausalLM class whose layers take the widths in `config.loram`."""

    def __init__(self: PreTrainedModel, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        base_cls.__init__(self, config, *args, **kwargs)
        family = family_of(config)
        for layer, widths in zip(decoder_layers(self), layer_widths(config), strict=True):
            resize_layer(layer, family, widths, head_dim(config))

    # Same name as the stock class so `save_pretrained` records the standard architecture.
    return type(base_cls.__name__, (base_cls,), {"__init__": __init__, "__module__": __name__})


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class that builds `config`: stock, or its resizing subclass when layers differ in width."""
    family_of(config)
    base_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type])
    return _pruned_class(base_cls) if getattr(config, "loram", None) else base_cls


def load_config(path: str | Path) -> PretrainedConfig:
    """The transformers config in directory `path`; refuses a directory without `config.json`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LoramError(
            f"no model at {str(path)!r}: config.json is missing. Point base.source at a directory "
            "holding a transformers checkpoint (config.json + *.safetensors), or use base.source=demo."
        )
    data = json.loads((path / "config.json").read_text())
    if "auto_map" in data:  # a published version's modeling code (loram_core.stock): read as the family
        from loram_core.stock import plain_config_dict

        plain = plain_config_dict(data)
        return CONFIG_MAPPING[plain.pop("model_type")].from_dict(plain)
    return AutoConfig.from_pretrained(path)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> PreTrainedModel:
    """Load a plain or pruned checkpoint (safetensors only) on the CPU unless `device_map` says otherwise."""
    config = load_config(path)
    if not any(Path(path).glob("*.safetensors")):
        raise LoramError(
            f"no *.safetensors weights in {str(path)!r}; this project never loads pickled weights."
        )
    cls = causal_lm_class(config)
    model = cls.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True, **kwargs)
    model.eval()
    _avoid_bnb_cpu_packing(model)
    return model


def _avoid_bnb_cpu_packing(model: nn.Module) -> None:
    """Keep bitsandbytes' generic 4-bit path on CPUs with AVX512-BF16 where its fast one fails.

    bitsandbytes 0.50 repacks NF4 weights for a fast CPU kernel at the first inference call. It
    fails unless the output width is a multiple of 32 and the input width a multiple of the
    quantization block (64); pruned widths often are not (e.g. 2 KV heads of 24 dims). And the
    kernel has no backward, so a model that trains after an inference call would pass no gradient
    through its 4-bit layers. A forward pre-hook (`modeling_loram.guard_nf4_cpu_paths`, the one the
    published modeling code registers) keeps odd widths, and any forward with gradients enabled, on
    the generic path: same result, slower. GPUs are unaffected.
    """
    from loram_core.modeling_loram import guard_nf4_cpu_paths, keep_bnb_cpu_path_safe

    keep_bnb_cpu_path_safe(model)
    if any(hasattr(m, "support_avx512bf16_for_cpu") for m in model.modules()):
        model.register_forward_pre_hook(guard_nf4_cpu_paths)


def build_model(config: PretrainedConfig, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Instantiate a (possibly pruned) model from its config; `device="meta"` allocates nothing."""
    cls = causal_lm_class(config)
    with torch.device(device):
        return cls._from_config(config)


def set_activation_checkpointing(model: PreTrainedModel, enabled: bool) -> None:
    """Recompute activations in backward (transformers 5 renamed gradient_ to activation_checkpointing)."""
    verb = "enable" if enabled else "disable"
    method = getattr(model, f"activation_checkpointing_{verb}", None) or getattr(
        model, f"gradient_checkpointing_{verb}"
    )
    method()


def count_parameters(model: nn.Module) -> int:
    """Parameters as stored (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
