"""What the `verify` step needs, checked before any compute (preflight) and before it runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loram_core.config import SPARSE, PipelineConfig
from loram_core.errors import ConfigError, LoramError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_STRUCTURED_MODES = ("auto", "zeroA", "normA")
_SPARSE_MODES = ("auto", "dense", "mask", "complement")


def narrowest_target(config: PretrainedConfig, cfg: PipelineConfig) -> tuple[int, str, int]:
    """(layer, module, width) of the narrowest side of any LoRA target in the pruned model.

    A LoRA of rank r on a `[out, in]` linear adds `B @ A` of rank at most `min(in, out)`; a rank
    above that trains extra parameters that can change nothing, and says the setting is a mistake.
    """
    from loram_core.models import head_dim
    from loram_core.prune.plan import plan

    hd, hidden = head_dim(config), config.hidden_size
    narrowest = (0, "", hidden)
    for i, w in enumerate(plan(config, cfg.prune).layers):
        q, kv, inter = w["heads"] * hd, w["kv_heads"] * hd, w["intermediate"]
        sides = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": q, "gate_proj": inter, "up_proj": inter,
                 "down_proj": inter}  # fmt: skip
        for module in cfg.verify.target_modules:
            width = min(sides[module], hidden)
            if width < narrowest[2]:
                narrowest = (i, module, width)
    return narrowest


def require_alignment(cfg: PipelineConfig) -> None:
    """Refuse an explicit verification request (`loram verify`, the verify flow) on a run without alignment.

    A preset that enables `verify` simply skips it on a run that does not align (`--until prune`,
    `align.enabled=false`); asking for verification itself on such a run is an error.

    Raises:
        ConfigError: naming the setting that turns alignment off.
    """
    if not cfg.runs("align"):
        setting = "align.enabled=false" if not cfg.align.enabled else f"until={cfg.until}"
        raise ConfigError(
            f"verification needs a pruned and aligned base ({setting} leaves no alignment): it compares a "
            "LoRA trained on the aligned base with one trained on the base pruned without alignment. "
            "Run with alignment (align.enabled=true, until align or quantize)."
        )


def check_verify(cfg: PipelineConfig) -> None:
    """Refuse a `verify` section that cannot run on this pipeline, before any compute.

    Verification runs when `verify.enabled` and the run aligns (`PipelineConfig.runs("verify")`).

    Raises:
        ConfigError: a recovery mode for the other kind of strategy, or a LoRA rank above the
            narrowest pruned width.
    """
    v = cfg.verify
    if not cfg.runs("verify"):
        return
    sparse = cfg.prune.strategy in SPARSE
    allowed = _SPARSE_MODES if sparse else _STRUCTURED_MODES
    if v.recover_mode not in allowed:
        raise ConfigError(
            f"verify.recover_mode={v.recover_mode!r} does not apply to prune.strategy={cfg.prune.strategy!r}; "
            f"use one of {list(allowed)}."
        )
    from loram_core.demo import base_model_config

    config = base_model_config(cfg.base)
    layer, module, width = narrowest_target(config, cfg)
    if v.rank > width:
        raise ConfigError(
            f"verify.rank={v.rank} is larger than the pruned model allows: layer {layer}'s {module} has a side of "
            f"{width} after pruning (prune.strategy={cfg.prune.strategy}, prune.ratio={cfg.prune.ratio}), and a "
            f"LoRA update there has rank at most {width}. Lower verify.rank to {width} or less, or drop {module} "
            "from verify.target_modules."
        )


def check_aligned(pruned_dir: str, aligned_dir: str) -> None:
    """Refuse to verify a base that is not pruned and aligned.

    Raises:
        LoramError: `aligned_dir` is not a pruned checkpoint with masks, or is the unaligned one.
    """
    from loram_core.models import load_config

    config = load_config(aligned_dir)
    if (
        not getattr(config, "loram", None)
        or not (Path(aligned_dir) / "masks" / "masks.safetensors").is_file()
    ):
        raise LoramError(
            f"the base to verify at {aligned_dir!r} is not a LoRAM base (no `loram` section in config.json or no "
            "masks/masks.safetensors); verification trains on the pipeline's pruned and aligned output."
        )
    if (
        Path(aligned_dir).resolve() == Path(pruned_dir).resolve()
        or not (Path(aligned_dir) / "train_log.json").is_file()
    ):
        raise LoramError(
            f"the base to verify at {aligned_dir!r} was pruned but not aligned, so the ablation would compare it "
            "with itself. Run alignment (align.enabled=true) before verify."
        )
