"""The memory plan an alignment run logs before its first step: what each part will hold, in bytes.

Weights, gradients and optimizer state are counted from the models' tensors (AdamW: two float32
moments per trained weight; FLoRA: `r * max(m, n) + m + n` numbers per compressed matrix). The
activations are an estimate after Korthikanti et al. 2022 (eq. 1, "Reducing Activation
Recomputation in Large Transformer Models"), rewritten for a LLaMA block without dropout: per token
and layer, `10 h + 4 I` saved elements (norm inputs and outputs, q/k/v, attention output, the
SwiGLU's gate, up, activation and product) plus `2 a s` for attention scores where no fused kernel
drops them (`a` heads, `s` tokens per block); with activation checkpointing, one `h` per layer
plus one layer recomputed. It is a plan, good to a factor of about two; bench/ALIGN.md sets it
beside measured peaks.
"""

from __future__ import annotations

from torch import nn

from loram_core.config import AlignConfig


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers as stored (tied weights once; NF4 weights packed)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _trained(model: nn.Module, align: AlignConfig) -> list[nn.Parameter]:
    head = getattr(model, "lm_head", None)
    frozen = head.weight if (head is not None and align.freeze_lm_head) else None
    return [p for p in dict.fromkeys(model.parameters()) if p is not frozen and p.requires_grad]


def _optimizer_bytes(params: list[nn.Parameter], align: AlignConfig) -> int:
    total = 0
    for p in params:
        if align.optimizer == "flora" and p.dim() == 2 and min(p.shape) > align.flora_rank:
            m, n = p.shape
            total += 4 * (align.flora_rank * max(m, n) + m + n)
        else:
            total += 8 * p.numel()
    return total


def memory_plan(
    student: nn.Module,
    align: AlignConfig,
    seq_len: int,
    device_type: str,
    teacher_bytes: int = 0,
    cache_file_bytes: int = 0,
) -> dict[str, int | bool]:
    """What an alignment run will hold, in bytes (module doc for what each figure counts).

    Args:
        student: the pruned model as it will train (float32 master weights).
        align: the `align` section (batch, micro-batch, chunking, optimizer, objective, kd_mode).
        seq_len: tokens per block.
        device_type: `cuda` (bf16 autocast under `precision: auto`) or `cpu`.
        teacher_bytes: the teacher's weights on the device (0 for `cpt`).
        cache_file_bytes: the top-k cache's size on disk (`kd_mode: topk`).

    Returns:
        `teacher_weights`, `teacher_resident` (during training), `student_weights`, `gradients`,
        `optimizer`, `activations`, `logits`, `teacher_activations`, `topk_cache_file`,
        `topk_cache_batch` and `device_total` (what the device holds at once while training).
    """
    cfg = student.config
    micro = align.micro_batch_size if isinstance(align.micro_batch_size, int) else align.batch_size
    micro = min(micro, align.batch_size)
    tokens = micro * seq_len
    bf16 = align.precision == "bf16" or (align.precision == "auto" and device_type == "cuda")
    elem = 2 if bf16 else 4
    from loram_core.models import layer_widths

    h, vocab = cfg.hidden_size, cfg.vocab_size
    layers = [
        tokens * (10 * h + 4 * w["intermediate"] + 2 * w["heads"] * seq_len) * elem for w in layer_widths(cfg)
    ]
    if align.gradient_checkpointing:
        activations = tokens * h * elem * len(layers) + max(layers)
    else:
        activations = sum(layers)
    distilling = align.enabled and align.objective != "cpt"
    online = distilling and align.kd_mode == "online"
    topk = distilling and align.kd_mode == "topk"
    chunk = min(align.loss_chunk_tokens or tokens, tokens)
    # float32 logits, their log-softmax and gradient; the teacher's logits and log-softmax (online);
    # the two scattered copies of the top-k tail (topk).
    logits = chunk * vocab * 4 * (3 + 2 * online + 2 * topk)
    teacher_act = tokens * h * elem + tokens * (4 * h + 2 * cfg.intermediate_size) * elem if online else 0
    cache_batch = micro * (seq_len - 1) * (16 * align.kd_topk + 4) if topk else 0  # int32 ids read as int64
    trained = _trained(student, align)
    plan: dict[str, int | bool] = {
        "teacher_weights": teacher_bytes if distilling else 0,
        "teacher_resident": online,
        "student_weights": tensor_bytes(student),
        "gradients": sum(4 * p.numel() for p in trained),
        "optimizer": _optimizer_bytes(trained, align),
        "activations": activations,
        "logits": logits,
        "teacher_activations": teacher_act,
        "topk_cache_file": cache_file_bytes if topk else 0,
        "topk_cache_batch": cache_batch,
    }
    keys = ("student_weights", "gradients", "optimizer", "activations", "logits", "teacher_activations",
            "topk_cache_batch")  # fmt: skip
    plan["device_total"] = sum(int(plan[k]) for k in keys) + (teacher_bytes if online else 0)
    return plan


def describe_plan(plan: dict[str, int | bool]) -> str:
    """One log line: each figure of `memory_plan` in MiB."""
    parts = [
        f"{k.replace('_', ' ')} {v / 2**20:,.1f} MiB" for k, v in plan.items() if not isinstance(v, bool)
    ]
    where = "resident" if plan["teacher_resident"] else "not resident while training"
    return f"alignment memory plan: {'; '.join(parts)} (teacher {where})"
