"""SparseGPT's `--true-sequential` within a layer: later groups calibrate on the pruned earlier ones."""

from __future__ import annotations

import pytest
import torch

from loram_core.config import PruneConfig
from loram_core.models import load_model
from loram_core.prune import prune_checkpoint, sequential


@pytest.fixture
def recorded_hessians(monkeypatch):
    """A copy of every Hessian `_solve` receives, in the order of the calls."""
    seen: list[torch.Tensor] = []
    solve = sequential._solve

    def recording(weight, hessian, cfg, ratio, owned=False):
        seen.append(hessian.clone())
        return solve(weight, hessian, cfg, ratio, owned)

    monkeypatch.setattr(sequential, "_solve", recording)
    return seen


def _inputs_of(module, model, calib) -> torch.Tensor:
    """2/N X^T X of `module`'s inputs when `model` runs on `calib` (what SparseGPT's add_batch accumulates)."""
    xs = []
    handle = module.register_forward_pre_hook(
        lambda _m, args: xs.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        model(calib)
    handle.remove()
    x = torch.cat(xs).double()
    return (2 * x.T @ x / x.shape[0]).float()


def test_true_sequential_calibrates_o_gate_up_down_on_the_pruned_earlier_groups(
    tiny_checkpoint, tmp_path, recorded_hessians
) -> None:
    calib = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(2))
    cfg = PruneConfig(strategy="semi", calib_samples=8, keep_first=0, keep_last=3)  # layer 0 only
    masks = prune_checkpoint(tiny_checkpoint, tmp_path / "plain", cfg, calib)
    plain = list(recorded_hessians)
    recorded_hessians.clear()
    seq_masks = prune_checkpoint(
        tiny_checkpoint, tmp_path / "seq", cfg.model_copy(update={"true_sequential": True}), calib
    )
    seq = list(recorded_hessians)
    order = ["q", "k", "v", "o", "gate", "up", "down"]  # both modes solve in this order
    assert len(plain) == len(seq) == 7
    for name, h_plain, h_seq in zip(order, plain, seq, strict=True):
        if name in ("q", "k", "v"):  # the layer's input: nothing in the layer is pruned before it
            torch.testing.assert_close(h_seq, h_plain, rtol=0, atol=0)
        else:
            assert (h_seq - h_plain).abs().max() > 1e-3 * h_plain.abs().max(), name
    # What true-sequential's o saw: the dense layer with only q/k/v replaced by their pruned weights.
    dense = load_model(tiny_checkpoint)
    pruned = load_model(tmp_path / "seq")
    attn, pruned_attn = dense.model.layers[0].self_attn, pruned.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, name).weight.data.copy_(getattr(pruned_attn, name).weight.data)
    torch.testing.assert_close(seq[3], _inputs_of(attn.o_proj, dense, calib), rtol=1e-4, atol=1e-5)
    # down saw gate/up pruned too (and the pruned attention before them).
    attn.o_proj.weight.data.copy_(pruned_attn.o_proj.weight.data)
    mlp, pruned_mlp = dense.model.layers[0].mlp, pruned.model.layers[0].mlp
    for name in ("gate_proj", "up_proj"):
        getattr(mlp, name).weight.data.copy_(getattr(pruned_mlp, name).weight.data)
    torch.testing.assert_close(seq[6], _inputs_of(mlp.down_proj, dense, calib), rtol=1e-4, atol=1e-5)
    # Masks stay 2:4 in both modes, and the modes choose differently.
    for m in (masks, seq_masks):
        for name, keep in m.keep_masks().items():
            rows, cols = keep.shape
            assert torch.all(keep.view(rows, cols // 4, 4).sum(-1) == 2), name
    differ = [n for n, k in seq_masks.keep_masks().items() if not torch.equal(k, masks.keep_masks()[n])]
    assert "model.layers.0.mlp.down_proj.weight" in differ


def test_true_sequential_is_recorded_and_off_by_default(tiny_checkpoint, tmp_path) -> None:
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    assert PruneConfig().true_sequential is False  # SparseGPT's `--true-sequential` is opt-in too
    prune_checkpoint(tiny_checkpoint, tmp_path / "p", PruneConfig(strategy="unstructured", true_sequential=True,
                                                                  calib_samples=4), calib)  # fmt: skip
    loram = load_model(tmp_path / "p").config.loram
    assert loram["true_sequential"] is True and loram["layer_ratios"] == [0.5] * 4
    assert loram["layerwise"] == "uniform"
