import pytest
import torch

from loram_core.align import apply_masks, cosine_with_warmup, sample_positions, train_causal_lm
from loram_core.config import AlignConfig
from tests.conftest import tiny_model


def _blocks(n: int = 64, seq: int = 32) -> torch.Tensor:
    # Learnable text: the next token is a fixed permutation of the current one (a bigram language).
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    out = torch.empty(n, seq, dtype=torch.int64)
    out[:, 0] = torch.arange(n) % 128
    for t in range(1, seq):
        out[:, t] = perm[out[:, t - 1]]
    return out.to(torch.int32)


def _cfg(**kw) -> AlignConfig:
    base = dict(
        steps=30,
        batch_size=4,
        lr=3e-3,
        warmup_steps=3,
        log_every=5,
        checkpoint_every=10,
        seed=1,
        precision="fp32",
    )
    base.update(kw)
    return AlignConfig(**base)


def test_loss_goes_down_and_lm_head_stays_frozen() -> None:
    model = tiny_model()
    head = model.lm_head.weight.detach().clone()
    result = train_causal_lm(model, _blocks(), _cfg(steps=40, lr=1e-2))
    # Measured: last/first 0.735-0.743 over model seeds 0-2 (identical at 1 and 2 threads); 0.8
    # leaves 7x the seed-to-seed spread, a far larger perturbation than another machine's rounding.
    assert result.losses[-1][1] < 0.8 * result.losses[0][1]
    assert torch.equal(model.lm_head.weight, head)
    assert result.tokens == 40 * 4 * 32 and result.tokens_per_second > 0


def test_sparse_masks_survive_every_step() -> None:
    model = tiny_model()
    name = "model.layers.0.mlp.down_proj.weight"
    mask = torch.rand(64, 128, generator=torch.Generator().manual_seed(0)) > 0.5
    apply_masks(model, {name: mask})
    seen = []
    train_causal_lm(
        model,
        _blocks(),
        _cfg(steps=12, log_every=1),
        masks={name: mask},
        progress=lambda e: seen.append(torch.equal(dict(model.named_parameters())[name] != 0, mask)),
    )
    assert len(seen) == 12 and all(seen)


@pytest.mark.parametrize("optimizer", ["adamw", "flora"])
def test_resume_from_checkpoint_matches_the_uninterrupted_run(tmp_path, optimizer) -> None:
    cfg = _cfg(steps=20, optimizer=optimizer, flora_rank=4, flora_kappa=5, grad_accum=2)
    straight = tiny_model()
    train_causal_lm(straight, _blocks(), cfg)
    interrupted = tiny_model()
    train_causal_lm(interrupted, _blocks(), cfg, checkpoint_dir=tmp_path, stop_after=13)
    resumed = tiny_model(seed=99)  # a fresh process: different initial weights, restored from disk
    result = train_causal_lm(resumed, _blocks(), cfg, checkpoint_dir=tmp_path)
    assert result.resumed_from == 13
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    f = cosine_with_warmup(10, 100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


def test_data_order_is_a_seeded_pure_function_of_position() -> None:
    a = sample_positions(0, 70, 64, seed=3)
    assert sorted(a[:64].tolist()) == list(range(64))  # one epoch visits every block once
    assert torch.equal(a[40:], sample_positions(40, 30, 64, seed=3))
    assert not torch.equal(a, sample_positions(0, 70, 64, seed=4))
