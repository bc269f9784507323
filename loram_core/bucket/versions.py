"""Finding and checking a published version in place: `resolve_version`, `verify_version`."""

from __future__ import annotations

import hashlib

from loram_core.bucket.store import PART_SIZE, Changed, Store, join, open_store
from loram_core.errors import IntegrityError, LoramError
from loram_core.manifest import FileEntry, Manifest, safe_relative


def resolve_version(uri: str) -> tuple[str, Manifest]:
    """A version URI, or a name URI meaning the version its `LATEST` names -> (version URI, manifest)."""
    uri = uri.rstrip("/")
    store = open_store(uri)
    try:
        data, _ = store.read("manifest.json")
    except FileNotFoundError:
        try:
            version = store.read("LATEST")[0].decode().strip()
        except FileNotFoundError:
            raise LoramError(
                f"{uri!r} is neither a published version (no manifest.json) nor a name (no LATEST); "
                "give <bucket>/<name> or <bucket>/<name>/<version>."
            ) from None
        try:
            data, _ = store.read(join(version, "manifest.json"))
        except FileNotFoundError:
            raise LoramError(
                f"LATEST names version {version!r}, but it has no manifest.json at {uri}."
            ) from None
        uri = join(uri, version)
    try:
        manifest = Manifest.model_validate_json(data)
    except ValueError as err:
        raise IntegrityError(f"manifest.json at {uri} is not a valid manifest: {err}") from None
    return uri, manifest


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
        raise IntegrityError(f"{version_uri} fails verification: " + "; ".join(problems) + ".")
    return manifest
