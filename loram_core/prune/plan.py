"""Pruned widths and parameter accounting, computed without loading any weight (meta device).

The widths follow the LoRAM reference code, which the paper's parameter counts come from:
per pruned layer, `ceil(I * r)` MLP channels go; with GQA, `int(n_kv * r)` KV heads go together
with their query groups; plain multi-head attention keeps `int(n * (1 - r))` heads. At least one
head and one channel always remain. `prune.round_to` then rounds the kept MLP width down to a
multiple of itself, as Torch-Pruning's `round_to` does (at least one multiple stays); heads are
whole units of `head_dim` already and are not rounded.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PretrainedConfig

from loram_core.config import SPARSE, PruneConfig
from loram_core.models import attention_shape, build_model, count_parameters, layer_widths

GIB = 2**30


def round_kept(kept: int, width: int, round_to: int) -> int:
    """`kept` of `width` channels rounded down to a multiple of `round_to`, never below one multiple.

    Torch-Pruning's `_round_to` (v1.6): `kept - kept % round_to`. Where that leaves nothing, one
    multiple (or the whole width, if narrower) stays, so a layer is never emptied.
    """
    rounded = kept - kept % round_to
    return rounded if rounded > 0 else min(round_to, width)


def pruned_layer_widths(config: PretrainedConfig, ratio: float, round_to: int = 1) -> dict[str, int]:
    """Widths of one structurally pruned layer of `config` at `ratio`, MLP width rounded to `round_to`."""
    inter = config.intermediate_size
    kv, group, _ = attention_shape(config)
    heads = kv * group
    kept_inter = round_kept(max(1, inter - math.ceil(inter * ratio)), inter, round_to)
    if group == 1:  # plain multi-head attention
        kept_kv = max(1, int(heads * (1 - ratio)))
        return {"intermediate": kept_inter, "heads": kept_kv, "kv_heads": kept_kv}
    kept_kv = max(1, kv - int(kv * ratio))
    return {"intermediate": kept_inter, "heads": kept_kv * group, "kv_heads": kept_kv}


def structured_config(config: PretrainedConfig, cfg: PruneConfig) -> PretrainedConfig:
    """A copy of `config` with the `loram` section describing the pruned widths of every layer."""
    start, stop = cfg.layer_range(config.num_hidden_layers)
    widths = layer_widths(config)
    target = pruned_layer_widths(config, cfg.ratio, cfg.round_to)
    for i in range(start, stop):
        widths[i] = dict(target)
    out = copy.deepcopy(config)
    out.loram = {
        "strategy": cfg.strategy,
        "ratio": cfg.ratio,
        "round_to": cfg.round_to,
        "pruned_layers": list(range(start, stop)),
        "intermediate_sizes": [w["intermediate"] for w in widths],
        "num_attention_heads_per_layer": [w["heads"] for w in widths],
        "num_key_value_heads_per_layer": [w["kv_heads"] for w in widths],
    }
    return out


@dataclass
class Plan:
    """What a pruning config yields, before any weight is touched."""

    strategy: str
    ratio: float
    original_params: int
    pruned_params: int  # parameters a consumer trains against (non-zero for sparse strategies)
    reduction: float  # original / pruned
    hbm_gb: float  # 16-bit weights of the pruned model
    hbm_gb_4bit: float  # QLoRAM accounting, as the paper counts: every parameter at a quarter
    hbm_gb_4bit_actual: float  # decoder linears in NF4 (+ quantization state), the rest in 16 bits
    pruned_layers: list[int]
    layers: list[dict[str, int]]
    round_to: int = 1  # structured: kept MLP widths are multiples of this
    unrounded_intermediate: int | None = None  # structured: the kept MLP width before rounding
    layerwise: str = "uniform"
    # Sparse strategies: each pruned layer's ratio, in `pruned_layers` order. None for OWL: its ratios
    # come from calibration statistics and are decided at prune time (config.json's loram.layer_ratios).
    layer_ratios: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _nf4_bytes(numel: int, blocksize: int = 64, nested_blocksize: int = 256) -> float:
    # 4-bit codes, plus double-quantized absmax: one 8-bit absmax per 64-block and one fp32
    # scale per 256 absmax values (bitsandbytes' layout with compress_statistics=True).
    blocks = math.ceil(numel / blocksize)
    return numel / 2 + blocks + 4 * math.ceil(blocks / nested_blocksize)


def plan(config: PretrainedConfig, cfg: PruneConfig) -> Plan:
    """Count parameters of the original and the pruned model on the meta device.

    For `semi`/`unstructured` the layer shapes stay and `pruned_params` counts the weights that
    remain non-zero in the pruned linears (n:m keeps `1 - n/m`, unstructured keeps `1 - ratio`).
    """
    original = build_model(config, "meta")
    n_orig = count_parameters(original)
    start, stop = cfg.layer_range(config.num_hidden_layers)
    ratios: list[float] | None = None
    unrounded = None
    if cfg.strategy in SPARSE:
        pruned_cfg, model = config, original
        keep = 1 - cfg.n_m[0] / cfg.n_m[1] if cfg.strategy == "semi" else 1 - cfg.ratio
        # OWL's ratios average to `ratio` over layers of one shape: the count is the same (up to rounding).
        ratios = None if cfg.layerwise == "owl" else [1 - keep] * (stop - start)
        removed = 0
        for i in range(start, stop):
            for name, p in model.model.layers[i].named_parameters():
                if name.endswith("proj.weight"):
                    removed += p.numel() - round(p.numel() * keep)
        n_pruned = n_orig - removed
    else:
        pruned_cfg = structured_config(config, cfg)
        model = build_model(pruned_cfg, "meta")
        n_pruned = count_parameters(model)
        unrounded = pruned_layer_widths(config, cfg.ratio)["intermediate"]
    linear_numel = sum(
        p.numel() for n, p in model.model.layers.named_parameters() if n.endswith("proj.weight")
    )
    # NF4 stores a sparse model's zeros too: sparsity does not shrink the real 4-bit footprint.
    other = count_parameters(model) - linear_numel
    actual_4bit = _nf4_bytes(linear_numel) + 2 * other
    return Plan(
        strategy=cfg.strategy,
        ratio=cfg.ratio,
        original_params=n_orig,
        pruned_params=n_pruned,
        reduction=n_orig / n_pruned,
        hbm_gb=n_pruned * 2 / GIB,
        hbm_gb_4bit=n_pruned / 4 * 2 / GIB,
        hbm_gb_4bit_actual=actual_4bit / GIB,
        pruned_layers=list(range(start, stop)),
        layers=layer_widths(pruned_cfg),
        round_to=cfg.round_to,
        unrounded_intermediate=unrounded,
        layerwise=cfg.layerwise,
        layer_ratios=ratios,
    )


def read_model_config(source: str | Path) -> PretrainedConfig:
    """A model's config from its directory or a config.json file, without touching any weight."""
    from transformers import CONFIG_MAPPING

    from loram_core.errors import LoramError

    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise LoramError(
            f"{str(source)!r} is neither a model directory with config.json nor a config.json file."
        )
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise LoramError(f"{str(path)!r} has model_type {model_type!r}, which transformers does not know.")
    return CONFIG_MAPPING[model_type](**data)


def loading(config: PretrainedConfig, cfg: PruneConfig) -> str:
    """How the pruned 16-bit checkpoint of this setting loads: `stock` or `remote code` (`loram_core.stock`).

    Uniform widths (a structured base pruned in every layer, `keep_first=0, keep_last=0`) and
    sparse bases are plain family configs; layers of several widths ship `modeling_loram.py`.
    """
    from loram_core.stock import loading as loading_of

    pruned = config if cfg.strategy in SPARSE else structured_config(config, cfg)
    return loading_of(pruned.to_dict())
