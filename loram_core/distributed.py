"""Several processes (GPUs or nodes) for alignment: DDP or FSDP2 under `torchrun`.

The training loop stays the one in `align.py`; this module only sets up the process group, wraps
the model, and gathers/scatters full state dicts so that checkpoints have the single-process
format (a run may resume on a different number of processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from loram_core.errors import LoramError


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes files and reports)."""
        return self.rank == 0


def setup() -> Dist:
    """Join the process group `torchrun` describes in the environment (NCCL on GPUs, Gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, device)


def wrap(model: nn.Module, parallel: str, decoder_layers: nn.ModuleList) -> nn.Module:
    """DDP (replicated weights) or FSDP2 (weights, grads and optimizer state sharded per layer)."""
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise LoramError(f"align.parallel={parallel!r} is not one of 'ddp', 'fsdp'.")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so its model is returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_model_state(model: nn.Module) -> dict:
    """The full (unsharded) model state dict on rank 0, on the CPU; empty elsewhere. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on rank 0, on the CPU; empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = unwrap(model)
    return get_model_state_dict(inner, options=options), get_optimizer_state_dict(
        inner, optimizer, options=options
    )


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict
) -> None:
    """Scatter full state dicts (read by every rank) back into a wrapped model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    inner = unwrap(model)
    set_model_state_dict(inner, model_sd, options=options)
    set_optimizer_state_dict(inner, optimizer, optim_sd, options=options)


def reduction_device(backend: str) -> torch.device:
    """Where a collective's tensor must live: NCCL reduces GPU tensors only, Gloo CPU ones."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(value: float) -> float:
    """The mean of `value` over all ranks (the value itself outside a process group)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=reduction_device(dist.get_backend()))
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()
