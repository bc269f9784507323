"""torchrun is launched seeing only the step's leased GPUs: two CPU processes (Gloo), `gpus=[3, 5]`."""

from __future__ import annotations

from pathlib import Path

from loram_core.config import AlignConfig
from loram_core.steps.torchrun import align_torchrun
from tests.loram_core.test_distributed import pruned  # noqa: F401 - the fixture


def test_workers_see_the_leased_gpus_through_cuda_visible_devices(tmp_path: Path, pruned) -> None:  # noqa: F811
    pruned_dir, blocks = pruned
    cfg = AlignConfig(
        steps=1, batch_size=2, nproc_per_node=2, parallel="ddp", precision="fp32", warmup_steps=0
    )
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    result = align_torchrun(cfg, pruned_dir, blocks, work, out, None, gpus=[3, 5])
    assert result["cuda_visible_devices"] == "3,5"
    assert result["tokens"] == 1 * 2 * 2 * 32  # both processes trained: 2 ranks x 2 samples x 32 tokens
