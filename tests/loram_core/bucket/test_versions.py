import json
from pathlib import Path

import pytest

from loram_core.bucket import publish_version, resolve_version, verify_version
from loram_core.errors import IntegrityError, LoramError
from loram_core.manifest import Manifest, safe_relative
from tests.conftest import bare_manifest


def _staged(tmp_path: Path, payload: bytes = b"weights", version: str = "v1") -> tuple[Path, Manifest]:
    staging = tmp_path / f"staging-{version}-{len(payload)}"
    (staging / "model").mkdir(parents=True)
    (staging / "model" / "model.safetensors").write_bytes(payload)
    (staging / "masks").mkdir()
    (staging / "masks" / "masks.safetensors").write_bytes(b"masks")
    (staging / "README.md").write_text("# card\n")
    m = bare_manifest(staging, version=version)
    return staging, m


def test_publish_writes_layout_manifest_last_and_latest(tmp_path: Path) -> None:
    staging, m = _staged(tmp_path)
    uri = publish_version(staging, m, f"file://{tmp_path}/bucket")
    root = tmp_path / "bucket" / "m"
    assert uri.endswith("/m/v1")
    assert (root / "v1" / "manifest.json").is_file() and (root / "LATEST").read_text() == "v1\n"
    assert {f.path for f in m.files} == {"model/model.safetensors", "masks/masks.safetensors", "README.md"}
    assert verify_version(f"file://{tmp_path}/bucket/m").version == "v1"  # a name resolves through LATEST


def test_tampered_or_missing_file_fails_verification(tmp_path: Path) -> None:
    staging, m = _staged(tmp_path)
    publish_version(staging, m, f"file://{tmp_path}/b")
    weights = tmp_path / "b" / "m" / "v1" / "model" / "model.safetensors"
    weights.write_bytes(b"weightz")  # same size, different bytes
    with pytest.raises(IntegrityError, match="model/model.safetensors: sha256 differs"):
        verify_version(f"file://{tmp_path}/b/m/v1")
    weights.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_version(f"file://{tmp_path}/b/m/v1")


def test_version_is_immutable_but_republishing_same_content_is_a_no_op(tmp_path: Path) -> None:
    staging, m = _staged(tmp_path)
    bucket = f"file://{tmp_path}/b"
    publish_version(staging, m, bucket)
    publish_version(staging, m, bucket)  # idempotent
    other, m2 = _staged(tmp_path, b"other weights")
    with pytest.raises(LoramError, match="already exists .* with different content"):
        publish_version(other, m2, bucket)
    assert verify_version(f"{bucket}/m/v1").content_key() == m.content_key()


def test_failed_upload_leaves_no_version(tmp_path: Path) -> None:
    staging, m = _staged(tmp_path)
    (staging / "README.md").unlink()  # the upload fails on this file
    with pytest.raises(FileNotFoundError):
        publish_version(staging, m, f"file://{tmp_path}/b")
    assert not (tmp_path / "b" / "m" / "v1").exists()
    assert not (tmp_path / "b" / "m" / "LATEST").exists()
    with pytest.raises(LoramError, match="neither a published version"):
        resolve_version(f"file://{tmp_path}/b/m")


def test_latest_only_moves_forward(tmp_path: Path) -> None:
    bucket = f"file://{tmp_path}/b"
    for version in ("20260102", "20260101"):
        staging, m = _staged(tmp_path, version=version)
        publish_version(staging, m, bucket)
    assert (tmp_path / "b" / "m" / "LATEST").read_text().strip() == "20260102"


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "~/x", "a\\b"])
def test_paths_escaping_the_destination_are_refused(path: str, tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="unsafe path"):
        safe_relative(path)
    staging, m = _staged(tmp_path)
    publish_version(staging, m, f"file://{tmp_path}/b")
    mf = tmp_path / "b" / "m" / "v1" / "manifest.json"
    data = json.loads(mf.read_text())
    data["files"][0]["path"] = path
    mf.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="unsafe path"):
        verify_version(f"file://{tmp_path}/b/m/v1")
