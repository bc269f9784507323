"""The few object-store operations publishing and pulling need, on a local folder or on S3.

Both stores give the same guarantees, which is what the bucket protocol rests on:
- `put_file` / `put_bytes(create=True)` are create-only: a second write of an existing key is
  refused with `Exists` (S3: `If-None-Match: *`, multipart included; local: a hard link, which
  the kernel refuses atomically when the name exists);
- `put_bytes(if_match=etag)` replaces an object only if it is still the one read (S3: `If-Match`;
  local: under an exclusive lock file), else `Changed`;
- `read_range(..., etag)` reads bytes of exactly the object version read before (S3: `If-Match`
  on the GET), else `Changed`.
Every object also carries its sha256 (S3: user metadata `sha256`), so a re-run can tell a
finished upload of the same content from anything else without downloading it.

Credentials, endpoint and region come from the standard AWS environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `AWS_REGION`...), as boto reads them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fsspec.core import split_protocol, url_to_fs

from loram_core.errors import LoramError

# Bytes per multipart part and per ranged GET: 5 MiB is S3's minimum part, larger parts cost
# fewer requests; 16 MiB keeps a budget of 16 parts in flight at 256 MiB of buffers.
PART_SIZE = 16 * 2**20
# Objects up to this size go in one PUT.
SINGLE_PUT_MAX = PART_SIZE
# Objects read whole (manifest, LATEST, .claim) are refused beyond this unless the caller says less.
READ_MAX = 16 * 2**20
# Where a folder bucket keeps the files being written (the local kind of an open multipart upload).
LOCAL_TMP = ".loram-tmp"

Progress = Callable[[int], None]  # called with a number of bytes just transferred


class ByteCounter:
    """Bytes moved by many threads, reported as MiB done of a total to a step-progress callback."""

    def __init__(self, total_bytes: int, report: Callable[[dict], None] | None) -> None:
        self.total = max(total_bytes >> 20, 1)
        self.report = report
        self._lock = threading.Lock()
        self._done = 0

    def advance(self, n: int, what: str) -> None:
        """Count `n` more bytes of file `what` and report `{"step": MiB, "total": MiB, "what": what}`."""
        with self._lock:
            self._done += n
            current = self._done
        if self.report is not None:
            self.report({"step": min(current >> 20, self.total), "total": self.total, "what": what})


class Exists(Exception):
    """A create-only write found the key taken."""


class Changed(Exception):
    """A conditional read or write found the object no longer the one it was pinned to."""


class Transient(Exception):
    """A failure worth retrying (connection reset, timeout, 5xx, throttling)."""


class Aborted(Exception):
    """A multipart upload was aborted under us (another publish of this version swept it)."""


class TooLarge(Exception):
    """An object read whole holds more bytes than the reader allows (`size`: its size, if told)."""

    def __init__(self, key: str, size: int | None) -> None:
        super().__init__(key)
        self.size = size


class StagedChanged(Exception):
    """A local file's bytes, read for upload, are not the ones hashed for the manifest (`sha256`: theirs)."""

    def __init__(self, path: Path, sha256: str | None) -> None:
        super().__init__(str(path))
        self.sha256 = sha256


