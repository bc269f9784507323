"""A bucket the consumer does not control: hand-written contents on the S3 server and on file://.

Every pull below is refused through the CLI (`loram pull`, in process): exit 2, one line, no
traceback, and the consumer's folder (DEST, an earlier pull in it, its neighbours, a file a hostile
digest points at, the cache) is byte for byte what it was. Names a pull uses for itself (`.part`,
`.ranges`, ...) are ordinary file names of a version and arrive intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from loram_core.bucket import publish, pull, resolve_version, upload, verify_version
from loram_core.bucket import staging as staging_module
from loram_core.bucket.store import Store
from loram_core.config import PublishConfig
from loram_core.errors import IntegrityError, LoramError
from loram_core.manifest import Manifest, list_files
from tests.conftest import bare_manifest
from tests.s3_server import BUCKET

MiB = 2**20
PAYLOAD = {"README.md": b"# card\n", "model/config.json": b'{"a": 1}', "model/w.bin": b"w" * 3000}


@dataclass
class Bucket:
    """A bucket root and a way to write any object into it, bypassing the publisher."""

    uri: str
    put: Callable[[str, bytes], None]
    kind: str


@pytest.fixture(params=["s3", "file"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    if request.param == "s3":
        uri = request.getfixturevalue("s3")
        client = boto3.client("s3")
        return Bucket(uri, lambda key, data: client.put_object(Bucket=BUCKET, Key=key, Body=data), "s3")
    root = tmp_path / "bucket"

    def put(key: str, data: bytes) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)

    return Bucket(f"file://{root}", put, "file")


def entry(path: str, data: bytes) -> dict:
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def manifest_bytes(name: str = "m", version: str = "v1", files: list | None = None, **fields) -> bytes:
    files = [entry(p, d) for p, d in PAYLOAD.items()] if files is None else files
    doc = {"schema_version": 1, "name": name, "version": version, "created_at": "2026-01-01T00:00:00+00:00",
           "base": {}, "corpus": {}, "prune": {}, "align": {}, "quantize": {}, "params": {}, "metrics": {},
           "files": files, "code_version": "hostile"} | fields  # fmt: skip
    return json.dumps(doc).encode()


def lay(bucket: Bucket, files: dict[str, bytes], manifest: bytes | None = None, version: str = "v1") -> None:
    """Objects of m/<version> and its manifest (by default the honest one), and LATEST naming it."""
    for path, data in files.items():
        bucket.put(f"m/{version}/{path}", data)
    entries = [entry(p, d) for p, d in files.items()]
    bucket.put(f"m/{version}/manifest.json", manifest or manifest_bytes(version=version, files=entries))
    bucket.put("m/LATEST", f"{version}\n".encode())


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The consumer's folder: an earlier pull in out/dest, neighbours, a file to protect, a cache."""
    home = tmp_path / "home"
    (home / "out" / "dest" / "model").mkdir(parents=True)
    (home / "out" / "dest" / "manifest.json").write_text('{"earlier": "pull"}')
    (home / "out" / "dest" / "model" / "w.bin").write_bytes(b"old weights")
    (home / "out" / "neighbour.txt").write_text("beside DEST")
    (home / "out" / "decoy").mkdir()
    (home / "out" / "decoy" / "x").write_text("an unrelated folder")
    (home / "notes.txt").write_bytes(b"n" * len(PAYLOAD["README.md"]))
    (home / "cache").mkdir()
    monkeypatch.setenv("LORAM_CACHE_DIR", str(home / "cache"))
    return home


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its kind and content digest (links by target)."""
    seen = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                seen[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                seen[rel] = "dir"
            else:
                seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


def loram_pull(*args: str):
    from loram_provider.flows.cli import app

    return CliRunner().invoke(app, ["pull", *args])


def assert_refused(uri: str, home: Path, match: str) -> str:
    before = snapshot(home)
    result = loram_pull(uri, str(home / "out" / "dest"))
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # typer.Exit(2): a LoramError, not a crash
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1 and len(message) < 700, result.output
    assert match in message, message
    assert snapshot(home) == before
    return message


def _files_with(*pairs: tuple[str, bytes]) -> list[dict]:
    return [entry(p, d) for p, d in pairs]


# (id, how the version's manifest is spoiled, what the refusal says)
MANIFEST_CASES = [
    ("sha256-absolute-path", lambda home: manifest_bytes(files=[
        {"path": "README.md", "size": 7, "sha256": str(home / "notes.txt")}]), "files[0].sha256"),
    ("sha256-dotdot-path", lambda home: manifest_bytes(files=[
        {"path": "README.md", "size": 7, "sha256": "../notes.txt"}]), "files[0].sha256"),
    ("sha256-uppercase", lambda home: manifest_bytes(files=[
        {"path": "README.md", "size": 7, "sha256": "A" * 64}]), "files[0].sha256: String should match"),
    ("name-dotdot", lambda home: manifest_bytes(name="../out/decoy"), "name: String should match"),
    ("version-dotdot", lambda home: manifest_bytes(version=".."), "version: String should match"),
    ("other-version", lambda home: manifest_bytes(name="decoy", version="v7"),
     "is the manifest of 'decoy'/'v7', but the URI asks for m/v1"),
    ("path-dotdot", lambda home: manifest_bytes(files=_files_with(("../out/decoy/x", b"z"))), "unsafe path"),
    ("path-absolute", lambda home: manifest_bytes(files=_files_with((str(home / "notes.txt"), b"z"))),
     "unsafe path"),
    ("path-nul", lambda home: manifest_bytes(files=_files_with(("model/a\x00b", b"z"))), "NUL, control"),
    ("path-escape-sequence", lambda home: manifest_bytes(files=_files_with(("model/\x1b[31mred", b"z"))),
     "NUL, control"),
    ("path-300-chars", lambda home: manifest_bytes(files=_files_with(("model/" + "x" * 300, b"z"))),
     "a component longer than 255 bytes"),
    ("path-2000-chars", lambda home: manifest_bytes(files=_files_with(("a/" * 1000 + "b", b"z"))),
     "at most 1024 characters"),
    ("path-40-deep", lambda home: manifest_bytes(files=_files_with(("a/" * 40 + "b", b"z"))),
     "deeper than 32 components"),
    ("path-backslash", lambda home: manifest_bytes(files=_files_with(("model\\..\\..\\x", b"z"))), "backslash"),
    ("path-empty-component", lambda home: manifest_bytes(files=_files_with(("model//w.bin", b"z"))),
     "an empty, '.' or '..' component"),
    ("duplicate", lambda home: manifest_bytes(files=_files_with(("model/w.bin", b"a"), ("model/w.bin", b"b"))),
     "'model/w.bin' twice"),
    ("duplicate-case", lambda home: manifest_bytes(files=_files_with(("model/W.bin", b"a"), ("model/w.bin", b"b"))),
     "twice"),
    ("duplicate-unicode-form", lambda home: manifest_bytes(files=_files_with(("caf\u00e9", b"a"), ("cafe\u0301", b"b"))),
     "twice"),
    ("file-and-folder", lambda home: manifest_bytes(files=_files_with(("model", b"a"), ("model/w.bin", b"b"))),
     "'model' both as a file and as a folder"),
    ("reserved-manifest", lambda home: manifest_bytes(files=_files_with(("manifest.json", b"{}"))),
     "a name written by loram itself"),
    ("size-negative", lambda home: manifest_bytes(files=[{"path": "a", "size": -1, "sha256": "0" * 64}]),
     "files[0].size"),
    ("size-bool", lambda home: manifest_bytes(files=[{"path": "a", "size": True, "sha256": "0" * 64}]),
     "files[0].size: Input should be a valid integer"),
    ("size-huge", lambda home: manifest_bytes(files=[{"path": "a", "size": 2**80, "sha256": "0" * 64}]),
     "files[0].size"),
    ("not-json", lambda home: b"\xff\xfe<html>", "Invalid JSON"),
    ("json-array", lambda home: b"[]", "Input should be an object"),
    ("nested-deep", lambda home: manifest_bytes(base="X").replace(b'"X"', b"[" * 50_000 + b"]" * 50_000),
     "recursion limit exceeded"),
    ("schema-2", lambda home: manifest_bytes(schema_version=2), "schema_version 2 is not one this loram reads"),
    ("created-at-garbage", lambda home: manifest_bytes(created_at="yesterday"), "not an ISO 8601 time"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spoil", "match"), [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES]
)
def test_a_hostile_manifest_is_refused_and_nothing_moves(
    bucket: Bucket, home: Path, spoil, match: str
) -> None:
    lay(bucket, PAYLOAD, spoil(home))
    assert_refused(f"{bucket.uri}/m/v1", home, match)
    assert_refused(f"{bucket.uri}/m", home, match)  # through LATEST alike


LATEST_CASES = [
    ("outside-the-bucket", b"../../elsewhere/x/v1\n", "does not name a version (b'../../elsewhere/x/v1\\n')"),
    ("not-utf8", b"\xff\xfe\x00v1", "does not name a version (b'\\xff\\xfe\\x00v1')"),
    ("a-path", b"v1/../../x", "does not name a version"),
    ("empty", b"", "does not name a version"),
    ("one-megabyte", b"v" * MiB, "holds 1048576 bytes, more than the 1024 it may have"),
]


@pytest.mark.parametrize(("latest", "match"), [c[1:] for c in LATEST_CASES], ids=[c[0] for c in LATEST_CASES])
def test_a_hostile_latest_is_refused_without_following_it(
    bucket: Bucket, home: Path, tmp_path: Path, latest: bytes, match: str
) -> None:
    lay(bucket, PAYLOAD)
    bucket.put("m/LATEST", latest)
    # what a LATEST of ../../elsewhere/x/v1 would reach on file:// (outside the bucket)
    (tmp_path / "elsewhere" / "x" / "v1").mkdir(parents=True)
    (tmp_path / "elsewhere" / "x" / "v1" / "manifest.json").write_bytes(manifest_bytes("x", "v1", files=[]))
    message = assert_refused(f"{bucket.uri}/m", home, match)
    assert len(message) < 400  # a 1 MB LATEST is quoted by a short prefix


def test_a_100000_entry_manifest_is_refused_by_its_size_before_it_is_read_or_parsed(
    bucket: Bucket, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [{"path": f"model/shard-{i:06d}", "size": 1, "sha256": "0" * 64} for i in range(100_000)]
    data = manifest_bytes(files=files)
    assert len(data) > 4 * MiB
    lay(bucket, {}, data)
    parsed, heads = [], []
    monkeypatch.setattr(Manifest, "model_validate_json", classmethod(lambda cls, *a, **k: parsed.append(1)))
    for cls in Store.__subclasses__():
        monkeypatch.setattr(cls, "head", lambda self, key, _o=cls.head: heads.append(key) or _o(self, key))
    assert_refused(f"{bucket.uri}/m/v1", home, f"holds {len(data)} bytes, more than the 4194304 it may have")
    # The work is one read refused by the size the store reports: no parse, no file of it looked at.
    assert parsed == [] and [k for k in heads if not k.endswith("manifest.json")] == []


def test_a_manifest_of_10001_entries_is_refused_before_any_file_is_looked_at(
    bucket: Bucket, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [{"path": f"s{i}", "size": 1, "sha256": "0" * 64} for i in range(10_001)]
    lay(bucket, {}, manifest_bytes(files=files))
    heads = []
    for cls in Store.__subclasses__():
        monkeypatch.setattr(cls, "head", lambda self, key, _o=cls.head: heads.append(key) or _o(self, key))
    assert_refused(f"{bucket.uri}/m/v1", home, "files: List should have at most 10000 items")
    assert [k for k in heads if not k.endswith("manifest.json")] == []


def test_files_named_like_the_pulls_own_temporary_files_arrive_intact(bucket: Bucket, tmp_path: Path) -> None:
    files = {name: name.encode() * 7 for name in (
        "model/w.bin", "model/w.bin.part", "model/w.bin.ranges", "model/w.bin.etag", "model/w.bin.cache",
        "model/w.bin.copy", "tree/x", "scratch/y", ".claim.txt", "model/manifest.json")}  # fmt: skip
    lay(bucket, files)
    dest = tmp_path / "dest"
    for _ in range(2):  # a fresh pull, then one replacing it
        pull(f"{bucket.uri}/m", dest, cache=tmp_path / "cache")
        got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
        assert got.pop("manifest.json") and got == files
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "bucket")
    assert left == ["cache", "dest"]  # the staging area is gone


def test_same_content_under_two_paths_is_fetched_once_and_lands_at_both(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    same = b"tokenizer" * 50
    lay(bucket, {"model/tokenizer.json": same, "model-nf4/tokenizer.json": same, "README.md": b"card"})
    fetched = []
    for cls in Store.__subclasses__():
        monkeypatch.setattr(cls, "write_range", lambda self, key, *a, _o=cls.write_range: fetched.append(key)
                            or _o(self, key, *a))  # fmt: skip
    pull(f"{bucket.uri}/m/v1", tmp_path / "d", cache=False)
    assert sorted(fetched) == ["m/v1/README.md", "m/v1/model/tokenizer.json"]
    assert (tmp_path / "d" / "model-nf4" / "tokenizer.json").read_bytes() == same


def test_a_damaged_or_linked_cache_blob_is_dropped_and_its_target_kept(
    bucket: Bucket, tmp_path: Path
) -> None:
    lay(bucket, PAYLOAD)
    cache = tmp_path / "cache"
    cache.mkdir()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"v" * 3000)
    (cache / hashlib.sha256(PAYLOAD["model/w.bin"]).hexdigest()).symlink_to(victim)
    (cache / hashlib.sha256(PAYLOAD["README.md"]).hexdigest()).write_bytes(b"x" * len(PAYLOAD["README.md"]))
    pull(f"{bucket.uri}/m/v1", tmp_path / "d", cache=cache)
    for path, data in PAYLOAD.items():
        assert (tmp_path / "d" / path).read_bytes() == data
        blob = cache / hashlib.sha256(data).hexdigest()
        assert not blob.is_symlink() and blob.read_bytes() == data  # replaced by the verified download
    assert victim.read_bytes() == b"v" * 3000


def test_a_pull_killed_between_its_two_renames_is_repaired_by_the_next(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where DEST cannot be exchanged in one step it is moved aside, then replaced: a kill in between
    leaves no DEST. The next pull puts the moved-aside DEST back first, even if it then fails."""
    lay(bucket, PAYLOAD)
    dest = tmp_path / "out" / "dest"
    aside = staging_module.beside(dest, staging_module.OLD_TAG + "0123abcd")
    aside.mkdir(parents=True)
    (aside / "manifest.json").write_text('{"earlier": "pull"}')
    legacy = tmp_path / "out" / ".dest.old-89abcdef"  # what the pulls before this one left
    legacy.mkdir()
    (legacy / "manifest.json").write_text("{}")
    bucket.put("m/v1/model/w.bin", b"W" * 3000)  # the pull will fail on it
    with pytest.raises(IntegrityError, match="sha256 of the downloaded bytes differs"):
        pull(f"{bucket.uri}/m/v1", dest, cache=False)
    assert (dest / "manifest.json").read_text() == '{"earlier": "pull"}'  # back in place
    assert not aside.exists() and not legacy.exists()
    bucket.put("m/v1/model/w.bin", PAYLOAD["model/w.bin"])
    monkeypatch.setattr(staging_module, "_exchange", lambda a, b: False)  # the two-rename path
    pull(f"{bucket.uri}/m/v1", dest, cache=False)
    assert (dest / "model" / "w.bin").read_bytes() == PAYLOAD["model/w.bin"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dest"]


def test_dest_is_checked_after_the_swap_and_the_earlier_pull_put_back_if_it_differs(
    bucket: Bucket, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay(bucket, PAYLOAD)
    from loram_core.bucket import download

    fetch_all = download._fetch_all

    def and_a_stray(store, key, entries, area, *rest):
        fetch_all(store, key, entries, area, *rest)
        (area.tree / "model" / "stray.bin").write_bytes(b"not in the manifest")

    monkeypatch.setattr(download, "_fetch_all", and_a_stray)
    before = snapshot(home / "out" / "dest")
    with pytest.raises(
        IntegrityError, match=r"did not match the manifest \('model/stray.bin' is not in the manifest\)"
    ):
        pull(f"{bucket.uri}/m/v1", home / "out" / "dest", cache=False)
    assert snapshot(home / "out" / "dest") == before


def test_a_second_pull_into_one_dest_is_refused_while_the_first_runs(bucket: Bucket, tmp_path: Path) -> None:
    lay(bucket, PAYLOAD)
    dest = tmp_path / "dest"
    with staging_module.Area(dest):  # what a running pull holds
        result = loram_pull(f"{bucket.uri}/m/v1", str(dest))
        assert result.exit_code == 2 and "another pull into" in result.output
    pull(f"{bucket.uri}/m/v1", dest, cache=False)  # once it ended
    assert (dest / "README.md").read_bytes() == PAYLOAD["README.md"]


# --- publishing: LATEST never moves to bytes that were not hashed, names follow one rule ---


def staged_version(tmp_path: Path, big: int = 3000, version: str = "v1") -> tuple[Path, Manifest]:
    staging = tmp_path / f"staging-{version}"
    for path, data in (("README.md", b"# card\n"), ("model/w.bin", bytes(range(256)) * (big // 256 + 1))):
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_bytes(data[:big] if path == "model/w.bin" else data)
    return staging, bare_manifest(staging, version=version)


def stored(bucket: Bucket) -> dict[str, int]:
    """Every object in the bucket (a folder: every file, temporary ones included) -> size."""
    if bucket.kind == "s3":
        listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET).get("Contents", [])
        return {o["Key"]: o["Size"] for o in listing}
    root = Path(bucket.uri.removeprefix("file://"))
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def open_uploads(bucket: Bucket) -> list[str]:
    """Unfinished uploads: S3's open multipart uploads, a folder's temporary files."""
    if bucket.kind == "s3":
        return [u["Key"] for u in boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]
    return sorted(k for k in stored(bucket) if k.startswith(".loram-tmp/"))


@pytest.mark.parametrize("changed", ["README.md", "model/w.bin"])
def test_a_file_changed_after_it_was_hashed_is_not_published(
    bucket: Bucket, tmp_path: Path, small_parts, changed: str
) -> None:
    staging, m = staged_version(tmp_path, big=12 * MiB)  # model/w.bin: 3 parts of 5 MiB on S3
    data = bytearray((staging / changed).read_bytes())
    data[-1] ^= 1  # same size, other bytes
    (staging / changed).write_bytes(data)
    with pytest.raises(
        LoramError, match=rf"staged {changed} changed after it was hashed .* was not published"
    ):
        publish(staging, m, bucket.uri)
    keys = stored(bucket)
    assert f"m/v1/{changed}" not in keys and "m/v1/manifest.json" not in keys and "m/LATEST" not in keys
    assert open_uploads(bucket) == []  # the multipart upload was aborted, the temporary file removed


def test_a_file_changed_while_its_parts_go_up_is_not_completed(
    s3: str, tmp_path: Path, small_parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One part in flight, so the second part is read only after the first was sent: the change made
    then is in the bytes read, and the whole-file hash taken while reading refuses them."""
    monkeypatch.setattr(upload, "PARTS_IN_FLIGHT", 1)
    monkeypatch.setattr(upload, "FILES_IN_FLIGHT", 1)
    staging, m = staged_version(tmp_path, big=12 * MiB)

    def tamper(event: dict) -> None:
        if event["what"] == "model/w.bin":
            with open(staging / "model" / "w.bin", "r+b") as fh:
                fh.seek(11 * MiB)
                fh.write(b"changed")

    with pytest.raises(LoramError, match=r"staged model/w.bin changed after it was hashed"):
        publish(staging, m, s3, progress=tamper)
    bucket = Bucket(s3, lambda k, d: None, "s3")
    assert "m/v1/model/w.bin" not in stored(bucket) and "m/LATEST" not in stored(bucket)
    assert open_uploads(bucket) == []


BAD_NAMES = ["../tenantB", "a/b", "", ".", "..", "-x", "x" * 129, "v1\n", "a b", "caf\u00e9"]


@pytest.mark.parametrize("field", ["name", "version"])
@pytest.mark.parametrize("bad", BAD_NAMES, ids=[repr(b)[:20] for b in BAD_NAMES])
def test_publish_refuses_a_name_or_version_as_the_config_does(
    bucket: Bucket, tmp_path: Path, field: str, bad: str
) -> None:
    staging, m = staged_version(tmp_path)
    setattr(m, field, bad)  # assigned after the model was built: not validated yet
    with pytest.raises(LoramError, match=rf"publish: the {field} .* is not a valid name: letters, digits"):
        publish(staging, m, bucket.uri)
    assert stored(bucket) == {} if bucket.kind == "s3" else not Path(bucket.uri[7:]).exists()
    with pytest.raises(ValidationError):  # the same rule
        PublishConfig.model_validate({field: bad})


@pytest.mark.parametrize("stray", ["manifest.json", ".claim", "MANIFEST.JSON"])
def test_a_stray_reserved_file_among_the_staged_files_is_refused(
    bucket: Bucket, tmp_path: Path, stray: str
) -> None:
    staging, m = staged_version(tmp_path)
    (staging / stray).write_text('{"not": "a manifest"}')
    m.files = list_files(staging)  # as steps.publish does: every staged file, the stray one too
    with pytest.raises(LoramError, match=rf"'{re.escape(stray)}', a name written by loram itself"):
        publish(staging, m, bucket.uri)
    assert stored(bucket) == {} if bucket.kind == "s3" else not Path(bucket.uri[7:]).exists()


def test_what_killed_publishes_left_is_swept_by_the_next(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open uploads under the version being published go; under other versions of the name only a
    day old ones (moto dates every upload 2010); probe keys only an hour old."""
    if bucket.kind == "s3":
        client = boto3.client("s3")
        for key in ("m/v1/model/w.bin", "m/v0/model/w.bin"):
            upload_id = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
            client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * 100)
    else:
        tmp = Path(bucket.uri[7:]) / ".loram-tmp"
        for rel, age in (("m/v1/0.0.tmp", 0), ("m/v0/0.0.tmp", 2 * 86400), ("m/v9/0.0.tmp", 0)):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(b"x" * 100)
            os.utime(tmp / rel, (os.path.getmtime(tmp / rel) - age,) * 2)
    bucket.put(".loram-probe/left-by-a-kill", b"1")
    staging, m = staged_version(tmp_path)
    assert publish(staging, m, bucket.uri).status == "published"
    left = ["m/v9/0.0.tmp"] if bucket.kind == "file" else []
    assert [k.removeprefix(".loram-tmp/") for k in open_uploads(bucket)] == left
    assert ".loram-probe/left-by-a-kill" in stored(bucket)  # minutes old: could be a live probe's
    monkeypatch.setattr(upload, "PROBE_STALE_S", 0.0)  # as if an hour had passed
    staging, m = staged_version(tmp_path, version="v2")
    m.created_at = "2026-01-02T00:00:00+00:00"
    publish(staging, m, bucket.uri)
    assert not [k for k in stored(bucket) if k.startswith(".loram-probe/")]
    assert verify_version(f"{bucket.uri}/m").version == "v2"


def test_a_pulled_copy_is_a_version_only_where_the_folder_name_is_not_checked(
    bucket: Bucket, tmp_path: Path
) -> None:
    """A pulled folder holds manifest.json under a name of the consumer's choosing: strict resolution
    refuses it as m/v1 (the URI says 'copies/mine'), recovery's lenient one reads it."""
    lay(bucket, PAYLOAD)
    pull(f"{bucket.uri}/m/v1", tmp_path / "copies" / "mine", cache=False)
    with pytest.raises(IntegrityError, match="is the manifest of 'm'/'v1', but the URI asks for copies/mine"):
        resolve_version(f"file://{tmp_path / 'copies' / 'mine'}")
    uri, manifest = resolve_version(f"file://{tmp_path / 'copies' / 'mine'}", check_uri=False)
    assert (manifest.name, manifest.version) == ("m", "v1") and uri.endswith("copies/mine")
