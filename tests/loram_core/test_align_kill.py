"""A training run killed with SIGKILL and started again ends where an uninterrupted run ends.

Two kinds of kill: from outside at whatever moment the run has reached (anywhere past the
checkpoint of step 10), and by the run itself at a chosen point of the checkpoint swap (between its
two renames, or after them with the old folder still there). No test waits on a clock: the victim
cannot finish on its own (it blocks after its last step), so the kill always lands mid-run however
slow the machine is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, shutil, signal, sys, threading, time
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from loram_core import align_checkpoint
    from loram_core.align import train_causal_lm
    from loram_core.config import AlignConfig
    from tests.conftest import tiny_model
    from tests.loram_core.test_align import _blocks

    torch.set_num_threads(1)
    out, ckpt, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = AlignConfig(steps=40, batch_size=4, lr=3e-3, warmup_steps=4, checkpoint_every=5, log_every=1,
                      precision="fp32", optimizer=sys.argv[4], flora_rank=4, flora_kappa=7, seed=2)
    pace = None
    if mode == "slow":  # leaves time to be killed mid-run; never finishes on its own
        def pace(event):
            time.sleep(0.05)
            if event["step"] == event["total"]:
                threading.Event().wait()
    elif mode.startswith("kill:"):  # SIGKILL itself at that point of the second save (step 10)
        point, rename, rmtree = mode[5:], Path.rename, align_checkpoint.shutil.rmtree
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        def renaming(self, target):
            if point == "between_renames" and self.name == "checkpoint.tmp" and self.with_name("checkpoint.old").exists():
                die()
            return rename(self, target)
        def removing(path, *args, **kwargs):
            if point == "after_swap" and Path(path).name == "checkpoint.old" and Path(path).exists():
                die()
            return rmtree(path, *args, **kwargs)
        Path.rename, align_checkpoint.shutil.rmtree = renaming, removing
    model = tiny_model()
    result = train_causal_lm(model, _blocks(), cfg, checkpoint_dir=ckpt if ckpt != "-" else None, progress=pace)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    print(result.resumed_from)
    """
)


def _run(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )


def _resume_and_compare(tmp_path: Path, ckpt: Path, optimizer: str) -> int:
    """Resume from `ckpt` and train straight, in two processes; the final weights must be equal."""
    resumed = _run(tmp_path, str(tmp_path / "resumed.safetensors"), str(ckpt), "fast", optimizer)
    straight = _run(tmp_path, str(tmp_path / "straight.safetensors"), "-", "fast", optimizer)
    resumed_from = resumed.communicate()[0].strip()
    straight.communicate()
    assert resumed.returncode == 0 and straight.returncode == 0
    a, b = load_file(tmp_path / "resumed.safetensors"), load_file(tmp_path / "straight.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    return int(resumed_from)


def _kill_and_resume(tmp_path: Path, optimizer: str) -> None:
    ckpt = tmp_path / "ckpt"
    victim = _run(tmp_path, str(tmp_path / "never.safetensors"), str(ckpt), "slow", optimizer)
    trainer = ckpt / "checkpoint" / "trainer.json"
    while True:  # wait until a checkpoint past step 10 exists, then kill
        assert victim.poll() is None, "the victim exited before it could be killed"
        if trainer.is_file():
            try:
                if json.loads(trainer.read_text())["step"] >= 10:
                    break
            except (json.JSONDecodeError, FileNotFoundError):
                pass
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "never.safetensors").exists()
    assert 10 <= _resume_and_compare(tmp_path, ckpt, optimizer) < 40


def test_sigkill_and_resume_reaches_the_uninterrupted_weights_adamw(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, "adamw")


def test_sigkill_and_resume_reaches_the_uninterrupted_weights_flora(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, "flora")


@pytest.mark.parametrize(
    ("point", "left", "step"),
    [
        ("between_renames", {"checkpoint.old", "checkpoint.tmp"}, 5),
        ("after_swap", {"checkpoint", "checkpoint.old"}, 10),
    ],
)
def test_sigkill_inside_the_checkpoint_swap_resumes(
    tmp_path: Path, point: str, left: set[str], step: int
) -> None:
    """Killed inside the swap (at HEAD 07d12f4 the resumed run then died at its next save with
    "Directory not empty: 'ckpt/checkpoint' -> 'ckpt/checkpoint.old'")."""
    ckpt = tmp_path / "ckpt"
    victim = _run(tmp_path, str(tmp_path / "never.safetensors"), str(ckpt), f"kill:{point}", "flora")
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert {p.name for p in ckpt.iterdir()} == left
    assert _resume_and_compare(tmp_path, ckpt, "flora") == step
