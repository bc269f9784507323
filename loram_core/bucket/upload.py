"""Publishing one immutable version: files first, `manifest.json` last and create-only, then `LATEST`.

A version exists iff its manifest exists. Every object is written create-only, so nothing a
publisher wrote is ever replaced: a re-run after an interruption finds the files it already
uploaded (same size and sha256) and uploads only the rest; a racing publisher of other content
is refused at the first file or at the manifest, whichever it reaches first; the same content
published again is a no-op ("unchanged"). The bytes uploaded are the bytes hashed: each file is
hashed again as it is read for sending, and one that no longer matches its manifest entry is not
kept (its upload aborted) and the version is not published. Finished files are never deleted
(objects under a version without a manifest are not a version, and deleting them could pull files
from under a racing publisher of the same content); what a killed run leaves unfinished is swept by
the next: open uploads under the version it claims (and those a day old under the same name), and
create-only probe keys an hour old.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from loram_core.bucket.store import (
    Aborted,
    Budget,
    ByteCounter,
    Changed,
    Exists,
    StagedChanged,
    Store,
    TooLarge,
    join,
    open_store,
)
from loram_core.bucket.untrusted import (
    MAX_LATEST_BYTES,
    MAX_MANIFEST_BYTES,
    parse_latest,
    parse_manifest,
    read_bounded,
)
from loram_core.errors import LoramError
from loram_core.manifest import FileEntry, Manifest, check_name, validation_message

PARTS_IN_FLIGHT = 16  # the shared budget: parts (or small files) being sent at once, over all files
FILES_IN_FLIGHT = 8
PROBE_PREFIX = ".loram-probe"
CLAIM = ".claim"  # beside manifest.json: which content this version is being published with
OPT_OUT = "publish.check_create_only=false"
PROBE_STALE_S = 3600.0  # a probe takes two requests: a probe key an hour old belongs to a killed run
UPLOAD_STALE_S = 86400.0  # an upload under another version of the name begun a day ago is abandoned

Progress = Callable[[dict], None]


@dataclass(frozen=True)
class Publication:
    """What a publish did: the version's URI and `status` (published | unchanged), bytes sent."""

    uri: str
    status: str
    uploaded_files: int
    uploaded_bytes: int
    skipped_files: int


def publish(
    staging: Path,
    manifest: Manifest,
    uri: str,
    *,
    check_create_only: bool = True,
    progress: Progress | None = None,
) -> Publication:
    """Upload `staging` (the version's files, manifest excluded), then its manifest, then move `LATEST`.

    Args:
        staging: local folder holding every file the manifest lists.
        manifest: the version's manifest (files with size and sha256).
        uri: the bucket root (`file://...`, `s3://bucket/prefix`).
        check_create_only: first check that the store refuses a second create-only write.
        progress: called with `{"step": MiB sent, "total": MiB, "what": file}` while uploading.

    Returns:
        The `Publication`; its `status` is "unchanged" when the version already held this content.

    Raises:
        LoramError: the version exists (or is being written) with different content, the store
            does not honour create-only writes, or an upload fails for good (naming the file).
        LoramError: also a name or version that breaks the publish rule, a manifest the strict
            model refuses (unsafe or reserved paths, such as a stray top-level manifest.json among
            the staged files), or a staged file whose bytes changed after they were hashed (that
            file is not kept, and the version is not published); all before LATEST moves.
        FileNotFoundError: a file the manifest lists is missing from `staging` (nothing is sent).
    """
    manifest = _checked(manifest)
    for entry in manifest.files:  # a staging error is found before anything is sent
        if (staging / entry.path).stat().st_size != entry.size:
            raise LoramError(f"staged {entry.path} is not the size the manifest records; stage it again.")
    store = open_store(uri, budget=PARTS_IN_FLIGHT)
    version_key = join(manifest.name, manifest.version)
    version_uri = join(uri, version_key)
    if existing := _same_as_published(store, manifest, version_uri):
        _sweep_uploads(store, manifest)
        move_latest(store, existing)  # by the existing version's publication time, not this run's
        return Publication(version_uri, "unchanged", 0, 0, len(manifest.files))
    if check_create_only:
        probe_create_only(store)
    _claim(store, manifest, version_key, version_uri)
    _sweep_uploads(store, manifest)  # the version is ours now: what a killed run left open goes
    sent, skipped = _upload_files(store, staging, manifest, version_key, version_uri, progress)
    try:
        store.put_bytes(
            join(version_key, "manifest.json"), manifest.model_dump_json(indent=2).encode(), create=True
        )
    except Exists:
        if existing := _same_as_published(store, manifest, version_uri):  # a racer of the same content won
            move_latest(store, existing)
            return Publication(version_uri, "unchanged", *sent, skipped)
        raise _clash(version_uri) from None
    move_latest(store, manifest)
    return Publication(version_uri, "published", *sent, skipped)


def publish_version(staging: Path, manifest: Manifest, uri: str, **kwargs) -> str:
    """`publish`, returning only the version's URI (the older interface)."""
    return publish(staging, manifest, uri, **kwargs).uri


