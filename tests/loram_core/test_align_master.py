"""`align.precision: bf16-master`: bf16 weights for compute, AdamW stepping fp32 masters (CPU)."""

from __future__ import annotations

import pytest
import torch

from loram_core.align import train_causal_lm
from loram_core.align_master import MasterWeights
from tests.conftest import tiny_model
from tests.loram_core.test_align import _blocks, _cfg

LR = 1e-2


def test_master_update_is_fp32_adamw_on_the_bf16_gradient() -> None:
    ref, ours = tiny_model(), tiny_model()
    ref.lm_head.weight.requires_grad_(False)
    ours.lm_head.weight.requires_grad_(False)
    master = MasterWeights(ours)
    trained = [p for p in ref.parameters() if p.requires_grad]
    assert (
        all(p.dtype == torch.bfloat16 for p in master.params) and ours.lm_head.weight.dtype == torch.float32
    )
    opt_ref = torch.optim.AdamW(trained, lr=LR, weight_decay=0.1)
    opt_ours = torch.optim.AdamW(master.masters, lr=LR, weight_decay=0.1)
    opt_plain = torch.optim.AdamW(
        [p.detach().clone().requires_grad_() for p in trained], lr=LR, weight_decay=0.1
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in trained]
        for p, q, r, grad in zip(
            trained, master.params, opt_plain.param_groups[0]["params"], grads, strict=True
        ):
            p.grad = grad.clone()
            q.grad = grad.to(torch.bfloat16)  # what a bf16 backward hands over
            r.grad = grad.to(torch.bfloat16).float()
        master.gradients_to_masters()
        for opt in (opt_ref, opt_ours, opt_plain):
            opt.step()
            opt.zero_grad(set_to_none=True)
        master.masters_to_params()
    for m, p, r, q in zip(
        master.masters, trained, opt_plain.param_groups[0]["params"], master.params, strict=True
    ):
        # Exactly fp32 AdamW fed the bf16-rounded gradient, and the bf16 weights are the masters rounded.
        assert torch.equal(m, r) and torch.equal(q, m.to(torch.bfloat16))
        # Within bf16 rounding of fp32 AdamW on the exact gradient: Adam's step is lr * m / sqrt(v),
        # so a gradient relatively off by 2^-8 moves each of the 3 updates by about lr * 2^-8.
        torch.testing.assert_close(m, p, rtol=0, atol=3 * LR * 2**-7)
    assert optimizer_bytes(opt_ours) == 8 * sum(m.numel() for m in master.masters) + 4 * len(master.masters)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    from loram_core.optim import optimizer_state_bytes

    return optimizer_state_bytes(opt)


def test_training_with_masters_follows_fp32_and_ends_in_fp32() -> None:
    fp32, ours = tiny_model(), tiny_model()
    ref = train_causal_lm(fp32, _blocks(), _cfg(steps=20, lr=LR))
    got = train_causal_lm(ours, _blocks(), _cfg(steps=20, lr=LR, precision="bf16-master"))
    assert all(p.dtype == torch.float32 for p in ours.parameters())  # the masters are the weights again
    # bf16 compute: the loss curves agree to bf16's precision (measured: within 0.1%, model seeds 0-1).
    for (s1, a), (s2, b) in zip(ref.losses, got.losses, strict=True):
        assert s1 == s2 and b == pytest.approx(a, rel=1e-2)
    assert got.losses[-1][1] < 0.9 * got.losses[0][1]


def test_resume_with_masters_matches_the_uninterrupted_run(tmp_path) -> None:
    cfg = _cfg(steps=12, lr=LR, precision="bf16-master", checkpoint_every=5)
    straight = tiny_model()
    train_causal_lm(straight, _blocks(), cfg)
    train_causal_lm(tiny_model(), _blocks(), cfg, checkpoint_dir=tmp_path, stop_after=7)
    resumed = tiny_model(seed=99)
    result = train_causal_lm(resumed, _blocks(), cfg, checkpoint_dir=tmp_path)
    assert result.resumed_from == 7
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
