"""The 4-bit variant (QLoRAM): bitsandbytes NF4 with double quantization, via transformers.

The aligned checkpoint is loaded with a `BitsAndBytesConfig`, which swaps every decoder linear for
`bnb.nn.Linear4bit` (pruned widths included: the layers are resized before the swap), and saved
with `save_pretrained`; stock transformers reloads it when widths are uniform, `load_model` always.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BitsAndBytesConfig

from loram_core.config import QuantizeConfig
from loram_core.models import load_model


def bnb_config(cfg: QuantizeConfig) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
        llm_int8_skip_modules=["lm_head"],  # the head stays in 16 bits, as in QLoRA
    )


def quantize_checkpoint(src: str | Path, dst: str | Path, cfg: QuantizeConfig, device: str = "cpu") -> None:
    """Quantize the checkpoint in `src` to 4 bits and save it in `dst`."""
    model = load_model(src, dtype=torch.bfloat16, quantization_config=bnb_config(cfg), device_map=device)
    model.save_pretrained(dst)
