"""Child processes of long steps (`torchrun`): own process group, a deadline, never left behind.

A step that launches `torchrun` must not leave its workers alive when the step ends in any way
other than success: an exception in the parent, a signal (a Prefect cancellation sends SIGTERM to
the flow's process, then SIGKILL), a deadline. So the child starts a session of its own (its
process group holds torchrun's agent and every worker it spawns), the parent kills that whole
group on every exit path, the child's agent gets SIGTERM if the parent dies without cleaning up
(Linux parent-death signal), and the group id is written to a registry folder so that a hook
running in another process (Prefect runs `on_cancellation` hooks in the worker) can kill it too.

The registry folder is `LORAM_PGROUP_DIR` when set (the flow sets one per run), else none.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from loram_core.errors import LoramError

REGISTRY_ENV = "LORAM_PGROUP_DIR"
# Seconds between SIGTERM to the group and SIGKILL: torchrun's agent forwards SIGTERM to its workers.
GRACE_S = 10.0


class DeadlineExceeded(LoramError):
    """A step ran past its own deadline (its checkpoint, if any, is kept)."""


def _parent_death_signal() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgrp, state) of every process, from procfs (Linux)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(proc.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return out


def tree(pgid: int) -> set[int]:
    """Live processes of the group `pgid` and all their descendants (zombies excepted).

    torchrun's agent starts each worker in a session of its own, so a process-group kill alone
    would miss the workers; the tree does not.
    """
    procs = _procs()
    found = {pid for pid, (_, grp, state) in procs.items() if grp == pgid and state != "Z"}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _, state) in procs.items() if ppid in found and state != "Z"} - found
        found |= more
        grew = bool(more)
    return found


def group_alive(pgid: int) -> bool:
    """Whether any process of the group `pgid`, or a descendant of one, is still alive."""
    if not Path("/proc/self/stat").is_file():  # no procfs: the group only, zombies count as alive
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return bool(tree(pgid))


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM the group `pgid` (torchrun's agent forwards it to its workers), then SIGKILL every
    process of its tree still alive after `grace_s` seconds."""
    members = tree(pgid) if Path("/proc/self/stat").is_file() else set()
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        members |= tree(pgid)
        if not any(_alive(pid) for pid in members):
            return
        time.sleep(0.1)
    _signal(members | tree(pgid), signal.SIGKILL)
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; else a no-op).

    torchrun's workers call it: when the agent is killed outright, they go with it.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call
            os.kill(os.getpid(), sig)


def kill_registered(registry: str | Path, grace_s: float = GRACE_S) -> list[int]:
    """Kill every process group recorded in a registry folder; returns the group ids killed."""
    killed = []
    folder = Path(registry)
    if not folder.is_dir():
        return killed
    for entry in folder.glob("*.pgid"):
        pgid = int(entry.stem)
        if group_alive(pgid):
            kill_group(pgid, grace_s)
            killed.append(pgid)
        entry.unlink(missing_ok=True)
    return killed


@contextmanager
def _registered(pgid: int) -> Iterator[None]:
    folder = os.environ.get(REGISTRY_ENV)
    entry = Path(folder) / f"{pgid}.pgid" if folder else None
    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(f"{pgid}\n")
    try:
        yield
    finally:
        if entry is not None:
            entry.unlink(missing_ok=True)


def run_group(
    cmd: list[str],
    on_line: Callable[[str], None],
    deadline_s: float | None = None,
    what: str = "the child process",
    env: dict[str, str] | None = None,
) -> int:
    """Run `cmd` in its own session, feed each stdout line to `on_line`, and return its exit code.

    The whole process group is killed (SIGTERM, then SIGKILL after `GRACE_S`) when the parent
    leaves this function any way but the child's own exit: an exception raised by `on_line`, a
    KeyboardInterrupt or a Prefect termination signal, or the deadline.

    Args:
        cmd: the command line.
        on_line: called with every line the child prints to stdout (stderr passes through).
        deadline_s: seconds the child may run; None for no limit.
        what: how the error names the child ("alignment under torchrun").
        env: the child's environment (default: the parent's).

    Raises:
        DeadlineExceeded: the child ran past `deadline_s` (the group was killed).
    """
    timed_out = threading.Event()
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_parent_death_signal,  # noqa: PLW1509 - only prctl, before exec
        env=env,
    ) as proc:
        pgid = proc.pid  # a new session's leader: its pid is the group id
        with _registered(pgid):

            def expire() -> None:
                timed_out.set()
                kill_group(pgid)

            timer = threading.Timer(deadline_s, expire) if deadline_s is not None else None
            if timer is not None:
                timer.daemon = True
                timer.start()
            try:
                for line in proc.stdout:
                    on_line(line)
                proc.wait()
            except BaseException:
                kill_group(pgid)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                if group_alive(pgid):  # workers the agent left behind
                    kill_group(pgid)
    if timed_out.is_set():
        raise DeadlineExceeded(
            f"{what} ran past its deadline of {deadline_s / 60:.4g} minutes and was stopped (its whole "
            "process group)."
        )
    return proc.returncode
