"""Train a LoRA on the task with stock peft, as a consumer of a published base would.

`get_peft_model` with a `LoraConfig` on the configured projections; only the LoRA factors train
(AdamW, warmup + cosine); batches follow the same seeded, step-indexed order as alignment, so a
run is a pure function of its inputs. The adapter is saved with `save_pretrained` (peft's layout).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft import PeftModel as PeftModelType
from torch import nn

from loram_core.align import autocast_context, cosine_with_warmup, sample_positions
from loram_core.config import VerifyConfig
from loram_core.verify.task import Encoded


def lora_config(cfg: VerifyConfig) -> LoraConfig:
    """The peft config every verification LoRA uses (the same on the small and the original model)."""
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_lora(
    model: nn.Module, data: Encoded, cfg: VerifyConfig, out_dir: str | Path, device: torch.device
) -> tuple[PeftModelType, list[float]]:
    """Wrap `model` with a fresh LoRA, train it on `data` for `cfg.steps` steps, save the adapter.

    Args:
        model: a causal LM (original or pruned), its weights frozen by peft.
        data: encoded training examples (labels on response tokens only).
        cfg: the `verify` section (rank, alpha, targets, steps, batch size, lr, seed).
        out_dir: where `save_pretrained` writes `adapter_config.json` + `adapter_model.safetensors`.
        device: where to train.

    Returns:
        The trained peft model (on `device`) and the loss of every step.
    """
    torch.manual_seed(cfg.seed)  # the LoRA A init: the same draw for every model of one width
    peft_model = get_peft_model(model, lora_config(cfg)).to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = cosine_with_warmup(cfg.warmup_steps, cfg.steps, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    peft_model.train()
    losses = []
    for step in range(cfg.steps):
        idx = sample_positions(step * cfg.batch_size, cfg.batch_size, len(data), cfg.seed)
        batch = data.select(idx)
        with autocast_context("auto", device):
            loss = peft_model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                labels=batch.labels.to(device),
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    peft_model.eval()
    peft_model.save_pretrained(str(out_dir))
    return peft_model, losses
