"""`pull`: a published version downloaded, verified and put in place, or nothing at all.

The bucket is not trusted: its manifest and LATEST pass `untrusted` (strict model, bounded sizes,
the name and version asked for) before anything is written, so a refusal leaves DEST and
everything beside it as they were. Files are fetched in byte ranges, several at once under one
budget of parts in flight, each range pinned to the object's ETag (`If-Match`), so a file is never
stitched from two objects. Each range's body is streamed straight into its place in a `.part` file
(no range-sized buffers: the copies and page faults of 64 MiB buffers cost more CPU than the
download itself), and the range is recorded as done beside it; an interrupted pull fetches only the
ranges not recorded (the object's ETag is kept beside it too). Once every range is there, the file
is hashed from disk, so what is checked against the manifest is what was written. Everything lands
in the pull's own staging folder (`staging.Area`: temporary files apart from the version's files,
named by digest), which is swapped with DEST only after every sha256 matched, then checked.
Verified files go into a content-addressed cache (`~/.cache/loram-provider/blobs/<sha256>`, or
`LORAM_CACHE_DIR`), keyed by validated digests only, and a cached blob is hashed again as it is
copied out, so pulling the next version downloads only the files that changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loram_core.bucket.staging import Area
from loram_core.bucket.store import Budget, ByteCounter, Changed, Store, file_sha256, join, open_store
from loram_core.bucket.versions import resolve_version
from loram_core.errors import IntegrityError, LoramError
from loram_core.manifest import DIGEST_PATTERN, FileEntry, Manifest

# Ranges of 64 MiB, at most 8 in flight (connections). Larger ranges cost fewer requests; stores
# that read a whole object to serve a range (moto) need few of them. Memory does not grow with them.
RANGE_SIZE = 64 * 2**20
PARTS_IN_FLIGHT = 8
FILES_IN_FLIGHT = 8
VARIANTS = ("model", "model-nf4", "masks")
Progress = Callable[[dict], None]


def default_cache() -> Path:
    """The content-addressed cache folder (`LORAM_CACHE_DIR`, else ~/.cache/loram-provider/blobs)."""
    return Path(os.environ.get("LORAM_CACHE_DIR") or Path.home() / ".cache" / "loram-provider" / "blobs")


def pull(
    uri: str,
    dest: str | Path,
    only: Iterable[str] | None = None,
    *,
    cache: Path | None | bool = True,
    progress: Progress | None = None,
) -> Manifest:
    """Download a published version into `dest`, verified file by file against its manifest.

    Args:
        uri: `<bucket>/<name>` (its LATEST) or `<bucket>/<name>/<version>`.
        dest: the folder to create (or replace, if it holds an earlier pull).
        only: variants to fetch among "model", "model-nf4", "masks" (default: all); the manifest
            and README.md always come.
        cache: True for `default_cache()`, a folder, or False for none.
        progress: called with `{"step": MiB fetched, "total": MiB, "what": file}`.

    Returns:
        The version's manifest.

    Raises:
        IntegrityError: the manifest or LATEST is refused (malformed, too large, unsafe paths,
            another name or version than asked for), or a file is missing, truncated, changed while
            read, or fails its sha256; each named. `dest` is then untouched.
        LoramError: a bad `only`, a `dest` that is not empty and not an earlier pull, or another
            pull into `dest` running.
    """
    version_uri, manifest = resolve_version(uri)  # every refusal of the bucket's contents comes here
    entries = _select(manifest, only, version_uri)
    dest = Path(dest).expanduser().absolute()
    _check_dest(dest)
    root, _, _ = version_uri.rstrip("/").rsplit("/", 2)
    store = open_store(root, budget=PARTS_IN_FLIGHT)
    cache_dir = default_cache() if cache is True else (Path(cache) if cache else None)
    expected = {e.path: e.size for e in entries} | {"manifest.json": -1}
    with Area(dest) as area:
        _check_dest(dest)  # again: a moved-aside DEST may just have been put back
        area.prune(set(expected))
        _fetch_all(store, join(manifest.name, manifest.version), entries, area, cache_dir, progress)
        body = manifest.model_dump_json(indent=2).encode()
        (area.tree / "manifest.json").write_bytes(body)
        area.swap_into_place(expected | {"manifest.json": len(body)})
    return manifest


def _select(manifest: Manifest, only: Iterable[str] | None, version_uri: str) -> list[FileEntry]:
    if not only:
        return list(manifest.files)
    wanted = list(only)
    for variant in wanted:
        if variant not in VARIANTS:
            raise LoramError(f"--only {variant!r} is not one of {', '.join(VARIANTS)}.")
        if not any(f.path.startswith(variant + "/") for f in manifest.files):
            raise LoramError(f"{version_uri} has no {variant}/ (published variants: {_variants(manifest)}).")
    return [f for f in manifest.files if "/" not in f.path or f.path.split("/", 1)[0] in wanted]


def _variants(manifest: Manifest) -> str:
    variants = sorted({f.path.split("/", 1)[0] for f in manifest.files if "/" in f.path})
    return ", ".join(v[:40] for v in variants[:10]) + (", ..." if len(variants) > 10 else "")


def _check_dest(dest: Path) -> None:
    if dest.exists() and not (
        dest.is_dir() and (not any(dest.iterdir()) or (dest / "manifest.json").is_file())
    ):
        raise LoramError(
            f"pull destination {dest} exists and is not an earlier pull (no manifest.json); give a new or "
            "empty folder."
        )


def _fetch_all(
    store: Store, version_key: str, entries: list[FileEntry], area: Area, cache: Path | None,
    progress: Progress | None,
) -> None:  # fmt: skip
    advance = ByteCounter(sum(e.size for e in entries), progress).advance
    groups: dict[str, list[FileEntry]] = {}  # one fetch per content, however many paths hold it
    for entry in entries:
        groups.setdefault(entry.sha256, []).append(entry)
    with (
        ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="loram-range") as parts,
        ThreadPoolExecutor(FILES_IN_FLIGHT, thread_name_prefix="loram-get") as files,
    ):
        budget = Budget(PARTS_IN_FLIGHT, parts)

        def one(group: list[FileEntry]) -> None:
            _fetch_content(store, version_key, group, area, cache, budget, advance)

        futures = [files.submit(one, g) for g in groups.values()]
        errors = []
        for f in futures:
            try:
                f.result()
            except LoramError as err:
                errors.append(str(err))
    if errors:
        raise IntegrityError(" ".join(errors[:10]))


def _holds(path: Path, size: int, sha256: str) -> bool:
    """Whether `path` is a plain file with these bytes (verified by an earlier, interrupted pull)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size and file_sha256(path) == sha256


