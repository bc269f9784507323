"""Distillation from the original (`align.objective: kd | cpt+kd`): the divergences, the top-k cache,
the chunked loss, the loop's objective and resumption, on tiny models (2 layers, 64 dims, 128 tokens)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from loram_core.align import train_causal_lm
from loram_core.config import AlignConfig
from loram_core.distill import (
    TopkCache,
    build_topk_cache,
    cache_bytes,
    check_distillation,
    kl_sum,
    make_distiller,
    tail_gap_bound,
    teacher_topk,
    topk_kl_sum,
)
from loram_core.errors import ConfigError, LoramError
from tests.conftest import tiny_model
from tests.loram_core.test_align import _blocks, _cfg

VOCAB = 128


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    """A tiny model trained 40 steps on the bigram blocks, head included: peaked distributions, as a
    pretrained original's are (an untrained one is near uniform and its top-k holds little mass)."""
    model = tiny_model(seed=0)
    train_causal_lm(model, _blocks(), _cfg(steps=40, lr=1e-2, freeze_lm_head=False, seed=5))
    model.requires_grad_(False)
    return model.eval()


def _student() -> torch.nn.Module:
    return tiny_model(seed=3)


def _cache(tmp_path: Path, teacher: torch.nn.Module, k: int, temperature: float = 1.0) -> TopkCache:
    path = tmp_path / f"topk-{k}-{temperature}.safetensors"
    build_topk_cache(teacher, _blocks(), k, temperature, path, batch_size=16, chunk_tokens=100,
                     device=torch.device("cpu"))  # fmt: skip
    return TopkCache(path, _blocks())


# ---------------------------------------------------------------------------------- the divergences


