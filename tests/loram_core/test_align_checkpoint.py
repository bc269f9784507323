"""The checkpoint swap survives an interruption at each of its steps: resume, save again, same weights.

Each test stops the second save (step 10 of 20, a checkpoint every 5 steps) at one point by raising
there, checks what is left on disk, then resumes in a fresh model: the run must save its next
checkpoints and end on the uninterrupted run's weights. `test_align_kill.py` does the same with a
real SIGKILL.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from loram_core import align_checkpoint
from loram_core.align import train_causal_lm
from tests.conftest import tiny_model
from tests.loram_core.test_align import _blocks, _cfg


class Killed(Exception):
    """Stands for the process dying at this point."""


CFG = dict(steps=20, checkpoint_every=5, log_every=5, optimizer="adamw")


@pytest.fixture(scope="module")
def straight() -> dict[str, torch.Tensor]:
    """The uninterrupted run's final weights."""
    model = tiny_model()
    train_causal_lm(model, _blocks(), _cfg(**CFG))
    return dict(model.named_parameters())


def _kill_at(point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arm the interruption `point` of the second save."""
    saves = {"n": 0}
    real_save, real_rename, real_rmtree = torch.save, Path.rename, shutil.rmtree

    def save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if point == "writing" and saves["n"] == 2:  # model.safetensors is written, state.pt is not
            raise Killed
        return real_save(obj, f, *args, **kwargs)

    def rename(self: Path, target):
        old_exists = self.with_name("checkpoint.old").exists()
        if point == "before_park" and self.name == "checkpoint":
            raise Killed  # the new checkpoint is complete in .tmp; nothing renamed yet
        if point == "between_renames" and self.name == "checkpoint.tmp" and old_exists:
            raise Killed  # the current one parked as .old, the new one still .tmp
        return real_rename(self, target)

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name == "checkpoint.old" and path.exists():
            if point == "after_swap":
                raise Killed  # the new one in place, the old one not yet removed
            if point == "mid_delete":
                (path / "model.safetensors").unlink()
                raise Killed  # the old one partly removed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(align_checkpoint.shutil, "rmtree", rmtree)


# point -> (folders left next to each other, the step the resumed run starts from)
POINTS = {
    "writing": ({"checkpoint", "checkpoint.tmp"}, 5),
    "before_park": ({"checkpoint", "checkpoint.tmp"}, 5),
    "between_renames": ({"checkpoint.old", "checkpoint.tmp"}, 5),
    "after_swap": ({"checkpoint", "checkpoint.old"}, 10),
    "mid_delete": ({"checkpoint", "checkpoint.old"}, 10),
}


@pytest.mark.parametrize("point", POINTS)
def test_interrupted_swap_resumes_and_saves_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight: dict[str, torch.Tensor], point: str
) -> None:
    left, step = POINTS[point]
    with monkeypatch.context() as patch:
        _kill_at(point, patch)
        with pytest.raises(Killed):
            train_causal_lm(tiny_model(), _blocks(), _cfg(**CFG), checkpoint_dir=tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == left

    saved = []
    real = align_checkpoint.save_checkpoint
    monkeypatch.setattr(
        "loram_core.align.save_checkpoint",
        lambda d, m, s, t, *a: saved.append(t["step"]) or real(d, m, s, t, *a),
    )
    resumed = tiny_model(seed=99)  # a fresh process: other initial weights, all restored from disk
    result = train_causal_lm(resumed, _blocks(), _cfg(**CFG), checkpoint_dir=tmp_path)
    assert result.resumed_from == step
    assert saved == list(range(step + 5, 20, 5))  # every later save succeeded (at HEAD 07d12f4 the
    # first one after `after_swap` failed: "Directory not empty: checkpoint -> checkpoint.old")
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint"}
    for name, value in straight.items():
        assert torch.equal(dict(resumed.named_parameters())[name], value), name


def test_settle_keeps_the_only_checkpoint_and_drops_partial_ones(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint"
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / align_checkpoint.MARKER).write_text("{}")
    (tmp_path / "checkpoint.tmp").mkdir()  # never completed
    align_checkpoint.settle(ckpt)
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint"}
    assert align_checkpoint.find_checkpoint(ckpt) == ckpt
    shutil.rmtree(ckpt)
    (tmp_path / "checkpoint.tmp").mkdir()
    align_checkpoint.settle(ckpt)  # a first save killed before its rename: nothing to resume from
    assert not any(tmp_path.iterdir()) and align_checkpoint.find_checkpoint(ckpt) is None