def _fetch_content(
    store: Store, version_key: str, group: list[FileEntry], area: Area, cache: Path | None, budget: Budget,
    advance: Callable[[int, str], None],
) -> None:  # fmt: skip
    """Put one content (one sha256) at every path of the version that holds it."""
    first = group[0]
    finals = [area.tree / e.path for e in group]
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
    have = next((f for f in finals if _holds(f, first.size, first.sha256)), None)
    if have is None and cache is not None and _from_cache(cache, first, finals[0], area.scratch):
        have = finals[0]
    if have is None:
        have = finals[0]
        _download(store, join(version_key, first.path), first, have, area.scratch, budget,
                  lambda n: advance(n, first.path))  # fmt: skip
        if cache is not None:
            _to_cache(cache, first, have)
    else:
        advance(first.size, first.path)
    for entry, final in zip(group, finals, strict=True):
        if final != have:
            tmp = area.scratch / f"{first.sha256}.copy"
            shutil.copyfile(have, tmp)
            os.replace(tmp, final)
            advance(entry.size, entry.path)


def _download(
    store: Store, key: str, entry: FileEntry, final: Path, scratch: Path, budget: Budget,
    advance: Callable[[int], None],
) -> None:  # fmt: skip
    info = store.head(key)
    if info is None:
        raise IntegrityError(f"{entry.path}: missing from the bucket ({store.uri}/{key}).")
    if info.size != entry.size:
        raise IntegrityError(
            f"{entry.path}: {info.size} bytes in the bucket, the manifest says {entry.size}."
        )
    # Named by the validated digest, in scratch/: no file of the version can share these names.
    part = scratch / f"{entry.sha256}.part"
    tag = scratch / f"{entry.sha256}.etag"
    done_file = scratch / f"{entry.sha256}.ranges"
    done = _ranges_done(part, tag, done_file, info.etag, entry.size)
    if not done:
        with open(part, "wb") as fh:
            fh.truncate(entry.size)
        tag.write_text(info.etag)
        done_file.write_text("")
    advance(sum(min(RANGE_SIZE, entry.size - start) for start in done))
    todo = [start for start in range(0, entry.size, RANGE_SIZE) if start not in done]
    record = threading.Lock()
    fd = os.open(part, os.O_WRONLY)
    try:

        def fetch(start: int) -> None:
            end = min(start + RANGE_SIZE, entry.size)
            n = store.write_range(key, start, end, info.etag, fd)
            if n != end - start:
                raise IntegrityError(f"{entry.path}: a range came back with {n} of {end - start} bytes.")
            with record, open(done_file, "a") as fh:
                fh.write(f"{start} {end}\n")
            advance(n)

        futures = []
        for start in todo:
            budget.take()
            futures.append(budget.run(fetch, start))
        errors = [err for f in futures if (err := f.exception()) is not None]  # every range ends first
    finally:
        os.close(fd)
    if errors:
        if isinstance(errors[0], Changed):
            raise IntegrityError(
                f"{entry.path}: the object changed while it was downloaded ({store.uri}/{key})."
            )
        raise errors[0]
    if file_sha256(part) != entry.sha256:
        for leftover in (part, tag, done_file):
            leftover.unlink()
        raise IntegrityError(
            f"{entry.path}: sha256 of the downloaded bytes differs from the manifest ({store.uri}/{key})."
        )
    tag.unlink()
    done_file.unlink()
    os.replace(part, final)


