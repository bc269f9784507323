"""peft LoRA adapters on disk: read, parse their keys, check them against a model, write them.

An adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`. peft names
its tensors `base_model.model.<module>.lora_A.weight` (`lora_B`, and `lora_embedding_A/B` for
embeddings, which carry no `.weight`), sometimes with the adapter's name in between
(`lora_A.default.weight`). Anything else in the file (the full `base_layer.weight` that peft saves
for targeted embeddings, `modules_to_save` copies) is a full parameter of the model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from loram_core.errors import LoramError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_PARTS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}


@dataclass(frozen=True)
class LoraKey:
    """One LoRA tensor's place: the targeted module (as named in the model), `A` or `B`, weight or bias."""

    module: str  # e.g. model.layers.3.self_attn.q_proj
    factor: str  # "A" or "B"
    param: str  # "weight" or "bias"
    embedding: bool  # lora_embedding_A/B: A is [r, num_embeddings], B is [dim, r]


def parse_key(key: str) -> LoraKey | None:
    """The LoRA place a tensor name stands for, or None for a full parameter (or a foreign key)."""
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX) :].split(".")
    for i, part in enumerate(parts):
        if part in _LORA_PARTS:
            rest = parts[i + 1 :]
            param = rest[-1] if rest and rest[-1] in ("weight", "bias") else "weight"
            return LoraKey(".".join(parts[:i]), _LORA_PARTS[part], param, part.startswith("lora_embedding"))
    return None


@dataclass
class Adapter:
    """A peft LoRA adapter in memory: its config (as JSON) and its tensors by their file names."""

    config: dict
    tensors: dict[str, torch.Tensor]
    path: Path = field(default=Path("."))

    def lora_modules(self) -> dict[str, dict[str, str]]:
        """Targeted module -> {"A": key, "B": key, "B.bias": key (if lora_bias)}."""
        modules: dict[str, dict[str, str]] = {}
        for key in self.tensors:
            place = parse_key(key)
            if place is not None:
                slot = place.factor if place.param == "weight" else f"{place.factor}.{place.param}"
                modules.setdefault(place.module, {})[slot] = key
        return modules

    def rank(self, module: str) -> int:
        """The rank peft gives `module`: `rank_pattern` (matched as peft matches it) or `r`."""
        return int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8)))

    def scaling(self, module: str) -> float:
        """`alpha / r` (rsLoRA: `alpha / sqrt(r)`), with `alpha_pattern` and `rank_pattern` applied."""
        r = self.rank(module)
        alpha = float(
            _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        )
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _pattern_value(pattern: dict, module: str, default):
    # peft's rule: the first pattern key that matches the end of the module name, at a dot boundary.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: str | Path) -> Adapter:
    """Read a peft LoRA adapter directory.

    Raises:
        LoramError: a file is missing, the weights are pickled, or the adapter is not plain LoRA.
    """
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise LoramError(
            f"no peft adapter at {str(path)!r}: {CONFIG_FILE} is missing. Point --adapter at the directory "
            "that `PeftModel.save_pretrained` wrote."
        )
    if not weights_file.is_file():
        pickled = (
            " (adapter_model.bin is pickled and never loaded here)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise LoramError(
            f"{str(weights_file)!r} is missing{pickled}. Save the adapter with "
            "`save_pretrained(..., safe_serialization=True)` (peft's default)."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise LoramError(f"{str(config_file)!r} is not valid JSON ({err}); re-save the adapter.") from None
    if config.get("peft_type") != "LORA":
        raise LoramError(
            f"{str(config_file)!r} has peft_type {config.get('peft_type')!r}; only LoRA adapters (peft_type "
            "'LORA') can be recovered."
        )
    if config.get("use_dora"):
        raise LoramError(
            f"{str(config_file)!r} is a DoRA adapter (use_dora: true): its magnitude vectors are norms of the "
            "pruned weights and have no counterpart on the original model. Train plain LoRA on the pruned base."
        )
    if config.get("fan_in_fan_out"):
        raise LoramError(
            f"{str(config_file)!r} has fan_in_fan_out: true (GPT-2 style Conv1D layers); LLaMA, Mistral and "
            "Qwen2 use nn.Linear. Train the adapter with fan_in_fan_out false."
        )
    with safe_open(str(weights_file), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    adapter = Adapter(config, tensors, path)
    if not adapter.lora_modules():
        raise LoramError(
            f"{str(weights_file)!r} holds no LoRA tensor (no key with lora_A/lora_B); is it an adapter?"
        )
    return adapter


def write_adapter(adapter: Adapter, out_dir: str | Path) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` (peft's layout) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in adapter.tensors.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")


def module_io(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a LoRA target as peft sees it: Linear's features, Embedding's (vocab, dim)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    raise LoramError(f"LoRA on {type(module).__name__} is not supported; target Linear or Embedding modules.")


def check_against(adapter: Adapter, model: nn.Module, what: str, fix: str) -> None:
    """Check every tensor of `adapter` fits `model` (a meta-device model is enough).

    LoRA `A` must be `[r, in]`, `B` `[out, r]` (`B.bias` `[out]`), with `r` the rank peft would give
    the module; a full parameter must have the model's shape.

    Args:
        what: the model's description for messages ("the pruned base at ...").
        fix: what the user should do if something does not fit.

    Raises:
        LoramError: naming the adapter file, the key, the shapes and `fix`.
    """
    source = str(adapter.path / WEIGHTS_FILE)
    params = dict(model.named_parameters())
    for key, tensor in adapter.tensors.items():
        place = parse_key(key)
        if place is None:
            name = param_name(key)
            if name not in params:
                raise LoramError(f"{source}: key {key!r} names no parameter of {what}. {fix}")
            expected = tuple(params[name].shape)
        else:
            try:
                module = model.get_submodule(place.module)
            except AttributeError:
                raise LoramError(
                    f"{source}: key {key!r} targets module {place.module!r}, which {what} does not have "
                    f"(an adapter for another model?). {fix}"
                ) from None
            fan_in, fan_out = module_io(module)
            r = adapter.rank(place.module)
            if place.param == "bias":
                expected = (fan_out,)
            elif place.factor == "A":
                expected = (r, fan_in)
            else:
                expected = (fan_out, r)
        if tuple(tensor.shape) != expected:
            raise LoramError(
                f"{source}: {key!r} has shape {list(tensor.shape)}, but {what} needs {list(expected)}"
                + (f" (rank {adapter.rank(place.module)} from adapter_config.json)" if place else "")
                + f". {fix}"
            )


def param_name(key: str) -> str:
    """The model parameter a full tensor of an adapter file stands for."""
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    parts = [p for p in name.split(".") if p != "base_layer"]
    if "modules_to_save" in parts:  # `<module>.modules_to_save[.<adapter>].weight`
        i = parts.index("modules_to_save")
        parts = parts[:i] + parts[-1:]
    return ".".join(parts)
