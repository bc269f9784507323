"""Alignment: full-parameter continual pre-training (next-token loss) of a pruned model.

The loop reads top to bottom: pick the step's blocks from a seeded order, forward/backward with
gradient accumulation, clip, step, re-apply sparse masks, schedule the learning rate, report,
checkpoint. A checkpoint holds everything a resumed run needs (weights, optimizer, scheduler, RNG,
step — the data position follows from the step), written atomically, so a run killed at any
moment continues from the last checkpoint and follows the uninterrupted run's trajectory.
The same loop pretrains the demo base model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model
from torch import nn

from loram_core.align_checkpoint import clear_checkpoint, find_checkpoint, save_checkpoint, settle
from loram_core.config import AlignConfig
from loram_core.distributed import Dist
from loram_core.errors import LoramError
from loram_core.loss import causal_lm_loss
from loram_core.models import set_activation_checkpointing
from loram_core.optim import build_optimizer

__all__ = ["TrainResult", "apply_masks", "clear_checkpoint", "cosine_with_warmup", "freeze_head",
           "mask_gradients", "sample_positions", "train_causal_lm"]  # fmt: skip

ProgressFn = Callable[[dict], None]
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run did: loss history, tokens, time, and (on a known GPU) MFU."""

    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the log window)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    flops_per_token: float = 0.0  # training FLOPs per token (see loram_core.loss.training_flops_per_token)
    mfu: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"losses": self.losses, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_second, "resumed_from": self.resumed_from,
                "flops_per_token": self.flops_per_token, "mfu": self.mfu}  # fmt: skip


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def sample_positions(first_sample: int, count: int, n_blocks: int, seed: int) -> torch.Tensor:
    """Indices of samples `[first_sample, first_sample + count)` in the seeded epoch order."""
    out = []
    for pos in range(first_sample, first_sample + count):
        epoch, offset = divmod(pos, n_blocks)
        perm = _epoch_perm(epoch, n_blocks, seed)
        out.append(perm[offset])
    return torch.stack(out)


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_perm(epoch: int, n_blocks: int, seed: int) -> torch.Tensor:
    key = (epoch, n_blocks, seed)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()  # one epoch in use at a time (two at an epoch boundary)
        _PERM_CACHE[key] = torch.randperm(
            n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        )
    return _PERM_CACHE[key]


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast where asked (or `auto` on a device with bf16 support), else nothing."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights again (sparse strategies): the pattern must survive every step.

    Args:
        model: the model whose parameters `masks` names.
        masks: parameter name -> bool keep-mask of the parameter's shape (True = kept).
    """
    params = _masked_params(model, masks)
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(~mask.to(params[name].device, torch.bool), 0)


def mask_gradients(model: nn.Module, pruned: dict[str, torch.Tensor]) -> None:
    """Zero the gradients at pruned positions, before clipping and the optimizer step.

    So pruned positions count nowhere: not in the clipping norm, not in any optimizer state (AdamW's
    moments stay zero there; FLoRA projects only kept gradients), as llm-compressor's constant
    sparsity does (gradients masked before the step, weights after it).

    Args:
        model: the model whose parameters `pruned` names.
        pruned: parameter name -> bool mask of the *pruned* positions (the keep-mask inverted).
    """
    params = _masked_params(model, pruned)
    for name, where in pruned.items():
        grad = params[name].grad
        if grad is not None:
            grad.masked_fill_(where, 0)


def _masked_params(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise LoramError(
            f"the sparse masks name {len(missing)} weight(s) the model does not have (first: {missing[0]}); "
            "masks/masks.safetensors belongs to another checkpoint: prune this base again."
        )
    return params


def freeze_head(model: nn.Module) -> list[str]:
    """Freeze the output head (`align.freeze_lm_head`); on a tied model that is the embedding too.

    With `tie_word_embeddings` the head and the input embedding are one matrix, so freezing the
    head freezes `embed_tokens` as well: both stay exactly as pruned. This is said in a warning, not
    done silently; `align.freeze_lm_head=false` trains the shared matrix (head and embedding alike).

    Args:
        model: a transformers causal LM.

    Returns:
        The names of the parameters frozen (empty when the model has no `lm_head`).
    """
    head = getattr(model, "lm_head", None)
    if head is None:
        return []
    head.weight.requires_grad_(False)
    frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    if len(frozen) > 1:
        log.warning(
            "align.freeze_lm_head=true on a model with tied embeddings: %s is one matrix, so it is frozen "
            "as a whole (%s parameters: the input embedding does not train either); set "
            "align.freeze_lm_head=false to train it.",
            " = ".join(frozen),
            f"{head.weight.numel():,}",
        )
    return frozen


def _save_checkpoint(ckpt_dir: Path, run: _Run, step: int, result: TrainResult) -> None:
    model_state = optim_state = None
    if run.dist_info is not None:
        from loram_core.distributed import full_state

        model_state, optim_state = full_state(run.model, run.optimizer)  # a collective: every rank takes part
        if not run.dist_info.main:
            torch.distributed.barrier()
            return
    state = {
        "optimizer": run.optimizer.state_dict() if optim_state is None else optim_state,
        "scheduler": run.scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    trainer = {"step": step, "losses": result.losses, "tokens": result.tokens, "seconds": result.seconds}
    save_checkpoint(ckpt_dir, run.model, state, trainer, model_state)
    if run.dist_info is not None:
        torch.distributed.barrier()


def train_causal_lm(
    model: nn.Module,
    train_blocks: torch.Tensor,
    cfg: AlignConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
    stop_after: int | None = None,
    dist_info: Dist | None = None,
) -> TrainResult:
    """Train `model` in place on `train_blocks` with the next-token loss.

    Each optimizer step averages the gradient over its `batch_size * grad_accum` samples (on every
    process: `* world`), as Hugging Face's Trainer does, so `max_grad_norm` clips that mean whatever
    the split into accumulation passes and micro-batches.

    On a GPU: bf16 autocast (`precision: auto`), fused AdamW, the attention kernel transformers
    picks (SDPA), the loss in chunks so the vocabulary logits never all exist at once, optional
    `torch.compile` of each decoder layer, and micro-batches sized to free memory on request.

    Args:
        model: a transformers causal LM (plain or pruned), on the device to train on.
        train_blocks: int32 `[n_blocks, seq_len]` token blocks (packed: no padding).
        cfg: steps, batch, optimizer, schedule, precision, checkpoint rhythm.
        checkpoint_dir: where checkpoints go; an existing one there is resumed from.
        masks: parameter name -> bool keep-mask (sparse strategies): gradients at pruned positions are
            zeroed before clipping and the step, the weights there after it.
        progress: called with a dict (step, total, loss, grad_norm, lr, tokens_per_s, mfu) every
            `log_every` steps; `grad_norm` is that step's total gradient norm before clipping.
        stop_after: stop (after checkpointing) once this step is reached; for tests of resumption.
        dist_info: this process's place under `torchrun`; the model is wrapped with DDP or FSDP2
            (`cfg.parallel`) and each rank trains on its slice of every global batch. Checkpoints
            hold full state dicts, so a run resumes on any number of processes (but a checkpoint
            of an in-process run is not one of a distributed run, and vice versa).

    Returns:
        The loss history and throughput.
    """
    device = next(model.parameters()).device
    # Moved once, not at every step; held inverted (pruned = True) for in-place masked_fill_.
    pruned = {name: ~m.to(device, torch.bool) for name, m in masks.items()} if masks else {}
    run = _prepare(model, cfg, dist_info, device, train_blocks.shape[1], pruned)
    ckpt_dir = Path(checkpoint_dir) / "checkpoint" if checkpoint_dir is not None else None
    result = TrainResult(steps=cfg.steps, flops_per_token=run.flops_per_token)
    start_step = _resume(ckpt_dir, run, result, device)
    micro = _micro_batch_size(run, cfg, train_blocks, device)
    model = run.model
    model.train()
    n_blocks, seq_len = train_blocks.shape
    per_step = cfg.batch_size * cfg.grad_accum * run.world  # samples per optimizer step, all ranks
    window: list[float] = []
    t0 = time.perf_counter()
    seconds_before = result.seconds
    for step in range(start_step, cfg.steps):
        step_loss = 0.0
        for accum in range(cfg.grad_accum):
            first = step * per_step + (accum * run.world + run.rank) * cfg.batch_size  # this rank's slice
            idx = sample_positions(first, cfg.batch_size, n_blocks, cfg.seed)
            step_loss += _forward_backward(run, train_blocks[idx], micro, device, 1 / cfg.grad_accum)
        grad_norm = _optimizer_step(run, cfg)
        result.tokens += per_step * seq_len
        if run.dist_info is not None:
            from loram_core.distributed import mean_over_ranks

            step_loss = mean_over_ranks(step_loss)
        window.append(step_loss)
        done = step + 1
        result.seconds = seconds_before + time.perf_counter() - t0
        if done % cfg.log_every == 0 or done == cfg.steps:
            result.losses.append((done, sum(window) / len(window)))
            window.clear()
            if progress is not None:
                progress(_progress_event(run, result, done, grad_norm))
        stopping = stop_after is not None and done >= stop_after
        if ckpt_dir is not None and (done % cfg.checkpoint_every == 0 or stopping) and done < cfg.steps:
            _save_checkpoint(ckpt_dir, run, done, result)
        if stopping:
            break
    result.mfu = _mfu(result, run)
    model.eval()
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(run.inner, False)
    return result


@dataclass
class _Run:
    """What the loop works with: the (wrapped) model, its optimizer and schedule, this rank's place."""

    model: nn.Module
    inner: nn.Module  # the unwrapped model (DDP keeps the module inside; FSDP2 shards in place)
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    dist_info: Dist | None
    rank: int
    world: int
    chunk_tokens: int | None
    precision: str
    flops_per_token: float
    peak_flops: float | None
    pruned: dict[str, torch.Tensor]  # parameter name -> bool mask of its pruned positions (sparse)


