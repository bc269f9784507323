"""What one optimizer step sees: the averaged gradient, clipped; sparse masks on gradients; the head.

HF Trainer semantics for accumulation (each pass's loss scaled by 1 / grad_accum, so the step's
gradient is the mean over all `batch_size * grad_accum` samples) and llm-compressor's constant
sparsity (gradients of pruned weights zeroed before the step, the weights after it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from loram_core.align import apply_masks, train_causal_lm
from tests.conftest import tiny_model
from tests.loram_core.test_align import _blocks, _cfg


def _reference_norm(samples: torch.Tensor) -> float:
    """The gradient norm of the mean loss over `samples`, computed the plain way (head frozen)."""
    model = tiny_model().train()
    model.lm_head.weight.requires_grad_(False)
    ids = samples.long()
    model(input_ids=ids, labels=ids).loss.backward()
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()


def _step_grad_norms(**cfg) -> tuple[list[float], list[float]]:
    """Pre-clip norms (progress) and the norms the optimizer steps with (a step pre-hook)."""
    reported, stepped = [], []

    def at_step(optimizer, args, kwargs) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        stepped.append(torch.nn.utils.get_total_norm(grads).item())

    handle = register_optimizer_step_pre_hook(at_step)
    try:
        train_causal_lm(tiny_model(), _blocks(), _cfg(log_every=1, warmup_steps=0, **cfg),
                        progress=lambda e: reported.append(e["grad_norm"]))  # fmt: skip
    finally:
        handle.remove()
    return reported, stepped


@pytest.mark.parametrize(("batch_size", "grad_accum", "micro"), [(8, 1, None), (4, 2, None), (2, 4, None),
                                                                  (4, 2, 1)])  # fmt: skip
def test_accumulation_averages_the_gradient_over_all_samples(
    batch_size: int, grad_accum: int, micro: int | None
) -> None:
    """Step 1 sees the same 8 samples however they are split: same pre-clip norm as one mean loss."""
    from loram_core.align import sample_positions

    samples = _blocks()[sample_positions(0, 8, 64, seed=1)]
    expected = _reference_norm(samples)
    reported, _ = _step_grad_norms(steps=1, batch_size=batch_size, grad_accum=grad_accum,
                                   micro_batch_size=micro, max_grad_norm=None)  # fmt: skip
    # Summing the passes instead (HEAD 07d12f4) gives grad_accum x this norm.
    assert reported[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_max_grad_norm_clips_the_averaged_gradient(grad_accum: int) -> None:
    from loram_core.align import sample_positions

    true = _reference_norm(_blocks()[sample_positions(0, 8, 64, seed=1)])
    batch = 8 // grad_accum
    # Above the mean's norm: nothing is clipped, whatever grad_accum (a sum would be clipped at 2 and 4).
    reported, stepped = _step_grad_norms(
        steps=1, batch_size=batch, grad_accum=grad_accum, max_grad_norm=1.5 * true
    )
    assert reported[0] == pytest.approx(true, rel=1e-5) and stepped[0] == pytest.approx(true, rel=1e-5)
    # Below it: the step uses exactly max_grad_norm.
    reported, stepped = _step_grad_norms(
        steps=1, batch_size=batch, grad_accum=grad_accum, max_grad_norm=0.5 * true
    )
    assert reported[0] == pytest.approx(true, rel=1e-5) and stepped[0] == pytest.approx(0.5 * true, rel=1e-5)


MASKED = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight")


def _masks() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = tiny_model()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    down = torch.rand(shapes[MASKED[0]], generator=g) > 0.5  # unstructured 50%
    scores = torch.rand(shapes[MASKED[1]], generator=g).view(-1, 4)  # 2:4 on q_proj
    semi = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(2, dim=1).indices, True)
    return {MASKED[0]: down, MASKED[1]: semi.view(shapes[MASKED[1]])}


def _train_masked(tmp_path: Path, optimizer: str, plant: bool) -> tuple[dict, dict]:
    """3 steps with masks; `plant` adds a large gradient at pruned positions only, at every backward."""
    model, masks = tiny_model(), _masks()
    apply_masks(model, masks)
    params = dict(model.named_parameters())
    if plant:
        g = torch.Generator().manual_seed(7)
        for name, keep in masks.items():
            planted = 100.0 * torch.randn(keep.shape, generator=g) * ~keep
            params[name].register_hook(lambda grad, planted=planted: grad + planted)
    cfg = _cfg(steps=4, optimizer=optimizer, flora_rank=4, flora_kappa=2, max_grad_norm=1.0, weight_decay=0.1)
    train_causal_lm(model, _blocks(), cfg, checkpoint_dir=tmp_path, masks=masks, stop_after=3)
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)["optimizer"]["state"]
    return load_file(tmp_path / "checkpoint" / "model.safetensors"), state


@pytest.mark.parametrize("optimizer", ["adamw", "flora"])
def test_gradient_planted_on_pruned_positions_changes_nothing(tmp_path: Path, optimizer: str) -> None:
    """Pruned positions count nowhere: not in clipping, not in AdamW's or FLoRA's state, not in any
    kept weight (at HEAD 07d12f4 the planted gradient dominated the clip norm, and FLoRA's
    projection spread it over kept weights)."""
    clean, clean_state = _train_masked(tmp_path / "clean", optimizer, plant=False)
    planted, planted_state = _train_masked(tmp_path / "planted", optimizer, plant=True)
    for name in clean:
        assert torch.equal(clean[name], planted[name]), name
    for index in clean_state:
        for key, value in clean_state[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(planted_state[index][key])), (
                index,
                key,
            )
    masks = _masks()
    for name, keep in masks.items():
        assert not planted[name][~keep].any() and planted[name][keep].all(), name
    if optimizer == "adamw":  # its moments have positions: zero at every pruned one
        trainable = [n for n, p in tiny_model().named_parameters() if n != "lm_head.weight"]
        for name, keep in masks.items():
            moments = planted_state[trainable.index(name)]
            assert not moments["exp_avg"][~keep].any() and not moments["exp_avg_sq"][~keep].any()
            assert moments["exp_avg"][keep].any()


def test_tied_head_freezes_the_shared_embedding_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """`freeze_lm_head` on a tied model freezes the one matrix (input embedding included), with a warning;
    `freeze_lm_head=false` trains it; an untied model keeps training its embedding."""
    tied = tiny_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    before = {n: p.detach().clone() for n, p in tied.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="loram_core.align"):
        train_causal_lm(tied, _blocks(), _cfg(steps=3))
    warned = [r.getMessage() for r in caplog.records if "tied embeddings" in r.getMessage()]
    assert len(warned) == 1 and "model.embed_tokens.weight = lm_head.weight" in warned[0]
    changed = {n for n, p in tied.named_parameters() if not torch.equal(p, before[n])}
    assert "model.embed_tokens.weight" not in changed and "model.layers.0.mlp.down_proj.weight" in changed

    caplog.clear()
    trained = tiny_model(tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="loram_core.align"):
        train_causal_lm(trained, _blocks(), _cfg(steps=3, freeze_lm_head=False))
    assert not caplog.records
    assert not torch.equal(trained.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert trained.lm_head.weight is trained.model.embed_tokens.weight

    untied = tiny_model()
    embed, head = untied.model.embed_tokens.weight.detach().clone(), untied.lm_head.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="loram_core.align"):
        train_causal_lm(untied, _blocks(), _cfg(steps=3))
    assert not caplog.records
    assert torch.equal(untied.lm_head.weight, head) and not torch.equal(
        untied.model.embed_tokens.weight, embed
    )
