"""The align step with the original as teacher: its key, the top-k cache in the work dir, the memory
plan, and the refusals (step and preflight), on tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loram_core import steps
from loram_core.config import AlignConfig, RunContext, fingerprint, load_config
from loram_core.data import Blocks, save_blocks
from loram_core.errors import ConfigError, LoramError
from loram_core.prune import Masks, save_masks
from loram_core.steps import alignment
from tests.conftest import tiny_model, tiny_tokenizer
from tests.loram_core.test_align import _blocks

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[str, str, str]:
    """(base: the teacher, pruned: a different tiny model with masks, blocks file)."""
    base, pruned = tmp_path / "base", tmp_path / "pruned"
    tiny_model(seed=1).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    tiny_model(seed=2).save_pretrained(pruned)
    tiny_tokenizer().save_pretrained(pruned)
    save_masks(Masks(strategy="random"), pruned / "masks" / "masks.safetensors")
    blocks = tmp_path / "blocks.safetensors"
    save_blocks(blocks, Blocks(train=_blocks(), heldout=_blocks(8)), {})
    return str(base), str(pruned), str(blocks)


def _align(**kw) -> AlignConfig:
    base = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=2, checkpoint_every=3,
                precision="fp32", loss_chunk_tokens=40)  # fmt: skip
    return AlignConfig(**{**base, **kw})


def test_cpt_keeps_the_key_it_had_before_distillation_existed() -> None:
    """`align-5a8001efa48b0502` is what main at 43c056e (before `align.objective`, and before
    `align.eval_every`) computed for the demo preset's align section on these paths (the preset then
    aligned 200 steps with 20 of warm-up)."""
    cfg = load_config(
        REPO / "configs" / "demo.yaml", ["workdir=/w", "align.steps=200", "align.warmup_steps=20"]
    )
    args = ("/p/pruned", "/p/blocks.safetensors", "cpu", torch.bfloat16)
    assert fingerprint(alignment.align_key(cfg.align, *args)) == "5a8001efa48b0502"
    # Distillation keys and a base do not enter a cpt key; they do enter a kd one, with the teacher.
    other = cfg.align.model_copy(update={"kd_temperature": 3.0, "kd_mode": "topk"})
    assert fingerprint(alignment.align_key(other, *args, base_dir="/b")) == "5a8001efa48b0502"
    kd = alignment.align_key(cfg.align.model_copy(update={"objective": "kd"}), *args, base_dir="/b")
    assert kd["teacher"] == "/b" and kd["align"]["objective"] == "kd"
    with pytest.raises(LoramError, match="given no base_dir"):
        alignment.align_key(cfg.align.model_copy(update={"objective": "kd"}), *args)


def test_topk_step_computes_the_cache_once_and_later_runs_read_it(tmp_path, inputs, monkeypatch) -> None:
    base, pruned, blocks = inputs
    ctx = RunContext(workdir=str(tmp_path / "work"), device="cpu", dtype="float32")
    cfg = _align(objective="kd", kd_mode="topk", kd_topk=16, kd_temperature=2.0)
    out = steps.align(cfg, ctx, pruned, blocks, base_dir=base)
    caches = sorted((tmp_path / "work").glob("kd-topk-*"))
    assert len(caches) == 1 and not list((tmp_path / "work").glob("*.tmp"))
    meta = json.loads((caches[0] / "topk.json").read_text())
    assert meta["k"] == 16 and meta["temperature"] == 2.0 and meta["teacher_dtype"] == "float32"
    assert meta["base"] == steps.base_fingerprint(base)
    log = json.loads((Path(out) / "train_log.json").read_text())
    plan = log["memory_plan"]
    assert plan["topk_cache_file"] == (caches[0] / "topk.safetensors").stat().st_size > 0
    assert plan["teacher_resident"] is False and plan["teacher_weights"] > 0
    assert plan["optimizer"] == 2 * plan["gradients"]  # AdamW: two float32 moments per trained weight
    assert log["losses"] and all(loss > 0 for _, loss in log["losses"])
    # Another run on the same base and corpus (other steps, another objective): the cache is read back.
    import loram_core.distill.topk as topk

    monkeypatch.setattr(topk, "build_topk_cache", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    again = steps.align(
        cfg.model_copy(update={"steps": 4, "objective": "cpt+kd"}), ctx, pruned, blocks, base_dir=base
    )
    assert again != out and sorted((tmp_path / "work").glob("kd-topk-*")) == caches


def test_online_step_logs_its_memory_plan_before_training(tmp_path, inputs, caplog) -> None:
    base, pruned, blocks = inputs
    ctx = RunContext(workdir=str(tmp_path / "work"), device="cpu", dtype="float32")
    seen: list[str] = []
    with caplog.at_level("INFO", logger="loram_core.steps.teacher"):
        out = steps.align(_align(objective="kd"), ctx, pruned, blocks,
                          progress=lambda e: seen.append(caplog.text), base_dir=base)  # fmt: skip
    assert "alignment memory plan: teacher weights 0.3 MiB" in seen[0]  # logged before the first step
    plan = json.loads((Path(out) / "train_log.json").read_text())["memory_plan"]
    assert plan["teacher_resident"] is True and plan["teacher_weights"] == 4 * sum(
        p.numel() for p in tiny_model().parameters()
    )
    assert plan["device_total"] > plan["teacher_weights"] + plan["student_weights"]
    assert not list((tmp_path / "work").glob("kd-topk-*"))


def test_the_step_refuses_before_any_work(tmp_path, inputs) -> None:
    base, pruned, blocks = inputs
    ctx = RunContext(workdir=str(tmp_path / "work"), device="cpu")
    with pytest.raises(ConfigError, match=r"align\.kd_topk=500 is larger than the vocabulary"):
        steps.align(_align(objective="kd", kd_mode="topk", kd_topk=500), ctx, pruned, blocks, base_dir=base)
    with pytest.raises(ConfigError, match=r"align\.teacher_dtype=nf4 needs a GPU"):
        steps.align(_align(objective="cpt+kd", teacher_dtype="nf4"), ctx, pruned, blocks, base_dir=base)
    with pytest.raises(LoramError, match="given no base_dir"):
        steps.align(_align(objective="kd"), ctx, pruned, blocks)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["align.kd_mode=topk", "align.kd_topk=4096"],
            "align.kd_topk=4096 is larger than the vocabulary (2,048",
        ),
        (["align.teacher_dtype=nf4", "device=cpu"], "align.teacher_dtype=nf4 needs a GPU"),
    ],
)
def test_preflight_refuses_what_cannot_run(tmp_path, overrides: list[str], expected: str) -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [f"workdir={tmp_path / 'w'}", "align.objective=kd", "publish.enabled=false", *overrides])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        steps.preflight(cfg)
    assert expected in str(err.value)
    steps.preflight(cfg.model_copy(update={"align": cfg.align.model_copy(update={"objective": "cpt"})}))
