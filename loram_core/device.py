"""One `device` setting for every in-process step: resolve it, describe it, pick its dtypes.

`auto` means the first CUDA GPU when one is present, else the CPU. Steps place their models and
tensors on the resolved device; on CUDA they default to bf16 (weights for pruning and evaluation,
autocast for alignment), on the CPU to fp32, where bf16 matmuls are slow and less exact.
"""

from __future__ import annotations

import os
import platform
import re
from typing import TYPE_CHECKING, Any

from loram_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU. A device name
# (`torch.cuda.get_device_name`, e.g. "NVIDIA H100 NVL") takes the peak of the longest key it
# contains, so "L40" is not read as "L4", nor "H200 NVL" as "H200"; `LORAM_PEAK_TFLOPS` overrides
# for any other GPU.
_PEAK_BF16: dict[str, float] = {
    "H200 NVL": 835e12,
    "H200": 989.4e12,  # SXM
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989.4e12,  # SXM ("H100 80GB HBM3")
    "GH200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "L40": 181.05e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of the GPU called `name`: the longest table key it contains."""
    keys = [key for key in _PEAK_BF16 if key in name]
    return _PEAK_BF16[max(keys, key=len)] if keys else None


def resolve_device(spec: str) -> torch.device:
    """The torch device a `device` setting names.

    Args:
        spec: `auto`, `cpu`, `cuda` or `cuda:N`.

    Raises:
        ConfigError: the spec is malformed, or names a GPU this machine does not have.
    """
    import torch

    if not re.match(DEVICE_PATTERN, spec):
        raise ConfigError(f"device={spec!r} is not one of auto, cpu, cuda, cuda:N (e.g. device=cuda:0).")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={spec!r} but this machine has no usable CUDA GPU (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}). Use device=auto or device=cpu, or install a CUDA "
                "build of torch on a GPU machine."
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={spec!r} but this machine has {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); pick one of those."
            )
        device = torch.device("cuda", index)
    return device


def default_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """`requested` as a dtype; `auto` is bfloat16 on a GPU that supports it, else float32."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def describe(device: torch.device) -> dict[str, Any]:
    """What a run computed on, for logs, summaries and manifests."""
    import torch

    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s (for MFU), or None where it is not known.

    `LORAM_PEAK_TFLOPS` (e.g. `989.4`) sets it for a GPU missing from the table, or for the CPU.
    """
    import torch

    override = os.environ.get("LORAM_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timers around GPU work need it; a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on a GPU (what the driver reports), or None on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new GPU peak-memory window (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by torch since the last reset, in GiB (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
