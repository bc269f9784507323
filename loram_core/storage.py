"""Publishing to and reading from a bucket through fsspec (file://, s3://, ... one code path).

A version is immutable and exists iff its `manifest.json` exists: files go up first, the manifest
last, `LATEST` after it. A failed upload removes what it wrote. Publishing the same content
again is a no-op; different content under an existing version is refused.
"""

from __future__ import annotations

from pathlib import Path

from fsspec.core import url_to_fs

from loram_core.errors import IntegrityError, LoramError
from loram_core.manifest import Manifest, safe_relative, sha256_file


def bucket_fs(uri: str):
    """(filesystem, root path) of a bucket URI; a `LoramError` naming the URI if it cannot be opened."""
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise LoramError(
            f"cannot open bucket URI {uri!r}: {err}. Use file://PATH or s3://BUCKET/PREFIX."
        ) from None


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def publish_version(staging: Path, manifest: Manifest, uri: str) -> str:
    """Upload `staging` (the version's files, manifest excluded) and then its manifest.

    Returns:
        The version's URI, `<uri>/<name>/<version>`.

    Raises:
        LoramError: the version exists with different content.
    """
    fs, root = bucket_fs(uri)
    version_root = _join(root, manifest.name, manifest.version)
    manifest_path = _join(version_root, "manifest.json")
    if fs.exists(manifest_path):
        existing = Manifest.model_validate_json(fs.cat_file(manifest_path))
        if existing.content_key() == manifest.content_key():
            _move_latest(fs, root, manifest)
            return _join(uri, manifest.name, manifest.version)
        raise LoramError(
            f"version {manifest.name}/{manifest.version} already exists at {uri} with different content; "
            "versions are immutable. Publish under a new publish.version (or leave it unset for a timestamp)."
        )
    if fs.exists(version_root):
        fs.rm(version_root, recursive=True)  # leftovers of a failed upload: no manifest, no version
    try:
        for entry in manifest.files:
            target = _join(version_root, entry.path)
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(staging / entry.path), target)
            if fs.size(target) != entry.size:
                raise LoramError(
                    f"upload of {entry.path} to {target} is incomplete ({fs.size(target)} of {entry.size} bytes)."
                )
        with fs.open(manifest_path, "w") as fh:
            fh.write(manifest.model_dump_json(indent=2))
    except BaseException:
        fs.rm(version_root, recursive=True)
        raise
    _move_latest(fs, root, manifest)
    return _join(uri, manifest.name, manifest.version)


def _move_latest(fs, root: str, manifest: Manifest) -> None:
    latest = _join(root, manifest.name, "LATEST")
    current = fs.cat_file(latest).decode().strip() if fs.exists(latest) else None
    # LATEST only moves forward: re-publishing an older version does not roll it back.
    if current is None or current <= manifest.version:
        with fs.open(latest, "w") as fh:
            fh.write(manifest.version + "\n")


def resolve_version(uri: str) -> tuple[str, Manifest]:
    """A version URI, or a name URI meaning the version its `LATEST` names -> (version URI, manifest)."""
    fs, path = bucket_fs(uri)
    path = path.rstrip("/")
    if not fs.exists(_join(path, "manifest.json")):
        latest = _join(path, "LATEST")
        if not fs.exists(latest):
            raise LoramError(
                f"{uri!r} is neither a published version (no manifest.json) nor a name (no LATEST); "
                "give <bucket>/<name> or <bucket>/<name>/<version>."
            )
        version = fs.cat_file(latest).decode().strip()
        uri, path = _join(uri.rstrip("/"), version), _join(path, version)
        if not fs.exists(_join(path, "manifest.json")):
            raise LoramError(f"LATEST names version {version!r}, but it has no manifest.json at {uri}.")
    try:
        manifest = Manifest.model_validate_json(fs.cat_file(_join(path, "manifest.json")))
    except ValueError as err:
        raise IntegrityError(f"manifest.json at {uri} is not a valid manifest: {err}") from None
    return uri.rstrip("/"), manifest


def verify_version(uri: str) -> Manifest:
    """Check every file of a published version against its manifest (size and sha256).

    Raises:
        IntegrityError: listing the files that are missing, of the wrong size or hash, or unsafe.
    """
    version_uri, manifest = resolve_version(uri)
    fs, root = bucket_fs(version_uri)
    problems = []
    for entry in manifest.files:
        target = _join(root, safe_relative(entry.path))
        if not fs.exists(target):
            problems.append(f"{entry.path}: missing")
        elif fs.size(target) != entry.size:
            problems.append(f"{entry.path}: {fs.size(target)} bytes, manifest says {entry.size}")
        elif sha256_file(target, fs) != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the manifest")
    if problems:
        raise IntegrityError(f"{version_uri} fails verification: " + "; ".join(problems) + ".")
    return manifest
