"""GPU leases: concurrent steps on one host never share a GPU index, and a lease is given back on
every way out (a killed holder's locks go with its file descriptors)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loram_core.errors import LoramError
from loram_core.gpus import lease_gpus
from loram_core.steps.torchrun import torchrun_env


@pytest.fixture(autouse=True)
def _locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAM_GPU_LOCK_DIR", str(tmp_path / "locks"))


def test_concurrent_leases_get_disjoint_gpus() -> None:
    with (
        lease_gpus(2, available=4) as first,
        lease_gpus(1, available=4) as second,
        lease_gpus(1, available=4) as third,
    ):
        assert first == [0, 1] and second == [2] and third == [3]
    with lease_gpus(4, available=4) as everything:  # all given back
        assert everything == [0, 1, 2, 3]


def test_a_lease_waits_for_a_free_gpu_and_takes_the_one_released() -> None:
    holder = lease_gpus(1, available=2)
    other = lease_gpus(1, available=2)
    assert holder.__enter__() == [0] and other.__enter__() == [1]
    got: list[list[int]] = []
    waits: list[int] = []

    def release_on_first_wait() -> None:  # frees GPU 0 at a known point: no timing in the test
        waits.append(1)
        if len(waits) == 1:
            holder.__exit__(None, None, None)

    worker = threading.Thread(
        target=lambda: got.append(
            lease_gpus(1, available=2, poll_s=0, on_wait=release_on_first_wait).__enter__()
        )
    )
    worker.start()
    worker.join()
    other.__exit__(None, None, None)
    assert got == [[0]] and len(waits) == 1


def test_a_pinned_gpu_is_that_index_and_impossible_leases_are_refused() -> None:
    with lease_gpus(1, pinned=2, available=3) as pinned:
        assert pinned == [2]
    with pytest.raises(LoramError, match="needs 3 GPU"):
        lease_gpus(3, available=2).__enter__()
    with pytest.raises(LoramError, match="N < 2"):
        lease_gpus(1, pinned=5, available=2).__enter__()


def test_a_killed_holder_gives_its_gpus_back(tmp_path: Path) -> None:
    script = (
        "from loram_core.gpus import lease_gpus; import os\nwith lease_gpus(2, available=2):\n    os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ})  # exits holding both
    with lease_gpus(2, available=2) as after:
        assert after == [0, 1]


def test_torchrun_sees_only_its_leased_gpus() -> None:
    assert torchrun_env(None) is None
    assert torchrun_env([2, 3])["CUDA_VISIBLE_DEVICES"] == "2,3"