def _prepare(
    model: nn.Module,
    cfg: AlignConfig,
    dist_info: Dist | None,
    device: torch.device,
    seq_len: int,
    pruned: dict[str, torch.Tensor],
) -> _Run:
    """Freeze the head if asked, wrap for several processes, compile, build optimizer and schedule."""
    from loram_core.device import peak_flops
    from loram_core.loss import training_flops_per_token
    from loram_core.models import decoder_layers

    if cfg.freeze_lm_head:
        freeze_head(model)
    named = _masked_params(model, pruned)
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    flops_per_token = training_flops_per_token(model, seq_len)
    inner = model
    rank, world = (dist_info.rank, dist_info.world) if dist_info is not None else (0, 1)
    if world == 1:
        dist_info = None
    else:
        from loram_core.distributed import wrap

        if cfg.parallel == "fsdp" and (pruned or cfg.optimizer != "adamw"):
            raise LoramError(
                "align.parallel=fsdp shards every weight; sparse masks and FLoRA need whole matrices. "
                "Use align.parallel=ddp for sparse strategies or align.optimizer=flora."
            )
        model = wrap(model, cfg.parallel, decoder_layers(model))  # DDP: `inner` stays the module
    if cfg.compile:
        for layer in decoder_layers(inner):
            layer.compile()  # regional: each layer once, shapes are static (packed blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        cfg.optimizer,
        params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        flora_rank=cfg.flora_rank,
        flora_kappa=cfg.flora_kappa,
        seed=cfg.seed,
        fused=device.type == "cuda",
        # FLoRA keeps its statistics over kept positions only (AdamW needs nothing: zero gradients
        # leave its moments zero).
        masks={named[name]: ~where for name, where in pruned.items()},
    )
    schedule = cosine_with_warmup(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The chunked loss calls the decoder and head directly, which DDP/FSDP wrappers must see.
    chunk_tokens = cfg.loss_chunk_tokens if dist_info is None else None
    return _Run(model, inner, params, optimizer, scheduler, dist_info, rank, world, chunk_tokens,
                cfg.precision, flops_per_token, peak_flops(device), pruned)  # fmt: skip


def _resume(ckpt_dir: Path | None, run: _Run, result: TrainResult, device: torch.device) -> int:
    """Load the latest checkpoint into the run, if there is one; returns the step to start from."""
    if ckpt_dir is None:
        return 0
    if run.dist_info is None or run.dist_info.main:
        settle(ckpt_dir)  # whatever a kill during a save left, one complete checkpoint (or none) now
    if run.dist_info is not None:
        torch.distributed.barrier()  # no rank reads while the main one repairs
    found = find_checkpoint(ckpt_dir)
    if found is None:
        return 0
    state = torch.load(found / "state.pt", weights_only=True)
    if run.dist_info is None:
        load_model(run.model, str(found / "model.safetensors"), device=str(device))
        run.optimizer.load_state_dict(state["optimizer"])
    else:
        from loram_core.distributed import load_full_state

        load_full_state(
            run.model, run.optimizer, load_file(str(found / "model.safetensors")), state["optimizer"]
        )
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    meta = json.loads((found / "trainer.json").read_text())
    result.losses = [tuple(x) for x in meta["losses"]]
    result.tokens, result.seconds, result.resumed_from = meta["tokens"], meta["seconds"], meta["step"]
    return meta["step"]


def _forward_backward(
    run: _Run, batch: torch.Tensor, micro: int, device: torch.device, scale: float = 1.0
) -> float:
    """Accumulate the gradients of `scale` x `batch`'s mean loss, `micro` samples per pass.

    `scale` is `1 / grad_accum`, so an optimizer step's passes sum to the gradient of the mean over
    all its samples. Returns the scaled loss (the passes of a step sum to the step's mean loss).
    """
    total = 0.0
    for start in range(0, batch.shape[0], micro):
        ids = batch[start : start + micro].to(device=device, dtype=torch.long, non_blocking=True)
        share = ids.shape[0] / batch.shape[0] * scale  # the micro-batches sum to scale x the batch mean
        with autocast_context(run.precision, device):
            loss = causal_lm_loss(run.model, ids, run.chunk_tokens) * share
        loss.backward()
        total += loss.item()
    return total


def _optimizer_step(run: _Run, cfg: AlignConfig) -> torch.Tensor:
    """Mask sparse gradients, clip, step, zero the gradients, advance the schedule, re-mask the weights.

    Returns the total gradient norm before clipping (a 0-dim tensor: read it only when logging, a
    GPU would otherwise wait for it at every step).
    """
    if run.pruned:
        mask_gradients(run.inner, run.pruned)
    if cfg.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if run.pruned:
        params = dict(run.inner.named_parameters())
        with torch.no_grad():
            for name, where in run.pruned.items():
                params[name].masked_fill_(where, 0)
    return norm


def _micro_batch_size(run: _Run, cfg: AlignConfig, blocks: torch.Tensor, device: torch.device) -> int:
    """Samples per forward/backward: `micro_batch_size`, or with `auto` the largest that fits on the GPU.

    `auto` tries a forward and backward of the full batch, then halves it after each out-of-memory
    error; the gradients of the probe are discarded. On the CPU `auto` is the whole batch.
    """
    if cfg.micro_batch_size is None:
        return cfg.batch_size
    if cfg.micro_batch_size != "auto":
        return min(cfg.micro_batch_size, cfg.batch_size)
    if device.type != "cuda":
        return cfg.batch_size
    size = cfg.batch_size
    probe = blocks[: cfg.batch_size]
    while True:
        try:
            _forward_backward(run, probe[:size], size, device)
            return size
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise LoramError(
                    "one sample of align.batch_size does not fit in GPU memory; set "
                    "align.gradient_checkpointing=true, lower corpus.seq_len, or use more GPUs "
                    "(align.nproc_per_node)."
                ) from None
            size //= 2
        finally:
            run.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


def _mfu(result: TrainResult, run: _Run) -> float | None:
    """Model FLOPs utilisation of the run so far (None where the device's peak is unknown)."""
    if run.peak_flops is None or not result.seconds:
        return None
    return result.tokens_per_second * run.flops_per_token / (run.peak_flops * run.world)


def _progress_event(run: _Run, result: TrainResult, done: int, grad_norm: torch.Tensor) -> dict:
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    event = {
        "step": done,
        "total": result.steps,
        "loss": result.losses[-1][1],
        "grad_norm": float(grad_norm),
        "lr": run.scheduler.get_last_lr()[0],
        "tokens_per_s": result.tokens_per_second,
    }
    mfu = _mfu(result, run)
    if mfu is not None:
        event["mfu"] = mfu
    return event