def _checked(manifest: Manifest) -> Manifest:
    """The manifest, validated whole by the strict model the consumer parses it with (a manifest
    built in code, or given files after it was made, has not been)."""
    check_name(manifest.name, "publish: the name")
    check_name(manifest.version, "publish: the version")
    try:
        return Manifest.model_validate(manifest.model_dump())
    except ValidationError as err:
        raise LoramError(
            f"publish: the manifest of {manifest.name}/{manifest.version} is refused: {validation_message(err)}. "
            "Remove the file from the staging folder (manifest.json and .claim at its top are written by "
            "the publish itself) or rename it."
        ) from None


def _sweep_uploads(store: Store, manifest: Manifest) -> None:
    """Abort what killed publishes left unfinished: every open upload under this version (it is ours:
    claimed, or published with this content) and those begun a day ago under other versions of the name.

    Best effort: a key without the right to list or abort uploads publishes all the same.
    """
    with contextlib.suppress(LoramError):
        store.abort_uploads(join(manifest.name, manifest.version), older_than_s=0)
        store.abort_uploads(manifest.name, older_than_s=UPLOAD_STALE_S)


def _clash(version_uri: str) -> LoramError:
    return LoramError(
        f"version {version_uri} already exists in the bucket with different content (or another publisher claimed it "
        "first); versions are immutable. Publish under a new publish.version (or leave it unset for a "
        "timestamp)."
    )


def _claim(store: Store, manifest: Manifest, version_key: str, version_uri: str) -> None:
    """Claim the version for this content before any file goes up (create-only `.claim`).

    Without it, two publishers of different content could each win some files and both be
    refused; with it, the first claim wins and the other is refused before it sends a byte. A
    claim of the same content (an interrupted run of this publication) lets the run resume.
    """
    ours = hashlib.sha256(json.dumps(manifest.content_key()).encode()).hexdigest()
    key = join(version_key, CLAIM)
    try:
        store.put_bytes(
            key, json.dumps({"content": ours, "created_at": manifest.created_at}).encode(), create=True
        )
        return
    except Exists:
        pass
    try:
        theirs = json.loads(store.read(key, limit=MAX_LATEST_BYTES)[0]).get("content")
    except (ValueError, AttributeError, TooLarge):  # not a claim we write: another publication's
        theirs = None
    if theirs == ours:
        return
    if _same_as_published(store, manifest, version_uri):  # raises if published with other content
        return
    raise LoramError(
        f"version {version_uri} is being published with other content: its {CLAIM} names another "
        "publication and it has no manifest yet (another publisher is writing it, or an interrupted "
        f"publish of other content left it). Publish under another publish.version, or delete {version_uri}/ "
        "if no one else is publishing it."
    )


def _same_as_published(store: Store, manifest: Manifest, version_uri: str) -> Manifest | None:
    """The published manifest if the version exists with this content (else None); raises if it
    exists with other content."""
    where = f"{version_uri}/manifest.json"
    try:
        data = read_bounded(
            store, join(manifest.name, manifest.version, "manifest.json"), MAX_MANIFEST_BYTES, where
        )
    except FileNotFoundError:
        return None
    existing = parse_manifest(data, where, expect=(manifest.name, manifest.version))
    if existing.content_key() != manifest.content_key():
        raise _clash(version_uri)
    return existing


def _upload_files(
    store: Store,
    staging: Path,
    manifest: Manifest,
    version_key: str,
    version_uri: str,
    progress: Progress | None,
) -> tuple[tuple[int, int], int]:
    """Upload the files not already there; ((files sent, bytes sent), files found complete)."""
    todo: list[FileEntry] = []
    for entry in manifest.files:
        if _already_there(store, join(version_key, entry.path), entry, version_uri):
            continue
        todo.append(entry)
    total = sum(e.size for e in todo)
    advance = ByteCounter(total, progress).advance
    with (
        ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="loram-part") as parts,
        ThreadPoolExecutor(FILES_IN_FLIGHT, thread_name_prefix="loram-file") as files,
    ):
        budget = Budget(PARTS_IN_FLIGHT, parts)

        def one(entry: FileEntry, attempts: int = 2) -> None:
            key = join(version_key, entry.path)
            try:
                store.put_file(staging / entry.path, key, entry.size, entry.sha256, budget,
                               lambda n: advance(n, entry.path))  # fmt: skip
            except Exists:  # someone wrote it meanwhile: fine if it is the same content
                if not _already_there(store, key, entry, version_uri):
                    raise _clash(version_uri) from None
            except Aborted:  # another publish of this content swept our upload: it may have sent it
                if not _already_there(store, key, entry, version_uri):
                    if attempts == 1:
                        raise LoramError(
                            f"uploading {entry.path}: its upload was aborted twice; run again."
                        ) from None
                    one(entry, attempts - 1)
            except StagedChanged as err:
                raise _changed(entry, err.sha256, version_uri) from None
            except LoramError as err:
                raise LoramError(f"uploading {entry.path}: {err}") from None

        for future in [files.submit(one, e) for e in todo]:
            future.result()
    return (len(todo), total), len(manifest.files) - len(todo)


