"""The verification flow and `loram verify`: the ablation table reaches the published card and manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loram_core.bucket import verify_version
from loram_core.config import load_config
from tests.flows.test_provider_flow import NO_LIMIT, TINY

REPO = Path(__file__).resolve().parents[2]
KEYS = ["original", "loram", "unrecovered", "unaligned", "neither", "reference"]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=NO_LIMIT):
        yield


def _loram(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"}  # rich wraps tables to the terminal
    # Prefect's temporary server on a busy machine starts when it starts: no limit of ours (a hang is CI's).
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(10**9)
    return subprocess.run(
        [sys.executable, "-m", "loram_provider.flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )  # no timeout: the work is bounded, a hang is CI's to catch


def test_verify_flow_publishes_the_ablation_table_in_the_card_the_manifest_and_an_artifact(
    prefect_server, tmp_path: Path
) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    from loram_provider.flows.verify import verify

    bucket = tmp_path / "bucket"
    common = TINY + [f"workdir={tmp_path / 'work'}", f"base.cache_dir={tmp_path / 'cache'}",
                     f"publish.uri=file://{bucket}", "quantize.enabled=false", "verify.steps=10",
                     "verify.train_examples=64", "verify.heldout_examples=16", "verify.seeds=2",
                     "verify.task=reverse-words", "verify.words=4", "verify.reference=true"]  # fmt: skip
    cfg = load_config(REPO / "configs" / "demo.yaml", [*common, "publish.version=v1", "verify.enabled=false"])
    result = verify(cfg.model_dump(mode="json"))  # the flow turns verification on
    rows = result["verification"]["rows"]
    assert [r["key"] for r in rows] == KEYS
    manifest = verify_version(f"file://{bucket}/demo-llama/v1")
    assert manifest.verification == result["verification"]
    task = manifest.verification["task"]
    assert task == {
        "name": "reverse-words", "words": 4, "response_words": None, "train_examples": 64, "heldout_examples": 16,
        "heldout": {"fraction": 0.05, "of": "documents"}, "fingerprint": task["fingerprint"],
        "heldout_candidates": task["heldout_candidates"], "heldout_seen_in_training": task["heldout_seen_in_training"],
    }  # fmt: skip
    assert manifest.verification["recover_mode"] == "zeroA" and manifest.verification["lora"]["steps"] == 10
    assert manifest.verification["seeds"] == [0, 1] and all(len(r["losses"]) == 2 for r in rows[1:])
    card = (bucket / "demo-llama" / "v1" / "README.md").read_text()
    section = card[card.index("## Verification: train small, infer large") :]
    table = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == 6
    shown = []
    for line, row in zip(
        table, rows, strict=True
    ):  # mean ± sample std over the seeds (none for the original)
        cells = [c.strip() for c in line.strip("|").split("|")]
        std = "" if row["loss_std"] is None else f" ± {row['loss_std']:.3f}"
        assert cells[0] == row["setting"] and cells[3] == f"{row['loss']:.3f}{std}"
        shown.append(cells[3])
    assert cells[4].startswith(f"{rows[-1]['loss'] - rows[1]['loss']:+.3f} (")  # the reference against LoRAM
    assert "beyond the spread" in cells[4] or "within the spread" in cells[4]
    assert "Differences to LoRAM's mean larger than the spread" in section

    async def artifact():
        async with get_client() as client:
            flt = ArtifactFilter(key=ArtifactFilterKey(any_=["lora-verification"]))
            return await client.read_artifacts(
                artifact_filter=flt, flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(),
                sort=ArtifactSort.CREATED_DESC, limit=10,
            )  # fmt: skip

    (art,) = asyncio.run(artifact())
    data = json.loads(art.data) if isinstance(art.data, str) else art.data
    assert [d["setting"] for d in data] == [r["setting"] for r in rows]
    assert [d["task loss"] for d in data] == shown and "vs LoRAM" in data[0]

    # `loram verify` on the same config reuses every finished step (the ablation too) and publishes v2
    # with the same table; v1 stays as it was.
    before = (bucket / "demo-llama" / "v1" / "manifest.json").read_bytes()
    out = _loram("verify", str(REPO / "configs" / "demo.yaml"), *common, "publish.version=v2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LoRAM: LoRA recovered onto the original" in out.stdout
    v2 = verify_version(f"file://{bucket}/demo-llama/v2")
    assert v2.verification["rows"] == rows
    assert (bucket / "demo-llama" / "v1" / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "verify.rank=64",
            "verify.rank=64 is larger than the pruned model allows: layer 1's k_proj has a side of 32",
        ),
        ("align.enabled=false", "verification needs a pruned and aligned base (align.enabled=false"),
        (
            "verify.recover_mode=dense",
            "verify.recover_mode='dense' does not apply to prune.strategy='random'",
        ),
    ],
)
def test_loram_verify_refuses_bad_input_before_any_work(tmp_path: Path, override: str, expected: str) -> None:
    out = _loram("verify", str(REPO / "configs" / "demo.yaml"), override, f"workdir={tmp_path / 'w'}")
    assert out.returncode == 2
    assert expected in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "w").exists()
