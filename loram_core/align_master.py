"""`align.precision: bf16-master`: bf16 parameters for compute, fp32 master weights for the optimizer.

The trained parameters live in bfloat16 in the model: forward and backward read them without the
per-pass fp32 -> bf16 casts autocast makes of every weight, and their gradients are bf16 (half
the memory traffic). The optimizer never sees them: it steps float32 master copies, so AdamW's
moments and every update are float32 (Micikevicius et al. 2018, "Mixed precision training"; what
apex's O2 and DeepSpeed's bf16 optimizer do). Per step: each bf16 gradient is widened into its
master's `.grad`, the optimizer steps the masters (clipping sees the fp32 gradients), and the
masters are rounded back into the bf16 parameters. Frozen parameters are left as they are
(autocast casts them for the matmuls). Checkpoints hold the masters, so a resumed run continues
from the exact fp32 state; after training the parameters take the masters back (float32), so the
published weights are what fp32 AdamW reached, rounded once by the publish dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class MasterWeights:
    """fp32 masters of a model's trained parameters, which it turns into bfloat16."""

    def __init__(self, model: nn.Module) -> None:
        """Make a float32 master of every trained parameter of `model`, then store the parameter in bf16.

        Args:
            model: the unwrapped model (on its training device); modified in place.
        """
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.masters: list[nn.Parameter] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            self.names.append(name)
            self.params.append(p)
            self.masters.append(nn.Parameter(p.detach().float().clone()))
            p.data = p.data.to(torch.bfloat16)

    def master_of(self) -> dict[nn.Parameter, nn.Parameter]:
        """Model parameter -> its master (to translate per-parameter options such as FLoRA's masks)."""
        return dict(zip(self.params, self.masters, strict=True))

    def gradients_to_masters(self) -> None:
        """Widen each parameter's bf16 gradient into its master's fp32 `.grad` and free the bf16 one."""
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        """Round the (stepped) masters into the bf16 parameters."""
        torch._foreach_copy_(self.params, self.masters)

    @contextlib.contextmanager
    def fp32_params(self) -> Iterator[None]:
        """While inside, the parameters *are* the fp32 masters (to save a checkpoint from)."""
        half = [p.data for p in self.params]
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m.data
        try:
            yield
        finally:
            for p, h in zip(self.params, half, strict=True):
                p.data = h

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Set the masters (and the bf16 parameters) from a saved fp32 state dict (a checkpoint's)."""
        for name, m in zip(self.names, self.masters, strict=True):
            m.copy_(state[name])
        self.masters_to_params()

    def finish(self) -> None:
        """Give the parameters their fp32 masters back (end of training): the model is float32 again."""
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m.data
            p.grad = None
