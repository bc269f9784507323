"""Finding and checking a published version in place: `resolve_version`, `verify_version`.

What the bucket hands back (its manifest, its LATEST) goes through `untrusted`: a version found
is one whose manifest names exactly the name and version the URI asked for.
"""

from __future__ import annotations

import hashlib

from fsspec.core import split_protocol

from loram_core.bucket.store import PART_SIZE, Changed, Store, join, open_store
from loram_core.bucket.untrusted import (
    MAX_LATEST_BYTES,
    MAX_MANIFEST_BYTES,
    parse_latest,
    parse_manifest,
    read_bounded,
)
from loram_core.errors import IntegrityError, LoramError
from loram_core.manifest import NAME_RULE, FileEntry, Manifest, check_name, safe_relative

FORMS = "give <bucket>/<name> or <bucket>/<name>/<version>"


def _tail(uri: str, n: int) -> list[str]:
    """The last `n` parts of a URI's path, each a valid name (else a `LoramError` naming the URI)."""
    parts = split_protocol(uri)[1].split("/")
    if len(parts) < n + 1 or not all(parts[-n:]):
        raise LoramError(f"{uri!r} is too short to name a version; {FORMS}.")
    try:
        return [check_name(p, "the URI part") for p in parts[-n:]]
    except LoramError as err:
        raise LoramError(f"{uri!r}: {err} A name and a version are {NAME_RULE}; {FORMS}.") from None


def resolve_version(uri: str, *, check_uri: bool = True) -> tuple[str, Manifest]:
    """A version URI, or a name URI meaning the version its `LATEST` names -> (version URI, manifest).

    Args:
        uri: `<bucket>/<name>` or `<bucket>/<name>/<version>`.
        check_uri: a version folder's manifest must name the `<name>/<version>` its URI ends in.
            False only for a folder known under a name of its own, such as a pulled copy. (Through
            LATEST, the manifest must always name `<name>` and the version LATEST names.)

    Raises:
        LoramError: neither a version nor a name is there.
        IntegrityError: the manifest or LATEST is refused (too large, malformed, unsafe, or naming
            another version than the URI asked for).
    """
    uri = uri.rstrip("/")
    store = open_store(uri)
    where = f"{uri}/manifest.json"
    try:
        data = read_bounded(store, "manifest.json", MAX_MANIFEST_BYTES, where)
        return uri, parse_manifest(data, where, expect=tuple(_tail(uri, 2)) if check_uri else None)
    except FileNotFoundError:
        pass
    (name,) = _tail(uri, 1)
    try:
        version = parse_latest(
            read_bounded(store, "LATEST", MAX_LATEST_BYTES, f"{uri}/LATEST"), f"{uri}/LATEST"
        )
    except FileNotFoundError:
        raise LoramError(
            f"{uri!r} is neither a published version (no manifest.json) nor a name (no LATEST); {FORMS}."
        ) from None
    version_uri = join(uri, version)
    where = f"{version_uri}/manifest.json"
    try:
        data = read_bounded(store, join(version, "manifest.json"), MAX_MANIFEST_BYTES, where)
    except FileNotFoundError:
        raise LoramError(f"LATEST names version {version!r}, but it has no manifest.json at {uri}.") from None
    return version_uri, parse_manifest(data, where, expect=(name, version))


def object_sha256(store: Store, key: str, size: int, etag: str) -> str:
    """sha256 of an object streamed in ranges pinned to its ETag (raises `Changed` if it changes)."""
    h = hashlib.sha256()
    for start in range(0, size, PART_SIZE):
        h.update(store.read_range(key, start, min(start + PART_SIZE, size), etag))
    return h.hexdigest()


def _problem(store: Store, entry: FileEntry) -> str | None:
    key = safe_relative(entry.path)
    info = store.head(key)
    if info is None:
        return f"{entry.path}: missing"
    if info.size != entry.size:
        return f"{entry.path}: {info.size} bytes, manifest says {entry.size}"
    try:
        if object_sha256(store, key, info.size, info.etag) != entry.sha256:
            return f"{entry.path}: sha256 differs from the manifest"
    except Changed:
        return f"{entry.path}: changed while it was read"
    return None


def verify_version(uri: str) -> Manifest:
    """Check every file of a published version against its manifest (size and sha256, read in place).

    Raises:
        IntegrityError: listing the files that are missing, of the wrong size or hash, or unsafe.
    """
    version_uri, manifest = resolve_version(uri)
    store = open_store(version_uri)
    problems = [p for p in (_problem(store, e) for e in manifest.files) if p]
    if problems:
        raise IntegrityError(f"{version_uri} fails verification: " + "; ".join(problems[:10]) + ".")
    return manifest