def _changed(entry: FileEntry, sha256: str | None, version_uri: str) -> LoramError:
    now = f"hash to {sha256[:12]}..." if sha256 else "are fewer"
    return LoramError(
        f"staged {entry.path} changed after it was hashed for the manifest (sha256 {entry.sha256[:12]}...; the "
        f"bytes read for upload {now}): it was not kept in the bucket and {version_uri} was not published "
        "(no manifest, LATEST unchanged). Stage the version again and publish it under a new "
        f"publish.version (or delete the objects under {version_uri}/ first)."
    )


def _already_there(store: Store, key: str, entry: FileEntry, version_uri: str) -> bool:
    """Whether `key` holds this entry's bytes (a finished upload of an earlier, interrupted run).

    Raises:
        LoramError: it holds other bytes, which only another publisher (or an interrupted run of
            other content) wrote: the version cannot be completed with this content.
    """
    info = store.head(key)
    if info is None:
        return False
    sha = info.sha256 or store.content_sha256(key)
    if info.size == entry.size and sha == entry.sha256:
        return True
    raise LoramError(
        f"{version_uri}/{entry.path} exists with other content and the version has no manifest yet: another "
        "publisher is writing this version, or an interrupted publish of other content left it. Publish under "
        f"another publish.version, or delete the objects under {version_uri}/ if no one else is publishing."
    )


def probe_create_only(store: Store) -> None:
    """Check that the store refuses a second create-only write of one key (and clean up the probe).

    Probe keys an hour old, which only a run killed mid-probe leaves, are deleted as well.

    Raises:
        LoramError: the store accepted both writes, so it cannot guarantee that a version is
            claimed once; names the opt-out for stores known to be written by one publisher.
    """
    key = join(PROBE_PREFIX, uuid.uuid4().hex)
    store.put_bytes(key, b"1", create=True)
    try:
        store.put_bytes(key, b"2", create=True)
    except Exists:
        return
    finally:
        store.delete(key)
        _sweep_probes(store)
    raise LoramError(
        f"the store at {store.uri} accepted a second create-only write (If-None-Match: *) of one key, so it "
        "cannot guarantee that a version is claimed once and never overwritten. Use a store that honours "
        f"conditional writes (AWS S3, MinIO, recent Ceph/R2), or set {OPT_OUT} if only one publisher ever "
        "writes this bucket."
    )


def _sweep_probes(store: Store) -> None:
    """Delete probe keys older than `PROBE_STALE_S` (a live probe's key is seconds old; a younger
    leftover waits for a later run, since deleting a live one would fail that probe)."""
    now = time.time()
    with contextlib.suppress(LoramError):  # best effort, as `_sweep_uploads`
        for key, modified in store.list_modified(PROBE_PREFIX, limit=1000):
            if now - modified >= PROBE_STALE_S:
                store.delete(key)


def _published_at(store: Store, name: str, version: str) -> str | None:
    """When the version was published (its manifest's `created_at`); None if it has no valid manifest."""
    where = f"{store.uri}/{name}/{version}/manifest.json"
    try:
        data = read_bounded(store, join(name, version, "manifest.json"), MAX_MANIFEST_BYTES, where)
        return parse_manifest(data, where, expect=(name, version)).created_at
    except (FileNotFoundError, LoramError):
        return None


def _newer(a: str, b: str) -> bool:
    return datetime.fromisoformat(a) > datetime.fromisoformat(b)


def move_latest(store: Store, manifest: Manifest) -> None:
    """Point `<name>/LATEST` at this version if it is newer (by `created_at`) than the one it names.

    Ordered by publication time, not by the version ids' spelling (so v10 follows v9); never moved
    back. The write is a compare-and-swap on LATEST's ETag (create-only when there is none), retried
    when another publisher moved it in between.
    """
    key = join(manifest.name, "LATEST")
    for _ in range(20):
        try:
            data, etag = store.read(key, limit=MAX_LATEST_BYTES)
        except FileNotFoundError:
            data, etag = None, None
        except TooLarge:  # a LATEST too large to be ours: replaced (etag None would be create-only)
            data, etag = b"", store.head(key).etag
        if data is not None:
            try:
                current = parse_latest(data, f"{store.uri}/{key}")
            except LoramError:
                current = None  # names no version: any version is newer
            if current == manifest.version:
                return
            current_at = _published_at(store, manifest.name, current) if current else None
            if current_at is not None and not _newer(manifest.created_at, current_at):
                return
        try:
            store.put_bytes(key, (manifest.version + "\n").encode(), create=etag is None, if_match=etag)
            return
        except (Exists, Changed):
            continue  # another publisher moved it: look again
    raise LoramError(f"could not move {store.uri}/{key}: it kept changing under 20 attempts.")


__all__ = ["Publication", "move_latest", "probe_create_only", "publish", "publish_version"]