class Budget:
    """Parts in flight over all files: a slot is taken before a part's bytes are read (or fetched)
    and given back once they are sent (or written), so memory and connections stay at `slots`."""

    def __init__(self, slots: int, pool: ThreadPoolExecutor) -> None:
        self._sem = threading.Semaphore(slots)
        self._pool = pool

    def take(self) -> None:
        """Wait for a free slot (this thread holds it until `give` or the end of a `run`)."""
        self._sem.acquire()

    def give(self) -> None:
        """Give back a slot taken with `take` that no `run` will give back."""
        self._sem.release()

    def run(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` in the pool on the slot this thread took; the slot is given back when it ends."""
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._sem.release()
            raise
        future.add_done_callback(lambda _: self._sem.release())
        return future

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a slot for the body (work done in the calling thread)."""
        self.take()
        try:
            yield
        finally:
            self.give()


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD tells: size, ETag (opaque; not a content hash for multipart) and our sha256."""

    size: int
    etag: str
    sha256: str | None


def bucket_fs(uri: str):
    """(fsspec filesystem, root path) of a bucket URI; a `LoramError` naming the URI if it cannot be opened."""
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise LoramError(
            f"cannot open bucket URI {uri!r}: {err}. Use file://PATH or s3://BUCKET/PREFIX."
        ) from None


def join(*parts: str) -> str:
    """Join URI/key parts with single slashes."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p or not i)


def open_store(uri: str, *, budget: int = 16, quick: bool = False) -> Store:
    """The store under a bucket URI (`file://`, a path, or `s3://`; other fsspec stores are refused).

    Args:
        uri: the bucket root, e.g. `s3://models/loram` or `file://./bucket`.
        budget: connections to keep open (the transfer's parts in flight).
        quick: short connect/read timeouts and no retries (the preflight's probe).
    """
    protocol = split_protocol(uri)[0] or "file"
    if protocol in ("file", "local"):
        return LocalStore(bucket_fs(uri)[1])
    if protocol in ("s3", "s3a"):
        return S3Store(uri, budget=budget, quick=quick)
    raise LoramError(
        f"{uri!r}: publishing and pulling support file:// and s3:// (any S3-compatible store, "
        "AWS_ENDPOINT_URL for one that is not AWS)."
    )


def file_sha256(path: Path, start: int = 0, end: int | None = None) -> str:
    """sha256 of a local file (or of its bytes [start, end))."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        left = (os.path.getsize(path) if end is None else end) - start
        while left > 0:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


class Store:
    """Interface shared by `LocalStore` and `S3Store`; keys are '/'-separated, relative to the root."""

    uri: str

    def head(self, key: str) -> ObjectInfo | None:  # pragma: no cover - interface
        """Size, ETag and recorded sha256 of an object; None if there is none."""
        raise NotImplementedError

    def read(self, key: str, *, limit: int = READ_MAX) -> tuple[bytes, str]:  # pragma: no cover - interface
        """The whole object and its ETag; `TooLarge` (before it is read) if it holds more than `limit` bytes."""
        raise NotImplementedError

    def read_range(self, key: str, start: int, end: int, etag: str) -> bytes:  # pragma: no cover
        """Bytes [start, end) of the object, only if its ETag is still `etag` (else `Changed`)."""
        raise NotImplementedError

    def write_range(self, key: str, start: int, end: int, etag: str, fd: int) -> int:
        """Write bytes [start, end) of the object into the open file `fd` at offset `start`, only if
        its ETag is still `etag` (else `Changed`); returns the number of bytes written."""
        data = self.read_range(key, start, end, etag)
        os.pwrite(fd, data, start)
        return len(data)

    def put_bytes(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> None:
        """Write a small object: create-only (`Exists` if taken), or replacing the object whose ETag is
        `if_match` (`Changed` if it moved), or unconditionally."""
        raise NotImplementedError  # pragma: no cover - interface

    def put_file(
        self, local: Path, key: str, size: int, sha256: str, budget: Budget, progress: Progress
    ) -> None:  # pragma: no cover - interface
        """Create-only upload of a local file whose bytes must be `size` long and hash to `sha256`.

        The bytes are hashed as they are read for sending; if they are not the ones expected
        (`StagedChanged`), nothing of them stays in the store. Parts run under `budget`.
        """
        raise NotImplementedError

    def content_sha256(self, key: str) -> str:
        """sha256 of an object's bytes, streamed in ranges pinned to its ETag (where no checksum was kept)."""
        info = self.head(key)
        if info is None:
            raise FileNotFoundError(key)
        h = hashlib.sha256()
        for start in range(0, info.size, PART_SIZE):
            h.update(self.read_range(key, start, min(start + PART_SIZE, info.size), info.etag))
        return h.hexdigest()

    def delete(self, key: str) -> None:  # pragma: no cover - interface
        """Remove an object (no error if it is gone)."""
        raise NotImplementedError

    def list_modified(self, prefix: str, limit: int) -> list[tuple[str, float]]:  # pragma: no cover
        """(key, last-modified Unix time) of the objects under `prefix/` (relative to the root), at most
        `limit` of them (a listing is cut there, not paged to its end)."""
        raise NotImplementedError

    def list(self, prefix: str, limit: int = 100_000) -> list[str]:
        """Keys under `prefix/` (relative to the root), sorted, at most `limit`."""
        return sorted(k for k, _ in self.list_modified(prefix, limit))

    def abort_uploads(self, prefix: str, older_than_s: float) -> int:  # pragma: no cover - interface
        """Abort the unfinished uploads under `prefix/` begun more than `older_than_s` seconds ago (S3:
        open multipart uploads; a folder: its temporary files); returns how many."""
        raise NotImplementedError


class LocalStore(Store):
    """A folder as a bucket: create-only by hard link, compare-and-swap under a lock file.

    Files being written wait under `<root>/.loram-tmp/<name>/<version>/<digest>.<random>.tmp` (never
    beside a version's files), so a killed writer leaves nothing inside a version and `abort_uploads`
    finds its leftovers by the version or name they belong to.
    """

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def head(self, key: str) -> ObjectInfo | None:
        p = self._path(key)
        if not p.is_file():
            return None
        st = p.stat()
        # A local file has no stored checksum; its sha256 is cheap to compute when asked.
        return ObjectInfo(size=st.st_size, etag=f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}", sha256=None)

    def read(self, key: str, *, limit: int = READ_MAX) -> tuple[bytes, str]:
        info = self.head(key)
        if info is None:
            raise FileNotFoundError(key)
        if info.size > limit:
            raise TooLarge(key, info.size)
        with open(self._path(key), "rb") as fh:
            data = fh.read(limit + 1)  # the file may have grown since
        if len(data) > limit:
            raise TooLarge(key, None)
        return data, info.etag

    def content_sha256(self, key: str) -> str:
        return file_sha256(self._path(key))

    def read_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        info = self.head(key)
        if info is None or info.etag != etag:
            raise Changed(key)
        with open(self._path(key), "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)

    def _link_new(self, tmp: Path, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(tmp, target)  # atomic and create-only: fails if the name exists
        except FileExistsError:
            raise Exists(key) from None
        except FileNotFoundError:
            if not tmp.exists():  # swept by another publish of this version (abort_uploads)
                raise Aborted(key) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _tmp(self, key: str) -> Path:
        # Under the key's first two folders (a version's files share one), by a digest of the key.
        folder = self.root / LOCAL_TMP / "/".join(key.split("/")[:-1][:2])
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.{uuid.uuid4().hex}.tmp"

    def put_bytes(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> None:
        tmp = self._tmp(key)
        tmp.write_bytes(data)
        if create:
            return self._link_new(tmp, key)
        self._path(key).parent.mkdir(parents=True, exist_ok=True)
        lock = self._path(key).with_name(f".{self._path(key).name}.lock")
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            info = self.head(key)
            if if_match is not None and (info is None or info.etag != if_match):
                tmp.unlink(missing_ok=True)
                raise Changed(key)
            os.replace(tmp, self._path(key))

    def put_file(
        self, local: Path, key: str, size: int, sha256: str, budget: Budget, progress: Progress
    ) -> None:
        tmp = self._tmp(key)
        h, copied = hashlib.sha256(), 0
        try:
            with budget.slot(), open(local, "rb") as src, open(tmp, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    dst.write(chunk)
                    copied += len(chunk)
            if copied != size or h.hexdigest() != sha256:
                raise StagedChanged(local, h.hexdigest())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        progress(size)
        self._link_new(tmp, key)

    def delete(self, key: str) -> None:
        p = self._path(key)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def list_modified(self, prefix: str, limit: int) -> list[tuple[str, float]]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        found = []
        for f in base.rglob("*"):
            if f.is_file() and not f.name.startswith("."):
                found.append((f.relative_to(self.root).as_posix(), f.stat().st_mtime))
                if len(found) >= limit:
                    break
        return found

    def abort_uploads(self, prefix: str, older_than_s: float) -> int:
        base = self.root / LOCAL_TMP / prefix
        if not base.is_dir():
            return 0
        now, aborted = time.time(), 0
        for tmp in base.rglob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.is_file() and now - tmp.stat().st_mtime >= older_than_s:
                    tmp.unlink()
                    aborted += 1
        return aborted


from loram_core.bucket.s3 import S3Store  # noqa: E402  (the S3 store builds on the definitions above)