def _megatron_logits_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Megatron-LM / ModelOpt `LogitsKLLoss.forward` (reverse=False, no tensor parallelism), transcribed:
    the per-token loss, summed over the vocabulary."""
    output_teacher = teacher.float() / temperature
    output_student = student.float() / temperature
    return torch.sum(
        F.kl_div(F.log_softmax(output_student, dim=-1), F.softmax(output_teacher, dim=-1), reduction="none"),
        dim=-1,
    )


def _torchtune_forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """torchtune `ForwardKLLoss.forward` (no ignored labels), transcribed: `-mean_i sum_v p log q`."""
    teacher_prob = F.softmax(teacher, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(student)
    student_logprob = F.log_softmax(student, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    return -torch.sum(prod_probs, dim=-1).view(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_is_the_forward_kl_of_megatron_and_torchtune(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(40, VOCAB, generator=g) * 3, torch.randn(40, VOCAB, generator=g) * 3
    torch.testing.assert_close(kl_sum(s, t, temperature), _megatron_logits_kl(s, t, temperature).sum())
    if temperature == 1.0:  # torchtune has no temperature; it drops the teacher's entropy (a constant)
        p = F.softmax(t, dim=-1)
        entropy = -(p * p.log()).sum(-1).mean()
        torch.testing.assert_close(kl_sum(s, t, 1.0) / 40, _torchtune_forward_kl(s, t) - entropy)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_kd_loss_is_t_squared_times_the_mean_token_kl(teacher, temperature: float) -> None:
    ids = _blocks()[:4].long()
    student = _student()
    expected = _megatron_logits_kl(student(ids).logits[:, :-1], teacher(ids).logits[:, :-1], temperature)
    distiller = make_distiller(AlignConfig(objective="kd", kd_temperature=temperature), teacher=teacher)
    got = distiller.loss(student, ids, None, None)
    torch.testing.assert_close(got, temperature**2 * expected.mean())


def test_cpt_kd_mixes_the_two_losses_by_kd_weight(teacher) -> None:
    ids = _blocks()[:4].long()
    student = _student()
    ce = student(ids, labels=ids).loss
    kd = make_distiller(AlignConfig(objective="kd"), teacher=teacher).loss(student, ids, None, None)
    mixed = make_distiller(AlignConfig(objective="cpt+kd", kd_weight=0.3), teacher=teacher)
    torch.testing.assert_close(mixed.loss(student, ids, None, None), 0.7 * ce + 0.3 * kd)


@pytest.mark.parametrize("mode", ["online", "topk"])
@pytest.mark.parametrize("chunk", [None, 37])
def test_kl_is_zero_for_a_student_equal_to_its_teacher(
    tmp_path, teacher, mode: str, chunk: int | None
) -> None:
    ids = _blocks()[:8].long()
    cfg = AlignConfig(objective="kd", kd_temperature=2.0, kd_mode=mode, kd_topk=16)
    feed = {"teacher": teacher} if mode == "online" else {"cache": _cache(tmp_path, teacher, 16, 2.0)}
    student = copy.deepcopy(teacher).requires_grad_(True)
    loss = make_distiller(cfg, **feed).loss(student, ids, torch.arange(8), chunk)
    loss.backward()
    # Measured: |loss| <= 2e-7 (fp32 rounding of two equal log-softmaxes); the KL of these two
    # different tiny models is about 3 (test_kd_brings_the_student_to_its_teacher).
    assert abs(loss.item()) < 1e-5
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-5


# ------------------------------------------------------------------------------- top-k and its bound


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_is_below_the_full_kl_by_at_most_the_lumped_tail_bound(teacher, temperature: float) -> None:
    """0 <= KL - KL_k = tail_p KL(p_tail || q_tail) <= tail_p log max(p_tail / q_tail) (loram_core.distill.kl)."""
    ids = _blocks()[:8].long()
    with torch.no_grad():
        s, t = (
            _student()(ids).logits[:, :-1].reshape(-1, VOCAB),
            teacher(ids).logits[:, :-1].reshape(-1, VOCAB),
        )
    full = kl_sum(s, t, temperature)
    gaps = []
    for k in (1, 4, 16, 64, 127, VOCAB):
        log_p, idx, log_tail = teacher_topk(t, k, temperature)
        gap = full - topk_kl_sum(s, log_p, idx, log_tail, temperature)
        # The chain rule, computed directly: the teacher's tail mass times the KL of the two tails.
        lp, lq = F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1)
        tail = torch.ones_like(lp, dtype=torch.bool).scatter(-1, idx, False)
        neg = torch.tensor(float("-inf"))
        lp_tail = torch.where(tail, lp, neg) - torch.logsumexp(torch.where(tail, lp, neg), -1, keepdim=True)
        lq_tail = torch.where(tail, lq, neg) - torch.logsumexp(torch.where(tail, lq, neg), -1, keepdim=True)
        inner = torch.where(tail, lp_tail.exp() * (lp_tail - lq_tail), torch.zeros(()))
        exact = (
            (torch.logsumexp(torch.where(tail, lp, neg), -1).exp() * inner.sum(-1)).sum()
            if k < VOCAB
            else 0.0
        )
        tol = 1e-5 * full.item()  # fp32 sums over 248 positions
        assert gap.item() >= -tol, k
        assert gap.item() == pytest.approx(float(exact), abs=tol), k
        assert gap.item() <= tail_gap_bound(s, t, k, temperature).sum().item() + tol, k
        gaps.append(gap.item())
    # More tokens kept, less left out.
    assert all(later <= earlier + tol for earlier, later in zip(gaps, gaps[1:], strict=False))
    assert abs(gaps[-1]) < tol
    # The trained teacher is peaked: 16 of its 128 tokens leave 0.14% of the KL out at T = 1, 3.9% at
    # T = 2 (softer), measured; the bounds leave 7x and 2x of that.
    assert gaps[2] < {1.0: 0.01, 2.0: 0.08}[temperature] * full.item()


def test_topk_cache_is_a_safetensors_file_of_the_teachers_rows(tmp_path, teacher) -> None:
    cache = _cache(tmp_path, teacher, 8, 2.0)
    blocks = _blocks()
    tensors = load_file(cache.path)
    assert tensors["logprobs"].shape == tensors["indices"].shape == (64, 31, 8)
    assert tensors["indices"].dtype == torch.int32 and tensors["log_tail"].shape == (64, 31)
    assert cache.nbytes > cache_bytes(64, 32, 8) and cache.k == 8 and cache.temperature == 2.0
    ids = blocks[[5, 40]].long()
    with torch.no_grad():
        want = teacher_topk(teacher(ids).logits[:, :-1].reshape(-1, VOCAB), 8, 2.0)
    got = cache.rows(torch.tensor([5, 40]))
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=1e-5, atol=1e-5)
    other = blocks.clone()
    other[0, 0] += 1
    with pytest.raises(LoramError, match="other training blocks"):
        TopkCache(cache.path, other)


@pytest.mark.parametrize("objective", ["kd", "cpt+kd"])
@pytest.mark.parametrize("mode", ["online", "topk"])
def test_chunked_kd_loss_and_gradients_equal_the_unchunked(
    tmp_path, teacher, objective: str, mode: str
) -> None:
    ids = _blocks()[8:12].long()
    cfg = AlignConfig(objective=objective, kd_weight=0.3, kd_temperature=2.0, kd_mode=mode, kd_topk=16)
    feed = {"teacher": teacher} if mode == "online" else {"cache": _cache(tmp_path, teacher, 16, 2.0)}
    distiller = make_distiller(cfg, **feed)
    results = []
    for chunk in (None, 29):
        student = _student()
        loss = distiller.loss(student, ids, torch.arange(8, 12), chunk)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------- in the training loop


def test_cpt_kd_with_kd_weight_zero_is_cpt(teacher) -> None:
    cfg = _cfg(steps=8, loss_chunk_tokens=40, grad_accum=2)
    plain, mixed = _student(), _student()
    a = train_causal_lm(plain, _blocks(), cfg)
    distiller = make_distiller(
        AlignConfig(objective="cpt+kd", kd_weight=0.0, kd_temperature=2.0), teacher=teacher
    )
    b = train_causal_lm(mixed, _blocks(), cfg, distiller=distiller)
    assert a.losses == b.losses
    for (name, p), q in zip(plain.named_parameters(), mixed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_kd_brings_the_student_to_its_teacher(teacher) -> None:
    distiller = make_distiller(AlignConfig(objective="kd"), teacher=teacher)
    student = _student()
    result = train_causal_lm(student, _blocks(), _cfg(steps=40, lr=1e-2, log_every=5, freeze_lm_head=False),
                             distiller=distiller)  # fmt: skip
    # Measured: the KL falls from 3.2 to 0.09-0.12 (last/first 0.03-0.04 over student seeds 1-3).
    assert result.losses[-1][1] < 0.2 * result.losses[0][1]


@pytest.mark.parametrize(
    ("mode", "optimizer", "sparse"), [("online", "adamw", False), ("topk", "flora", True)]
)
def test_kd_resumes_where_the_uninterrupted_run_goes(
    tmp_path, teacher, mode: str, optimizer: str, sparse: bool
) -> None:
    cfg = _cfg(steps=14, optimizer=optimizer, flora_rank=4, flora_kappa=5, grad_accum=2, loss_chunk_tokens=50)
    kd = AlignConfig(objective="cpt+kd", kd_weight=0.6, kd_temperature=2.0, kd_mode=mode, kd_topk=8)
    feed = {"teacher": teacher} if mode == "online" else {"cache": _cache(tmp_path, teacher, 8, 2.0)}
    name = "model.layers.0.mlp.down_proj.weight"
    masks = {name: torch.rand(64, 128, generator=torch.Generator().manual_seed(0)) > 0.5} if sparse else None
    straight = _student()
    train_causal_lm(straight, _blocks(), cfg, masks=masks, distiller=make_distiller(kd, **feed))
    interrupted = _student()
    ckpt = tmp_path / "ckpt"
    train_causal_lm(interrupted, _blocks(), cfg, checkpoint_dir=ckpt, stop_after=9, masks=masks,
                    distiller=make_distiller(kd, **feed))  # fmt: skip
    resumed = tiny_model(seed=99)
    result = train_causal_lm(resumed, _blocks(), cfg, checkpoint_dir=ckpt, masks=masks,
                             distiller=make_distiller(kd, **feed))  # fmt: skip
    assert result.resumed_from == 9
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n
    if sparse:
        assert torch.equal(dict(resumed.named_parameters())[name] != 0, masks[name])


# ------------------------------------------------------------------------------------------- refusals


def test_topk_above_the_vocabulary_is_refused_naming_key_and_fix() -> None:
    cfg = AlignConfig(objective="kd", kd_mode="topk", kd_topk=VOCAB + 1)
    with pytest.raises(
        ConfigError, match=r"align\.kd_topk=129 is larger than the vocabulary \(128 tokens\)"
    ) as e:
        check_distillation(cfg, VOCAB, torch.device("cpu"))
    assert "at most 128" in str(e.value) and "align.kd_mode=online" in str(e.value)
    cpu = torch.device("cpu")
    check_distillation(cfg.model_copy(update={"kd_topk": VOCAB}), VOCAB, cpu)  # k = vocab: the full KL
    check_distillation(cfg.model_copy(update={"objective": "cpt"}), VOCAB, cpu)  # unused: fine


def test_an_nf4_teacher_on_the_cpu_is_refused_naming_key_and_fix() -> None:
    cfg = AlignConfig(objective="cpt+kd", teacher_dtype="nf4")
    with pytest.raises(ConfigError, match=r"align\.teacher_dtype=nf4 needs a GPU") as e:
        check_distillation(cfg, VOCAB, torch.device("cpu"))
    assert "align.teacher_dtype=float32 or bfloat16" in str(e.value)
    check_distillation(cfg.model_copy(update={"objective": "cpt"}), VOCAB, torch.device("cpu"))
