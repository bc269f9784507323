"""Publishing to and pulling from a real S3 server (moto over HTTP on loopback, `s3` fixture)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest

from loram_core.bucket import publish, pull, resolve_version, verify_version
from loram_core.bucket import s3 as s3_module
from loram_core.errors import LoramError
from loram_core.manifest import Manifest
from tests.conftest import bare_manifest
from tests.s3_server import BUCKET

MiB = 2**20


def staged(
    tmp_path: Path, seed: int = 0, version: str = "v1", big: int = 12 * MiB, created_at: str | None = None
):
    """A staged version: a multipart-sized model file, masks, an NF4 file and a card."""
    rng = __import__("random").Random(seed)
    staging = tmp_path / f"staging-{version}-{seed}"
    for rel, size in (("model/model.safetensors", big), ("model/config.json", 300), ("masks/masks.safetensors", 999),
                      ("model-nf4/model.safetensors", 2 * MiB + 7), ("README.md", 50)):  # fmt: skip
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(rng.randbytes(size))
    m = bare_manifest(staging, version=version)
    if created_at:
        m.created_at = created_at
    return staging, m


def objects(prefix: str = "") -> dict[str, int]:
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for o in listing.get("Contents", [])}


def test_publish_then_pull_round_trip_with_multipart_and_ranges(s3: str, tmp_path: Path, small_parts) -> None:
    staging, m = staged(tmp_path)
    events = []
    result = publish(staging, m, s3, progress=events.append)
    assert (result.status, result.uri, result.uploaded_files) == ("published", f"{s3}/m/v1", 5)
    assert result.uploaded_bytes == sum(f.size for f in m.files)
    assert events[-1]["step"] == events[-1]["total"] == sum(f.size for f in m.files) >> 20
    keys = objects("m/")
    assert keys["m/v1/model/model.safetensors"] == 12 * MiB and "m/v1/manifest.json" in keys
    assert boto3.client("s3").get_object(Bucket=BUCKET, Key="m/LATEST")["Body"].read() == b"v1\n"
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key="m/v1/model/model.safetensors")
    assert head["ETag"].endswith('-3"')  # three parts
    assert (
        head["Metadata"]["sha256"]
        == hashlib.sha256((staging / "model/model.safetensors").read_bytes()).hexdigest()
    )
    assert not objects(".loram-probe/")  # the create-only probe cleans up

    assert verify_version(f"{s3}/m").version == "v1"
    got = pull(f"{s3}/m", tmp_path / "dest", cache=tmp_path / "cache")
    assert got.content_key() == m.content_key()
    for f in m.files:
        assert (tmp_path / "dest" / f.path).read_bytes() == (staging / f.path).read_bytes()
    assert Manifest.model_validate_json((tmp_path / "dest" / "manifest.json").read_text()) == m
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []  # staging renamed away


def test_same_content_again_is_unchanged_and_other_content_is_refused(s3: str, tmp_path: Path) -> None:
    staging, m = staged(tmp_path, big=MiB)
    assert publish(staging, m, s3).status == "published"
    again = publish(staging, m, s3)
    assert (again.status, again.uploaded_files) == ("unchanged", 0)
    other, m2 = staged(tmp_path, seed=1, big=MiB)
    with pytest.raises(LoramError, match=r"m/v1 already exists in the bucket with different content"):
        publish(other, m2, s3)
    assert verify_version(f"{s3}/m/v1").content_key() == m.content_key()


def test_latest_follows_publication_time_not_the_spelling_of_versions(s3: str, tmp_path: Path) -> None:
    for version, at in (("v9", "2026-01-01T00:00:09+00:00"), ("v10", "2026-01-01T00:00:10+00:00"),
                        ("v8", "2026-01-01T00:00:08+00:00")):  # fmt: skip
        staging, m = staged(tmp_path, version=version, big=100, created_at=at)
        publish(staging, m, s3)
    assert resolve_version(f"{s3}/m")[1].version == "v10"  # v10 after v9; the older v8 does not roll it back


def test_pull_only_some_variants(s3: str, tmp_path: Path) -> None:
    staging, m = staged(tmp_path, big=MiB)
    publish(staging, m, s3)
    pull(f"{s3}/m/v1", tmp_path / "d", only=["masks"], cache=False)
    files = sorted(
        p.relative_to(tmp_path / "d").as_posix() for p in (tmp_path / "d").rglob("*") if p.is_file()
    )
    assert files == ["README.md", "manifest.json", "masks/masks.safetensors"]
    with pytest.raises(LoramError, match="--only 'weights' is not one of model, model-nf4, masks"):
        pull(f"{s3}/m/v1", tmp_path / "e", only=["weights"], cache=False)


def test_the_cache_means_a_new_version_downloads_only_changed_files(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging, m = staged(tmp_path, big=MiB)
    publish(staging, m, s3)
    # v2 changes only the card
    (staging / "README.md").write_text("# a better card\n")
    m2 = bare_manifest(staging, version="v2")
    m2.created_at = "2026-01-02T00:00:00+00:00"
    publish(staging, m2, s3)
    pull(f"{s3}/m/v1", tmp_path / "d", cache=tmp_path / "cache")
    fetched = []
    original = s3_module.S3Store.write_range
    monkeypatch.setattr(
        s3_module.S3Store, "write_range", lambda self, key, *a: fetched.append(key) or original(self, key, *a)
    )
    pull(f"{s3}/m", tmp_path / "d", cache=tmp_path / "cache")  # replaces the earlier pull in place
    assert fetched == ["m/v2/README.md"]
    assert (tmp_path / "d" / "README.md").read_text() == "# a better card\n"
    assert json_version(tmp_path / "d") == "v2"


def json_version(folder: Path) -> str:
    return Manifest.model_validate_json((folder / "manifest.json").read_text()).version


def test_a_store_that_accepts_a_second_create_only_write_is_refused(
    s3: str, tmp_path: Path, monkeypatch
) -> None:
    """A store that ignores If-None-Match (simulated by dropping the header before it is sent)."""
    original = s3_module.S3Store._call

    def ignoring(self, method, what, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        return original(self, method, what, **kwargs)

    monkeypatch.setattr(s3_module.S3Store, "_call", ignoring)
    staging, m = staged(tmp_path, big=100)
    with pytest.raises(
        LoramError, match=r"accepted a second create-only write .* publish.check_create_only=false"
    ):
        publish(staging, m, s3)
    assert not objects("m/")
    assert publish(staging, m, s3, check_create_only=False).status == "published"  # the opt-out


def test_republishing_an_older_version_unchanged_does_not_move_latest_back(s3: str, tmp_path: Path) -> None:
    old, m1 = staged(tmp_path, version="v1", big=100, created_at="2026-01-01T00:00:00+00:00")
    publish(old, m1, s3)
    new, m2 = staged(tmp_path, seed=1, version="v2", big=100, created_at="2026-01-02T00:00:00+00:00")
    publish(new, m2, s3)
    m1.created_at = "2026-01-03T00:00:00+00:00"  # a rerun stamps its manifest later; the content is v1's
    assert publish(old, m1, s3).status == "unchanged"
    assert resolve_version(f"{s3}/m")[1].version == "v2"


def test_uploads_carry_s3_checksums_of_the_very_bytes_sent(
    s3: str, tmp_path: Path, small_parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single PUT carries the sha256 it was checked against the manifest with; each multipart part
    its CRC32, and CompleteMultipartUpload lists them. AWS_REQUEST_CHECKSUM_CALCULATION=when_required
    (the SDKs' switch for stores that refuse checksums) sends none."""
    import base64
    import zlib

    sent: list[tuple[str, dict]] = []
    original = s3_module.S3Store._call
    monkeypatch.setattr(
        s3_module.S3Store, "_call", lambda self, method, what, **kw: sent.append((method, kw)) or original(
            self, method, what, **kw)
    )  # fmt: skip
    staging, m = staged(tmp_path)
    publish(staging, m, s3)
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    digests = {f"m/v1/{f.path}": f.sha256 for f in m.files}
    # By key and part number: a call retried after a transient error counts once (its last attempt).
    puts = {kw["Key"]: kw for method, kw in sent if method == "put_object" and kw["Key"] in digests}
    assert len(puts) == 4  # the files under 5 MiB
    for key, kw in puts.items():
        assert (
            kw["ChecksumSHA256"]
            == b64(hashlib.sha256(kw["Body"]).digest())
            == b64(bytes.fromhex(digests[key]))
        )
    parts = {kw["PartNumber"]: kw for method, kw in sent if method == "upload_part"}
    assert sorted(parts) == [1, 2, 3] and all(
        kw["ChecksumCRC32"] == b64(zlib.crc32(kw["Body"]).to_bytes(4, "big")) for kw in parts.values()
    )
    complete = [kw for method, kw in sent if method == "complete_multipart_upload"][-1]
    listed = complete["MultipartUpload"]["Parts"]
    assert [p["ChecksumCRC32"] for p in listed] == [parts[p["PartNumber"]]["ChecksumCRC32"] for p in listed]
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key="m/v1/README.md", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == b64(bytes.fromhex(digests["m/v1/README.md"]))  # what the store kept

    sent.clear()
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    staging, m2 = staged(tmp_path, seed=3, version="v2")
    publish(staging, m2, s3)
    assert sent and not any(k.startswith("Checksum") for _, kw in sent for k in kw)
