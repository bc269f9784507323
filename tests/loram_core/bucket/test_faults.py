"""Faults on a real S3 server (moto on loopback): kills, races, corruption, interruption, hostile manifests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest

from loram_core import checks
from loram_core.bucket import publish, pull, verify_version
from loram_core.bucket import s3 as s3_module
from loram_core.config import load_config
from loram_core.errors import IntegrityError, LoramError
from loram_core.manifest import Manifest
from tests.loram_core.bucket.test_s3 import MiB, objects, staged
from tests.s3_server import BUCKET

REPO = Path(__file__).resolve().parents[3]

KILLER = """
import os, signal, sys
from pathlib import Path
from loram_core.bucket import publish, s3, upload
from loram_core.manifest import Manifest
s3.PART_SIZE = s3.SINGLE_PUT_MAX = 5 * 2**20
upload.FILES_IN_FLIGHT = 1  # files in manifest order, so the kill lands inside the last (multipart) file
manifest = Manifest.model_validate_json(Path(sys.argv[2]).read_text())
def die(event):
    if event["what"] == "model/model.safetensors":  # its first part is up: kill -9, mid-upload
        os.kill(os.getpid(), signal.SIGKILL)
publish(Path(sys.argv[1]), manifest, sys.argv[3], progress=die)
"""


def test_publish_killed_mid_upload_leaves_no_version_and_the_rerun_sends_only_what_is_missing(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging, m = staged(
        tmp_path
    )  # manifest order: README.md, masks/, model/config.json, model/model..., model-nf4/
    (tmp_path / "manifest.json").write_text(m.model_dump_json())
    killed = subprocess.run([sys.executable, "-c", KILLER, str(staging), str(tmp_path / "manifest.json"), s3],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    left = objects("m/")
    assert "m/v1/manifest.json" not in left and "m/LATEST" not in left  # no version
    assert sorted(left) == [
        "m/v1/.claim",
        "m/v1/README.md",
        "m/v1/masks/masks.safetensors",
        "m/v1/model/config.json",
    ]
    client = boto3.client("s3")
    left_open = [u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]
    assert left_open == ["m/v1/model/model.safetensors"]  # the killed upload, still open
    with pytest.raises(LoramError, match="neither a published version"):
        verify_version(f"{s3}/m")
    again = publish(staging, m, s3)
    assert "Uploads" not in client.list_multipart_uploads(Bucket=BUCKET)  # aborted by the rerun
    assert (again.status, again.uploaded_files, again.skipped_files) == ("published", 2, 3)
    assert again.uploaded_bytes == 12 * MiB + 2 * MiB + 7  # the model file and the NF4 file, nothing else
    assert verify_version(f"{s3}/m").version == "v1"


def test_two_publishers_racing_for_one_version_one_wins_the_other_is_refused(s3: str, tmp_path: Path) -> None:
    for round_ in range(3):
        version = f"v{round_}"
        contenders = [staged(tmp_path, seed=seed, version=version, big=3 * MiB) for seed in (1, 2)]
        start, results = threading.Barrier(2), {}

        def go(i: int, staging: Path, m: Manifest, start=start, results=results) -> None:
            start.wait()
            try:
                results[i] = publish(staging, m, s3).status
            except LoramError as err:
                results[i] = str(err)

        threads = [threading.Thread(target=go, args=(i, *c)) for i, c in enumerate(contenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, r in results.items() if r == "published"]
        assert len(winners) == 1, results
        loser = results[1 - winners[0]]
        assert f"m/{version}" in loser and ("other content" in loser or "different content" in loser), loser
        published = verify_version(f"{s3}/m/{version}")
        assert published.content_key() == contenders[winners[0]][1].content_key()


def test_a_truncated_or_corrupted_object_fails_the_pull_naming_the_file(s3: str, tmp_path: Path) -> None:
    staging, m = staged(tmp_path, big=MiB)
    publish(staging, m, s3)
    client = boto3.client("s3")
    key = "m/v1/masks/masks.safetensors"
    good = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=key, Body=good[:-10])
    with pytest.raises(
        IntegrityError, match=r"masks/masks.safetensors: 989 bytes in the bucket, the manifest says 999"
    ):
        pull(f"{s3}/m", tmp_path / "dest", cache=False)
    assert not (tmp_path / "dest").exists()
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(b ^ 1 for b in good))
    with pytest.raises(
        IntegrityError, match=r"masks/masks.safetensors: sha256 of the downloaded bytes differs"
    ):
        pull(f"{s3}/m", tmp_path / "dest", cache=False)
    assert not (tmp_path / "dest").exists()
    client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(IntegrityError, match=r"masks/masks.safetensors: missing from the bucket"):
        pull(f"{s3}/m", tmp_path / "dest", cache=False)
    assert not (tmp_path / "dest").exists()


def test_an_interrupted_pull_resumes_where_it_stopped(
    s3: str, tmp_path: Path, monkeypatch, small_parts
) -> None:
    staging, m = staged(tmp_path)
    publish(staging, m, s3)
    big = "m/v1/model/model.safetensors"
    original = s3_module.S3Store.write_range
    asked: list[int] = []

    def cut_at_third_range(self, key, start, end, etag, fd):
        if key == big:
            asked.append(start)
            if start == 10 * MiB:
                raise ConnectionAbortedError("the connection dropped")
        return original(self, key, start, end, etag, fd)

    monkeypatch.setattr(s3_module.S3Store, "write_range", cut_at_third_range)
    with pytest.raises(ConnectionAbortedError):
        pull(f"{s3}/m", tmp_path / "dest", cache=False)
    assert not (tmp_path / "dest").exists()
    assert sorted(asked) == [0, 5 * MiB, 10 * MiB]
    asked.clear()
    monkeypatch.setattr(s3_module.S3Store, "write_range", lambda self, key, start, *a: (
        asked.append(start) if key == big else None) or original(self, key, start, *a))  # fmt: skip
    pull(f"{s3}/m", tmp_path / "dest", cache=False)
    assert asked == [10 * MiB]  # the two ranges written before the cut were kept; only the third is fetched
    assert (tmp_path / "dest" / "model" / "model.safetensors").read_bytes() == (
        staging / "model" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("path", ["../evil", "model/../../evil", "/tmp/evil"])
def test_a_manifest_path_escaping_dest_is_refused(s3: str, tmp_path: Path, path: str) -> None:
    staging, m = staged(tmp_path, big=100)
    publish(staging, m, s3)
    hostile = m.model_copy(deep=True)
    hostile.files[0].path = path
    boto3.client("s3").put_object(Bucket=BUCKET, Key="m/v1/manifest.json", Body=hostile.model_dump_json())
    with pytest.raises(IntegrityError, match="unsafe path"):
        pull(f"{s3}/m", tmp_path / "d" / "dest", cache=False)
    assert not (tmp_path / "d").exists() and not (tmp_path / "evil").exists()


def _cfg(tmp_path: Path, uri: str, *more: str):
    return load_config(REPO / "configs" / "demo.yaml", [f"publish.uri={uri}", f"workdir={tmp_path}", *more])


def test_preflight_names_the_endpoint_of_an_unreachable_store(s3: str, tmp_path: Path, monkeypatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(LoramError, match=rf"cannot reach the S3 endpoint {dead} .*Set AWS_ENDPOINT_URL"):
        checks.check_publish_target(_cfg(tmp_path, s3))


def test_preflight_refuses_a_missing_bucket_and_a_version_clash(s3: str, tmp_path: Path) -> None:
    with pytest.raises(LoramError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        checks.check_publish_target(_cfg(tmp_path, "s3://no-such-bucket/models"))
    cfg = _cfg(tmp_path, s3, "publish.name=m", "publish.version=v1")
    staging, m = staged(tmp_path, big=100)
    m.prune, m.quantize, m.align = (cfg.prune.model_dump(mode="json"), cfg.quantize.model_dump(mode="json"),
                                    cfg.align.model_dump(mode="json"))  # fmt: skip
    m.base = {"source": cfg.base.source}
    publish(staging, m, s3)
    checks.check_publish_target(cfg)  # the same settings: the run is expected to reproduce v1
    other = _cfg(tmp_path, s3, "publish.name=m", "publish.version=v1", "prune.ratio=0.3")
    with pytest.raises(
        LoramError, match=r"publish.version='v1': .*m/v1 already exists, made with other settings \(prune\)"
    ):
        checks.check_publish_target(other)
