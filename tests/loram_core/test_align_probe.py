"""`micro_batch_size: auto` (train mode, optimizer state reserved), the peak table, NF4's eval dtype (CPU)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import loram_core.align as align
import loram_core.align_probe as probe
from loram_core.align_probe import halve_until_it_fits, planned_state_bytes
from loram_core.config import AlignConfig
from loram_core.device import peak_for_name
from loram_core.optim import build_optimizer, optimizer_state_bytes
from tests.conftest import tiny_model


class _FakeOOM(Exception):
    """Stands for torch.cuda.OutOfMemoryError on a machine without a GPU."""


@pytest.mark.parametrize("optimizer", ["adamw", "flora"])
def test_planned_state_is_what_the_first_step_allocates(optimizer: str) -> None:
    model = tiny_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, lr=1e-3, weight_decay=0.0, flora_rank=4)
    planned = planned_state_bytes(opt)
    n = sum(p.numel() for p in params)
    if optimizer == "adamw":
        assert planned == 8 * n + 4 * len(params)  # two fp32 moments and a step per parameter
    else:
        assert planned < 8 * n  # factored: less than AdamW's
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == planned
    assert planned_state_bytes(opt) == 0  # already held: nothing more to reserve (a resumed run)


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_auto_probe_trains_with_checkpointing_and_reserves_the_state(monkeypatch, caplog, precision) -> None:
    model = tiny_model()
    blocks = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    cfg = AlignConfig(
        steps=1, batch_size=8, micro_batch_size="auto", gradient_checkpointing=True, warmup_steps=0,
        precision=precision,
    )  # fmt: skip
    device = torch.device("cpu")
    run = align._prepare(model, cfg, None, device, blocks.shape[1], {})
    model.eval()  # as the step hands it over: the probe must switch to train mode itself
    seen: list[tuple[int, bool, bool, int]] = []
    reserved: list[int] = []
    real_forward_backward = align._forward_backward

    def fake_reserve(nbytes: int, dev: torch.device) -> torch.Tensor:
        reserved.append(nbytes)
        return torch.empty(0)

    def fake_forward_backward(run_, batch, micro, dev, scale=1.0, sync=True):
        seen.append(
            (batch.shape[0], run_.model.training, run_.inner.is_activation_checkpointing, reserved[-1])
        )
        real_forward_backward(run_, batch, micro, dev, scale, sync)  # real gradients, then "out of memory"
        if batch.shape[0] > 2:
            raise _FakeOOM
        return 0.0

    monkeypatch.setattr(probe, "reserve_memory", fake_reserve)
    monkeypatch.setattr(align, "_forward_backward", fake_forward_backward)
    with caplog.at_level(logging.INFO, logger="loram_core.align"):
        size = align._probe_micro_batch(run, cfg, blocks, device, _FakeOOM)
    assert size == 2
    state = 8 * sum(p.numel() for p in run.params) + 4 * len(run.params)
    assert seen == [(8, True, True, state), (4, True, True, state), (2, True, True, state)]
    # The probe's gradients are discarded: the model's (bf16 with masters) and the optimizer's.
    assert all(p.grad is None for p in model.parameters()) and all(p.grad is None for p in run.params)
    assert "2 of 8 samples per pass" in caplog.text


def test_halving_reports_zero_when_one_sample_does_not_fit() -> None:
    def never(_size: int) -> None:
        raise _FakeOOM

    assert halve_until_it_fits(8, never, _FakeOOM) == 0
    assert halve_until_it_fits(6, lambda s: None if s <= 3 else never(s), _FakeOOM) == 3


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989.4),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA L40", 181.05),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L4", 121),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table_takes_the_longest_matching_name(name: str, tflops: float | None) -> None:
    peak = peak_for_name(name)
    assert (peak is None) if tflops is None else peak == pytest.approx(tflops * 1e12)


def test_nf4_is_scored_with_the_other_models_side_module_dtype(monkeypatch, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from loram_core.config import load_config
    from loram_core.steps import evaluation

    loads: list[tuple[str, object]] = []

    def fake_load_model(path, dtype=torch.float32, **kwargs):
        loads.append((Path(path).name, dtype))
        return tiny_model()

    eval_file = tmp_path / "eval.safetensors"
    save_file({"blocks": torch.zeros(2, 8, dtype=torch.int32)}, str(eval_file))
    monkeypatch.setattr(evaluation, "load_model", fake_load_model)
    monkeypatch.setattr(evaluation, "perplexity", lambda *a, **k: 10.0)
    monkeypatch.setattr(evaluation, "prepare_eval", lambda *a: str(eval_file))
    monkeypatch.setattr(evaluation, "load_config", lambda _path: None)
    monkeypatch.setattr(evaluation, "plan", lambda *a: type("P", (), {"to_dict": lambda self: {}})())
    monkeypatch.setattr(evaluation, "size_summary", lambda *a, **k: {})
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "demo.yaml", [f"workdir={tmp_path / 'w'}", "device=cpu",
                                                        "evaluate.dtype=bfloat16"])  # fmt: skip
    dirs = {name: tmp_path / name for name in ("base", "pruned", "aligned", "nf4")}
    result = evaluation.evaluate(cfg, *(str(d) for d in dirs.values()), None)
    assert loads == [(name, torch.bfloat16) for name in dirs]
    assert "aligned_nf4_ppl" in result["metrics"]
