"""Long steps' child processes: own process group, killed on every exit path, a deadline of their own.

The alignment cases launch the real thing: `torchrun` with two CPU processes (Gloo) through
`steps.align`, in a parent process that the test then terminates or kills as Prefect would.
No test waits on a clock: children block until killed, waits end on a condition or on the process
they watch dying, and the alignment deadlines are made to pass once a checkpoint exists (a clock
that follows the work), so a slow machine changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from loram_core import launch, steps
from loram_core.config import load_config
from loram_core.errors import LoramError
from tests.loram_core.test_distributed import pruned  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[2]

# A parent that launches a child which starts a grandchild (as torchrun's agent starts workers).
TREE = textwrap.dedent(
    """
    import subprocess, sys, threading
    subprocess.Popen([sys.executable, "-c", "import threading; threading.Event().wait()"])
    print("ready", flush=True)
    threading.Event().wait()
    """
)


def _wait_for(predicate, watched: subprocess.Popen | None = None) -> None:
    """Poll until `predicate()`; fail if `watched` exits first (no clock: CI's limit catches a hang)."""
    while not predicate():
        assert watched is None or watched.poll() is None, f"the process exited ({watched.returncode}) first"
        time.sleep(0.1)


def test_an_exception_in_the_parent_kills_the_whole_group(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(launch.REGISTRY_ENV, str(tmp_path / "reg"))
    seen: list[int] = []

    def on_line(line: str) -> None:
        seen.extend(int(p.stem) for p in (tmp_path / "reg").glob("*.pgid"))
        raise KeyboardInterrupt  # what a Prefect cancellation raises in the flow's process

    with pytest.raises(KeyboardInterrupt):
        launch.run_group([sys.executable, "-c", TREE], on_line)
    assert len(seen) == 1 and not launch.group_alive(seen[0])  # the grandchild too
    assert not list((tmp_path / "reg").glob("*.pgid"))  # the registry entry went with it


def test_deadline_kills_the_group_with_a_clear_error() -> None:
    with pytest.raises(launch.DeadlineExceeded, match="deadline of 0.02 minutes"):
        launch.run_group([sys.executable, "-c", TREE], lambda line: None, deadline_s=1.2)


def test_kill_registered_kills_groups_another_process_started(tmp_path: Path) -> None:
    """What the flow's on_cancellation hook does, from the worker's process."""
    reg = tmp_path / "reg"
    env = {**os.environ, launch.REGISTRY_ENV: str(reg), "PYTHONPATH": str(REPO)}
    code = f"from loram_core import launch; import sys; launch.run_group([sys.executable, '-c', {TREE!r}], print)"
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    pgid = int(next(reg.glob("*.pgid")).stem)
    assert launch.kill_registered(reg, grace_s=5) == [pgid]
    assert not launch.group_alive(pgid)
    parent.wait()


ALIGN = textwrap.dedent(
    """
    import sys
    from loram_core import steps
    from loram_core.config import load_config
    cfg = load_config("configs/demo.yaml", sys.argv[3:])
    steps.align(cfg.align, cfg.context, sys.argv[1], sys.argv[2])
    """
)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_terminating_a_torchrun_alignment_leaves_no_process(tmp_path: Path, pruned, how) -> None:  # noqa: F811
    """The parent dies (as a cancelled flow's process does): torchrun's agent and both workers go."""
    pruned_dir, blocks = pruned
    reg = tmp_path / "reg"
    env = {**os.environ, launch.REGISTRY_ENV: str(reg), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["align.steps=100000", "align.nproc_per_node=2", "align.parallel=ddp", "align.batch_size=2",
            "align.log_every=1", "align.precision=fp32", f"workdir={tmp_path / 'w'}"]  # fmt: skip
    parent = subprocess.Popen(
        [sys.executable, "-c", ALIGN, pruned_dir, blocks, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    # Training is under way once rank 0 reports (the parent prints nothing but the workers' lines).
    _wait_for(lambda: list(reg.glob("*.pgid")), parent)
    pgid = int(next(reg.glob("*.pgid")).stem)
    _wait_for(lambda: len(launch.tree(pgid)) >= 3, parent)  # agent + 2 workers (each in a session of its own)
    members = launch.tree(pgid)
    parent.send_signal(how)
    parent.wait()
    _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and launch._alive(pid) for pid in members))


def _checkpointed(work: Path, step: int) -> bool:
    """Whether an alignment under `work` has saved the checkpoint of `step` (or a later one)."""
    for trainer in work.glob("align-*.partial/checkpoint/trainer.json"):
        try:
            return json.loads(trainer.read_text())["step"] >= step
        except (json.JSONDecodeError, FileNotFoundError):  # being swapped in right now
            return False
    return False


def test_torchrun_alignment_past_its_deadline_stops_and_keeps_its_checkpoint(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pruned,  # noqa: F811
) -> None:
    pruned_dir, blocks = pruned
    timers: list[float] = []

    class AfterCheckpoint(threading.Thread):
        """`launch`'s deadline timer, fired once the checkpoint of step 2 exists instead of after 30 s."""

        def __init__(self, interval: float, function) -> None:
            super().__init__(daemon=True)
            self.function, self.cancelled = function, threading.Event()
            timers.append(interval)

        def run(self) -> None:
            while not self.cancelled.wait(0.1):
                if _checkpointed(tmp_path / "w", 2):
                    self.function()
                    return

        def cancel(self) -> None:
            self.cancelled.set()

    monkeypatch.setattr(launch, "threading", SimpleNamespace(Timer=AfterCheckpoint, Event=threading.Event))
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        ["align.steps=100000", "align.nproc_per_node=2", "align.parallel=ddp", "align.batch_size=2",
         "align.checkpoint_every=2", "align.log_every=1", "align.precision=fp32",
         "align.deadline_minutes=0.5", f"workdir={tmp_path / 'w'}"],
    )  # fmt: skip
    with pytest.raises(launch.DeadlineExceeded, match=r"align.deadline_minutes") as err:
        steps.align(cfg.align, cfg.context, pruned_dir, blocks)
    assert "kept" in str(err.value) and timers == [30.0]  # the timer was set for align.deadline_minutes
    trainer = next((tmp_path / "w").glob("align-*.partial/checkpoint/trainer.json"))
    assert json.loads(trainer.read_text())["step"] >= 2
    assert not list((tmp_path / "w").glob("align-*[0-9a-f]/config.json"))  # no model pretends to be done


def test_in_process_alignment_past_its_deadline_stops_and_keeps_its_checkpoint(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pruned,  # noqa: F811
) -> None:
    from loram_core.steps import alignment

    pruned_dir, blocks = pruned
    # The loop's clock, as the deadline reads it: still at the start until the checkpoint of step 2
    # exists, then far past the deadline (so the run stops at its next report, step 3).
    clock = SimpleNamespace(monotonic=lambda: 1e9 if _checkpointed(tmp_path / "w", 2) else 0.0)
    monkeypatch.setattr(alignment, "time", clock)
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        ["align.steps=100000", "align.batch_size=2", "align.checkpoint_every=2", "align.log_every=1",
         "align.precision=fp32", "align.deadline_minutes=0.05", f"workdir={tmp_path / 'w'}"],
    )  # fmt: skip
    with pytest.raises(LoramError, match=r"align.deadline_minutes=0.05 and was stopped at step 3/100000"):
        steps.align(cfg.align, cfg.context, pruned_dir, blocks)
    trainer = next((tmp_path / "w").glob("align-*.partial/checkpoint/trainer.json"))
    assert json.loads(trainer.read_text())["step"] >= 2
