"""`loram run ... publish.uri=s3://...` against a real S3 server on loopback, then `loram pull`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.flows.test_provider_flow import REPO, TINY
from tests.s3_server import ACCESS_KEY, SECRET_KEY, aws_env


def loram(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loram_provider.flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )  # no timeout: the work is bounded, a hang is CI's to catch


def test_run_publishes_to_s3_and_pull_verifies_and_loads(s3: str, moto_server: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from loram_core.models import load_model

    env = {**os.environ, **aws_env(moto_server), "PREFECT_HOME": str(tmp_path / "prefect"),
           "LORAM_CACHE_DIR": str(tmp_path / "blobs"), "PYTHONPATH": str(REPO),
           # a fresh Prefect database migrates on first use: slow on a busy 2-core machine
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}  # fmt: skip
    overrides = [*TINY, f"workdir={tmp_path / 'work'}", f"base.cache_dir={tmp_path / 'cache'}",
                 f"publish.uri={s3}/models", "publish.version=v1", "align.steps=4"]  # fmt: skip
    run = loram("run", str(REPO / "configs" / "demo.yaml"), *overrides, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"published {s3}/models/demo-llama/v1" in " ".join(run.stdout.split())

    pulled = loram("pull", f"{s3}/models/demo-llama", str(tmp_path / "dest"), env=env)
    assert pulled.returncode == 0, pulled.stderr
    manifest = json.loads((tmp_path / "dest" / "manifest.json").read_text())
    assert manifest["version"] == "v1" and "verified" in pulled.stderr
    assert {f["path"] for f in manifest["files"]} >= {"model/config.json", "masks/masks.safetensors",
                                                       "model-nf4/config.json", "README.md"}  # fmt: skip

    # The pulled model is the aligned model the run computed: same weights, same logits.
    aligned = next((tmp_path / "work").glob("align-*[!p]"))
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        ours = load_model(tmp_path / "dest" / "model").eval()(ids).logits
        theirs = load_model(aligned).eval()(ids).logits
    assert torch.equal(ours, theirs)

    # ... and stock transformers loads both variants of the pulled version (random structured: per-layer
    # widths, so through the modeling code the version ships) in the dtype its config claims, with
    # load_model's logits in that dtype.
    for variant in ("model", "model-nf4"):
        path = tmp_path / "dest" / variant
        claimed = getattr(torch, json.loads((path / "config.json").read_text())["dtype"])
        stock_model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        assert stock_model.dtype == claimed == torch.bfloat16, variant
        with torch.no_grad():
            stock = stock_model(ids).logits
            reference = load_model(path, dtype=claimed).eval()(ids).logits
        assert stock.shape == reference.shape == (1, 32, 512)
        torch.testing.assert_close(stock.float(), reference.float(), atol=1e-3, rtol=1e-3)

    # Republishing the same content is a no-op, and says so.
    again = loram("run", str(REPO / "configs" / "demo.yaml"), *overrides, env=env)
    assert again.returncode == 0 and f"unchanged {s3}/models/demo-llama/v1" in " ".join(again.stdout.split())

    # The credentials appear nowhere: not in the output, the manifest, the card, the work dir or the logs.
    texts = [run.stdout, run.stderr, pulled.stdout, pulled.stderr, again.stdout, again.stderr]
    for folder in (tmp_path / "dest", tmp_path / "work", tmp_path / "prefect"):
        texts += [p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file()]
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert not [t for t in texts if secret in t]
