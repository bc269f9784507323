"""The teacher: the pipeline's base, frozen, in `align.teacher_dtype`; and what a config may ask of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loram_core.config import AlignConfig
from loram_core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from loram_core.distill.objective import Distiller
    from loram_core.distill.topk import TopkCache

# The AlignConfig keys only a distilling objective reads: left out of a `cpt` run's step key, so the
# work dirs of `cpt` runs made before these keys existed keep their keys.
KD_KEYS = ("objective", "kd_weight", "kd_temperature", "kd_mode", "kd_topk", "teacher_dtype")


def uses_teacher(align: AlignConfig) -> bool:
    """Whether the objective reads the original (`kd`, `cpt+kd`)."""
    return align.enabled and align.objective != "cpt"


def resolve_teacher_dtype(align: AlignConfig, device: torch.device) -> str:
    """`align.teacher_dtype` with `auto` resolved: bfloat16 on a GPU, float32 on the CPU."""
    if align.teacher_dtype != "auto":
        return align.teacher_dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def check_distillation(align: AlignConfig, vocab_size: int, device: torch.device) -> None:
    """Refuse a distillation setting that cannot run here, before any compute.

    Args:
        align: the `align` section.
        vocab_size: the base's (and so the pruned model's) vocabulary.
        device: where alignment computes.

    Raises:
        ConfigError: `kd_topk` above the vocabulary, or an NF4 teacher on the CPU.
    """
    if not uses_teacher(align):
        return
    if align.kd_mode == "topk" and align.kd_topk > vocab_size:
        raise ConfigError(
            f"align.kd_topk={align.kd_topk} is larger than the vocabulary ({vocab_size:,} tokens): the teacher "
            f"has no more tokens to keep. Set align.kd_topk to at most {vocab_size} (at {vocab_size} the top-k "
            "KL is the full one), or use align.kd_mode=online."
        )
    if align.teacher_dtype == "nf4" and device.type != "cuda":
        raise ConfigError(
            f"align.teacher_dtype=nf4 needs a GPU (bitsandbytes' 4-bit teacher); alignment computes on "
            f"{device.type} here. Set align.teacher_dtype=float32 or bfloat16 (or auto), or device=cuda."
        )


def load_teacher(base_dir: str, dtype: str, device: torch.device) -> nn.Module:
    """The original model, frozen and in eval mode, on `device` in `dtype` (float32 | bfloat16 | nf4).

    NF4 is bitsandbytes' 4-bit NormalFloat with double quantization and bfloat16 compute, the head
    kept in 16 bits, as the quantize step makes the published variant.
    """
    import torch

    from loram_core.models import load_model

    if dtype == "nf4":
        from loram_core.config import QuantizeConfig
        from loram_core.quantize import bnb_config

        model = load_model(base_dir, dtype=torch.bfloat16, quantization_config=bnb_config(QuantizeConfig()),
                           device_map=str(device))  # fmt: skip
    else:
        model = load_model(base_dir, dtype=getattr(torch, dtype)).to(device)
    model.requires_grad_(False)
    return model.eval()


def make_distiller(
    align: AlignConfig, teacher: nn.Module | None = None, cache: TopkCache | None = None
) -> Distiller:
    """The `Distiller` of `align.objective` fed by `teacher` (online) or `cache` (topk)."""
    from loram_core.distill.objective import Distiller

    cpt_kd = align.objective == "cpt+kd"
    return Distiller(kd_share=align.kd_weight if cpt_kd else 1.0, temperature=align.kd_temperature,
                     teacher=teacher, cache=cache, ce=cpt_kd)  # fmt: skip
