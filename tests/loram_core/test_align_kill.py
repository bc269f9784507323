"""A training run killed with SIGKILL and started again ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from safetensors.torch import save_file
    from loram_core.align import train_causal_lm
    from loram_core.config import AlignConfig
    from tests.conftest import tiny_model
    from tests.loram_core.test_align import _blocks

    torch.set_num_threads(1)
    out, ckpt, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
    cfg = AlignConfig(steps=40, batch_size=4, lr=3e-3, warmup_steps=4, checkpoint_every=5, log_every=1,
                      precision="fp32", optimizer=sys.argv[4], flora_rank=4, flora_kappa=7, seed=2)
    model = tiny_model()
    pace = (lambda e: time.sleep(0.15)) if slow else None  # leaves time to be killed mid-run
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


def _kill_and_resume(tmp_path: Path, optimizer: str) -> None:
    ckpt = tmp_path / "ckpt"
    victim = _run(tmp_path, str(tmp_path / "never.safetensors"), str(ckpt), "slow", optimizer)
    deadline = time.time() + 120
    trainer = ckpt / "checkpoint" / "trainer.json"
    while time.time() < deadline:  # wait until a checkpoint past step 10 exists, then kill
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
    resumed = _run(tmp_path, str(tmp_path / "resumed.safetensors"), str(ckpt), "fast", optimizer)
    straight = _run(tmp_path, str(tmp_path / "straight.safetensors"), "-", "fast", optimizer)
    resumed_from = resumed.communicate(timeout=300)[0].strip()
    straight.communicate(timeout=300)
    assert resumed.returncode == 0 and straight.returncode == 0
    assert 10 <= int(resumed_from) < 40
    a, b = load_file(tmp_path / "resumed.safetensors"), load_file(tmp_path / "straight.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigkill_and_resume_reaches_the_uninterrupted_weights_adamw(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, "adamw")


def test_sigkill_and_resume_reaches_the_uninterrupted_weights_flora(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, "flora")