def _ranges_done(part: Path, tag: Path, done_file: Path, etag: str, size: int) -> set[int]:
    """The ranges an earlier, interrupted pull of this very object (same ETag) wrote, by start offset.

    Only whole lines naming one of this pull's ranges count (a line cut by a crash, or ranges of
    another size, are fetched again); the file's sha256 is checked at the end in any case.
    """
    if not (part.is_file() and tag.is_file() and done_file.is_file()):
        return set()
    if tag.read_text() != etag or part.stat().st_size != size:
        return set()
    ranges = {f"{start} {min(start + RANGE_SIZE, size)}": start for start in range(0, size, RANGE_SIZE)}
    return {ranges[line] for line in done_file.read_text().splitlines() if line in ranges}


def _blob(cache: Path, sha256: str) -> Path:
    """The cache's file for a digest: only a validated one, so the path stays inside the cache."""
    if not re.fullmatch(DIGEST_PATTERN, sha256):
        raise IntegrityError(f"refusing the digest {sha256[:70]!r} as a cache key.")
    return cache / sha256


def _from_cache(cache: Path, entry: FileEntry, final: Path, scratch: Path) -> bool:
    """Copy a cached blob into place if it is still intact (hashed while copied); a damaged one
    (an edited hard link) is removed from the cache."""
    blob = _blob(cache, entry.sha256)
    try:
        st = os.lstat(blob)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False  # not ours to remove
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
        blob.unlink()  # a link (never followed) or another size: not a blob we stored
        return False
    tmp = scratch / f"{entry.sha256}.cache"
    h = hashlib.sha256()
    with open(blob, "rb") as src, open(tmp, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            dst.write(chunk)
    if h.hexdigest() != entry.sha256:
        blob.unlink(missing_ok=True)
        tmp.unlink()
        return False
    os.replace(tmp, final)
    return True


def _to_cache(cache: Path, entry: FileEntry, final: Path) -> None:
    blob = _blob(cache, entry.sha256)
    cache.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(blob):
        return
    tmp = cache / f".{entry.sha256}.{uuid.uuid4().hex[:8]}"
    try:
        os.link(final, tmp)
    except OSError:
        shutil.copyfile(final, tmp)
    os.replace(tmp, blob)
