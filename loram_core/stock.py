"""Make a published model directory load with stock transformers, or fail loudly without our code.

When every decoder layer has the same widths (a structured base pruned in all its layers:
`prune.keep_first=0, prune.keep_last=0`), the published `config.json` is a plain family config:
the pruned widths in the standard fields (`intermediate_size`, `num_attention_heads`,
`num_key_value_heads`, an explicit `head_dim`) and the original's in `loram.original`, which
recovery reads. Stock `AutoModelForCausalLM.from_pretrained` builds it, no remote code.

Otherwise a structurally pruned model keeps the original's standard config fields and records its per-layer
widths in a `loram` section (DESIGN.md), so a stock `*ForCausalLM` would build the original's
shapes: a 16-bit load fails on a size mismatch, and an NF4 load (where `Linear4bit` takes its
shapes from the module, not the checkpoint) loads silently wrong. Such a directory therefore ships
`modeling_loram.py` (self-contained: torch + transformers) and names it in `config.json`'s
`auto_map`, with `model_type` `loram_<family>`: `from_pretrained(dir, trust_remote_code=True)`
builds the right shapes, and without `trust_remote_code` transformers refuses the unknown type,
saying to pass it. Sparse bases keep the original's shapes and stay plain architectures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loram_core import modeling_loram

MODELING_FILE = "modeling_loram.py"
PREFIX = "loram_"
_CLASS_STEMS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _standard_widths(config: dict) -> dict[str, int]:
    heads = config["num_attention_heads"]
    return {
        "intermediate": config["intermediate_size"],
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
    }


def _layer_widths(config: dict) -> list[dict[str, int]]:
    class _Cfg:  # modeling_loram.layer_widths reads attributes
        pass

    cfg = _Cfg()
    cfg.__dict__.update(config)
    return modeling_loram.layer_widths(cfg)


def linear_shapes(config: dict) -> list[tuple[int, int]]:
    """`(in_features, out_features)` of every decoder linear the config describes."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    hidden = config["hidden_size"]
    shapes = []
    for w in _layer_widths(config):
        attn, kv, inter = w["heads"] * head_dim, w["kv_heads"] * head_dim, w["intermediate"]
        shapes += [(hidden, attn), (hidden, kv), (hidden, kv), (attn, hidden),
                   (hidden, inter), (hidden, inter), (inter, hidden)]  # fmt: skip
    return shapes


def cpu_unpackable(config: dict) -> list[tuple[int, int]]:
    """The NF4 linear shapes bitsandbytes' AVX512-BF16 CPU kernel cannot repack (empty if not 4-bit).

    The rule, as `modeling_loram.cpu_packable` states it: output width a multiple of 32, input width
    a multiple of the quantization block (64).
    """
    if not (config.get("quantization_config") or {}).get("load_in_4bit"):
        return []
    block = 64
    return sorted(
        {(i, o) for i, o in linear_shapes(config) if o % modeling_loram.CPU_PACK_OUT_MULTIPLE or i % block}
    )


def needs_modeling_code(config: dict) -> bool:
    """Whether stock transformers would build this config wrong (per-layer widths) or crash on it
    (NF4 widths the fast CPU kernel cannot repack)."""
    widths = _layer_widths(config)
    standard = _standard_widths(config)
    return any(w != standard for w in widths) or bool(cpu_unpackable(config))


def uniform_widths(config: dict) -> dict[str, int] | None:
    """The widths every layer shares, when they differ from the standard fields; None otherwise.

    A structured base pruned in all its layers has one width throughout, which the standard
    fields can say; layers of several widths (or a sparse base, whose shapes are the original's)
    give None.
    """
    widths = _layer_widths(config)
    first = widths[0]
    if any(w != first for w in widths) or first == _standard_widths(config):
        return None
    return first


def plain_family_config(config: dict) -> dict:
    """`config` with its uniform pruned widths in the standard fields and the original's in `loram.original`.

    `head_dim` becomes explicit: with fewer heads, hidden_size / num_attention_heads no longer
    gives it. The per-layer lists stay (all equal), so loram_core reads both forms alike.
    """
    widths = uniform_widths(config)
    if widths is None:
        return config
    standard = _standard_widths(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // standard["heads"]
    original = {"intermediate_size": standard["intermediate"], "num_attention_heads": standard["heads"],
                "num_key_value_heads": standard["kv_heads"], "head_dim": head_dim}  # fmt: skip
    out = dict(config)
    out.update(intermediate_size=widths["intermediate"], num_attention_heads=widths["heads"],
               num_key_value_heads=widths["kv_heads"], head_dim=head_dim)  # fmt: skip
    out["loram"] = {**config["loram"], "original": original}
    return out


def original_fields(config: dict) -> dict:
    """The original model's standard shape fields of a pruned config (either published form)."""
    original = (config.get("loram") or {}).get("original") or {}
    return {**config, **original}


def loading(config: dict) -> str:
    """How a consumer loads a pruned checkpoint of this config: `stock` or `remote code`.

    `stock`: the family's own class builds it (a sparse base, or uniform widths as a plain family
    config); `remote code`: layers of several widths, or NF4 widths bitsandbytes' CPU kernel
    cannot repack, need the shipped `modeling_loram.py` (`trust_remote_code=True`).
    """
    return "remote code" if needs_modeling_code(plain_family_config(config)) else "stock"


def make_loadable(model_dir: str | Path) -> bool:
    """Make a published variant load with stock transformers where its shapes allow, else ship the code.

    Uniform widths: `config.json` is rewritten as a plain family config (`plain_family_config`).
    Then `ship_modeling_code` adds `modeling_loram.py` where stock classes would still fail.

    Returns:
        Whether the directory needs `trust_remote_code=True`.
    """
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    if config.get("model_type", "").removeprefix(PREFIX) in _CLASS_STEMS and uniform_widths(config):
        path.write_text(json.dumps(plain_family_config(config), indent=2, sort_keys=True) + "\n")
    return ship_modeling_code(model_dir)


def ship_modeling_code(model_dir: str | Path) -> bool:
    """Copy `modeling_loram.py` into `model_dir` and register it in its `config.json` when needed.

    Returns whether the directory now needs `trust_remote_code=True`.
    """
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    family = config["model_type"].removeprefix(PREFIX)
    if family not in _CLASS_STEMS or not needs_modeling_code(config):
        return False
    stem = f"Loram{_CLASS_STEMS[family]}"
    module = MODELING_FILE.removesuffix(".py")
    config["model_type"] = PREFIX + family
    config["architectures"] = [f"{stem}ForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": f"{module}.{stem}Config",
        "AutoModelForCausalLM": f"{module}.{stem}ForCausalLM",
    }
    shutil.copyfile(modeling_loram.__file__, Path(model_dir) / MODELING_FILE)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def plain_config_dict(config: dict) -> dict:
    """A shipped config as loram_core reads it: the family's own `model_type`, no `auto_map`."""
    model_type = config.get("model_type") or ""
    if not model_type.startswith(PREFIX):
        return config
    family = model_type.removeprefix(PREFIX)
    out = {k: v for k, v in config.items() if k != "auto_map"}
    out["model_type"] = family
    out["architectures"] = [f"{_CLASS_STEMS.get(family, family.capitalize())}ForCausalLM"]
    return out
