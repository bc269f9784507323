"""A collective's tensor lives where its backend reduces: NCCL on the GPU, Gloo on the CPU
(the first optimizer step under torchrun on GPUs all-reduced a CPU tensor over NCCL)."""

from __future__ import annotations

import pytest
import torch

from loram_core import distributed


def test_nccl_reduces_on_the_current_gpu_and_gloo_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.reduction_device("nccl") == torch.device("cuda", 3)
    assert distributed.reduction_device("gloo") == torch.device("cpu")


def test_mean_over_ranks_puts_its_tensor_on_the_backends_device(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.device] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t: (seen.append(t.device), t.mul_(2)))
    assert distributed.mean_over_ranks(1.5) == pytest.approx(1.5)  # (1.5 + 1.5) / 2
    assert seen == [torch.device("cpu")]
    asked: list[str] = []
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(
        distributed, "reduction_device", lambda backend: asked.append(backend) or torch.device("cpu")
    )
    distributed.mean_over_ranks(1.5)
    assert asked == ["nccl"]  # the reduction asks where the group's backend reduces
