"""`pull`: a published version downloaded, verified and put in place, or nothing at all.

Files are fetched in byte ranges, several at once under one budget of parts in flight, each
range pinned to the object's ETag (`If-Match`), so a file is never stitched from two objects.
Each range's body is streamed straight into its place in the `.part` file (no range-sized buffers:
the copies and page faults of 64 MiB buffers cost more CPU than the download itself), and the
range is recorded as done beside it; an interrupted pull fetches only the ranges not recorded (the
object's ETag is kept beside it too). Once every range is there, the file is hashed from disk, so
what is checked against the manifest is what was written. Everything lands in a staging folder
beside DEST, which is renamed into place only after every file's sha256 matched the manifest.
Verified files go into a content-addressed cache (`~/.cache/loram-provider/blobs/<sha256>`, or
`LORAM_CACHE_DIR`), so pulling the next version downloads only the files that changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loram_core.bucket.store import ByteCounter, Changed, Store, file_sha256, join, open_store
from loram_core.bucket.versions import resolve_version
from loram_core.errors import IntegrityError, LoramError
from loram_core.manifest import FileEntry, Manifest, safe_relative

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
        IntegrityError: a file is missing, truncated, changed while read, or fails its sha256, or a
            manifest path escapes `dest`; each named. `dest` is then untouched.
        LoramError: a bad `only`, or a `dest` that is not empty and not an earlier pull.
    """
    version_uri, manifest = resolve_version(uri)
    entries = _select(manifest, only, version_uri)
    dest = Path(dest).expanduser().absolute()
    _check_dest(dest)
    staging = dest.parent / f".{dest.name}.pull-{manifest.name}-{manifest.version}"
    for entry in entries:  # every path is checked before anything is written
        _inside(staging, entry.path)
    root, _, _ = version_uri.rstrip("/").rsplit("/", 2)
    store = open_store(root, budget=PARTS_IN_FLIGHT)
    cache_dir = default_cache() if cache is True else (Path(cache) if cache else None)
    staging.mkdir(parents=True, exist_ok=True)
    _fetch_all(store, join(manifest.name, manifest.version), entries, staging, cache_dir, progress)
    (staging / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    _into_place(staging, dest)
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
    return ", ".join(sorted({f.path.split("/", 1)[0] for f in manifest.files if "/" in f.path}))


def _inside(folder: Path, path: str) -> Path:
    """`folder/path`, refusing manifest paths that would land outside `folder`."""
    target = (folder / safe_relative(path)).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise IntegrityError(
            f"manifest lists the unsafe path {path!r}; refusing it (it would escape the destination)."
        )
    return folder / safe_relative(path)


def _check_dest(dest: Path) -> None:
    if dest.exists() and not (
        dest.is_dir() and (not any(dest.iterdir()) or (dest / "manifest.json").is_file())
    ):
        raise LoramError(
            f"pull destination {dest} exists and is not an earlier pull (no manifest.json); give a new or "
            "empty folder."
        )


def _into_place(staging: Path, dest: Path) -> None:
    """Rename the verified staging folder to `dest` (an earlier pull there is replaced whole)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        dest.rename(old)
    staging.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _Budget:
    """Parts in flight over all files: a slot is taken when a range is requested and given back
    once its bytes are written, so the connections in use stay at `slots` however many files."""

    def __init__(self, slots: int) -> None:
        self.sem = threading.Semaphore(slots)


def _fetch_all(
    store: Store, version_key: str, entries: list[FileEntry], staging: Path, cache: Path | None,
    progress: Progress | None,
) -> None:  # fmt: skip
    advance = ByteCounter(sum(e.size for e in entries), progress).advance
    budget = _Budget(PARTS_IN_FLIGHT)
    with (
        ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="loram-range") as parts,
        ThreadPoolExecutor(FILES_IN_FLIGHT, thread_name_prefix="loram-get") as files,
    ):

        def one(entry: FileEntry) -> None:
            _fetch_file(store, join(version_key, entry.path), entry, _inside(staging, entry.path), cache,
                        parts, budget, lambda n: advance(n, entry.path))  # fmt: skip

        futures = [files.submit(one, e) for e in entries]
        errors = []
        for f in futures:
            try:
                f.result()
            except LoramError as err:
                errors.append(str(err))
    if errors:
        raise IntegrityError(" ".join(errors))


def _fetch_file(
    store: Store, key: str, entry: FileEntry, final: Path, cache: Path | None, parts: ThreadPoolExecutor,
    budget: _Budget, advance: Callable[[int], None],
) -> None:  # fmt: skip
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file() and final.stat().st_size == entry.size and file_sha256(final) == entry.sha256:
        advance(entry.size)  # verified by an earlier, interrupted pull
        return
    if cache is not None and _from_cache(cache, entry, final):
        advance(entry.size)
        return
    info = store.head(key)
    if info is None:
        raise IntegrityError(f"{entry.path}: missing from the bucket ({store.uri}/{key}).")
    if info.size != entry.size:
        raise IntegrityError(
            f"{entry.path}: {info.size} bytes in the bucket, the manifest says {entry.size}."
        )
    part = final.with_name(final.name + ".part")
    tag = final.with_name(final.name + ".etag")
    done_file = final.with_name(final.name + ".ranges")
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
            try:
                end = min(start + RANGE_SIZE, entry.size)
                n = store.write_range(key, start, end, info.etag, fd)
                if n != end - start:
                    raise IntegrityError(f"{entry.path}: a range came back with {n} of {end - start} bytes.")
                with record, open(done_file, "a") as fh:
                    fh.write(f"{start} {end}\n")
                advance(n)
            finally:
                budget.sem.release()

        futures = []
        for start in todo:
            budget.sem.acquire()
            futures.append(parts.submit(fetch, start))
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
    if cache is not None:
        _to_cache(cache, entry, final)


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


def _from_cache(cache: Path, entry: FileEntry, final: Path) -> bool:
    """Copy a cached blob into place if it is still intact (hashed while copied)."""
    blob = cache / entry.sha256
    if not blob.is_file() or blob.stat().st_size != entry.size:
        return False
    tmp = final.with_name(final.name + ".cache")
    h = hashlib.sha256()
    with open(blob, "rb") as src, open(tmp, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            dst.write(chunk)
    if h.hexdigest() != entry.sha256:  # the cache was damaged (an edited hard link): drop the blob
        blob.unlink(missing_ok=True)
        tmp.unlink()
        return False
    os.replace(tmp, final)
    return True


def _to_cache(cache: Path, entry: FileEntry, final: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    blob = cache / entry.sha256
    if blob.exists():
        return
    tmp = cache / f".{entry.sha256}.{uuid.uuid4().hex[:8]}"
    try:
        os.link(final, tmp)
    except OSError:
        shutil.copyfile(final, tmp)
    os.replace(tmp, blob)
