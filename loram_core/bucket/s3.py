"""`S3Store`: the bucket protocol on any S3-compatible server, through s3fs's aiobotocore client.

The client is s3fs's (its session, its event loop thread); the calls are made directly so that
S3's conditional headers (`If-None-Match`, `If-Match`) and error codes reach us unchanged.
Threads call in with `fsspec.asyn.sync`, so a pool of threads shares one connection pool.

Checksums the server checks on arrival, computed from the very bytes sent: a single PUT carries
`x-amz-checksum-sha256` (for a file, the sha256 it was just checked against the manifest with, so it
costs nothing more); a multipart upload is created with CRC32 and every part carries its
`x-amz-checksum-crc32` (zlib's CRC32, about 0.3 CPU-seconds per GiB; a second sha256 of every part
would cost twice that). AWS S3 and MinIO refuse a body that does not match (`BadDigest`, retried);
a store that does not know the headers ignores them. `AWS_REQUEST_CHECKSUM_CALCULATION=when_required`
(the AWS SDKs' switch for stores that refuse them) sends none.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import random
import time
import zlib
from concurrent.futures import wait
from pathlib import Path

from fsspec.asyn import sync

from loram_core.bucket.store import (
    PART_SIZE,
    READ_MAX,
    SINGLE_PUT_MAX,
    Aborted,
    Budget,
    Changed,
    Exists,
    ObjectInfo,
    Progress,
    StagedChanged,
    Store,
    TooLarge,
)
from loram_core.errors import LoramError

_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                    "RequestTimeTooSkewed", "BadDigest", "500", "502", "503", "504"}  # fmt: skip
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                     "InvalidToken", "403", "InvalidClientTokenId", "UnrecognizedClientException"}  # fmt: skip
CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
ATTEMPTS = 5
UPLOADS_LISTED = 1000  # open multipart uploads looked at per sweep (the rest wait for the next run)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def sends_checksums() -> bool:
    """Whether to send S3 checksums: unless `AWS_REQUEST_CHECKSUM_CALCULATION=when_required`."""
    return os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "").strip().lower() != "when_required"


def _code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return None


def is_transient(err: BaseException) -> bool:
    """Whether an error is worth retrying: connection trouble, timeouts, throttling, 5xx."""
    import aiohttp
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(err, (BotoConnectionError, HTTPClientError, aiohttp.ClientError, TimeoutError)):
        return True
    return _code(err) in _TRANSIENT_CODES


def _environment_key() -> str:
    """A digest of the AWS environment: a client is reused only while it is unchanged."""
    names = sorted(k for k in os.environ if k.startswith("AWS_"))
    return hashlib.sha256(repr([(k, os.environ[k]) for k in names]).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _filesystem(budget: int, quick: bool, environment: str):
    """An s3fs filesystem (its client, connection pool and event loop) per setting and environment:
    building a client costs a few hundred milliseconds, so a process makes each one once."""
    import s3fs

    timeouts = (
        {"connect_timeout": 3, "read_timeout": 10} if quick else {"connect_timeout": 10, "read_timeout": 120}
    )
    fs = s3fs.S3FileSystem(
        skip_instance_cache=True,
        config_kwargs={
            **timeouts,
            "max_pool_connections": budget + 4,
            # We retry ourselves (below), with backoff, and only what is transient.
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        },
    )
    fs.connect()
    return fs


class S3Store(Store):
    """An `s3://bucket/prefix` root on the server the AWS environment names."""

    def __init__(self, uri: str, *, budget: int = 16, quick: bool = False) -> None:
        self.uri = uri.rstrip("/")
        self.bucket, _, self.prefix = self.uri.split("://", 1)[1].partition("/")
        self.attempts = 1 if quick else ATTEMPTS
        self.fs = _filesystem(budget, quick, _environment_key())
        self.client = self.fs.s3
        self.checksums = sends_checksums()

    @property
    def endpoint(self) -> str:
        """The server this store talks to (for messages)."""
        return str(self.client.meta.endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, method, what: str, **kwargs):
        """One API call (a client method's name, or a coroutine function taking the same kwargs),
        retried with exponential backoff and jitter while it fails transiently."""
        fn = getattr(self.client, method) if isinstance(method, str) else method
        for attempt in range(self.attempts):
            try:
                return sync(self.fs.loop, fn, Bucket=self.bucket, **kwargs)
            except TooLarge:
                raise
            except Exception as err:  # noqa: BLE001 - classified below
                if type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
                    raise LoramError(
                        f"no credentials for s3://{self.bucket} at {self.endpoint}: set {CREDENTIAL_VARS}."
                    ) from None
                code = _code(err)
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise (Exists(what) if "IfNoneMatch" in kwargs else Changed(what)) from None
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise FileNotFoundError(what) from None
                if code == "NoSuchUpload":
                    raise Aborted(what) from None
                if code == "NoSuchBucket":
                    raise LoramError(
                        f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it or fix the URI."
                    ) from None
                if code in _CREDENTIAL_CODES:
                    raise LoramError(
                        f"{self.endpoint} refused the credentials for s3://{self.bucket} ({code}) while "
                        f"accessing {what}; set {CREDENTIAL_VARS} to a key allowed to use the bucket."
                    ) from None
                if not is_transient(err):
                    raise LoramError(f"{what} at {self.uri}: {type(err).__name__}: {err}") from None
                if attempt + 1 == self.attempts:
                    if self.attempts == 1:
                        raise
                    raise LoramError(
                        f"{what} at {self.uri}: still failing after {self.attempts} attempts "
                        f"({type(err).__name__}: {err})."
                    ) from None
                time.sleep(min(0.2 * 2**attempt, 5.0) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self._call("head_object", key, Key=self._key(key))
        except FileNotFoundError:
            return None
        return ObjectInfo(size=r["ContentLength"], etag=r["ETag"], sha256=r.get("Metadata", {}).get("sha256"))

    async def _get(self, limit: int | None = None, **kwargs) -> tuple[bytes, str]:
        # The body is read inside the retried call: a connection cut mid-body is retried too.
        r = await self.client.get_object(**kwargs)
        async with r["Body"] as body:
            if limit is None:
                return await body.read(), r["ETag"]
            if r.get("ContentLength", 0) > limit:  # refused before a byte of the body is read
                raise TooLarge(kwargs["Key"], r["ContentLength"])
            chunks, got = [], 0
            while got <= limit:  # a read returns what has arrived, not always all it was asked for
                chunk = await body.read(limit + 1 - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise TooLarge(kwargs["Key"], None)
        return data, r["ETag"]

    def read(self, key: str, *, limit: int = READ_MAX) -> tuple[bytes, str]:
        return self._call(functools.partial(self._get, limit), key, Key=self._key(key))

    def read_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        data, _ = self._call(
            self._get, key, Key=self._key(key), Range=f"bytes={start}-{end - 1}", IfMatch=etag
        )
        return data

    async def _get_into(self, fd: int, start: int, **kwargs) -> int:
        # Streamed into the file as it arrives (1 MiB reads): no buffer the size of the range.
        r = await self.client.get_object(**kwargs)
        offset = start
        async with r["Body"] as body:
            async for chunk in body.iter_chunks(1 << 20):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
        return offset - start

    def write_range(self, key: str, start: int, end: int, etag: str, fd: int) -> int:
        return self._call(
            functools.partial(self._get_into, fd, start), key, Key=self._key(key),
            Range=f"bytes={start}-{end - 1}", IfMatch=etag,
        )  # fmt: skip

    def put_bytes(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> None:
        digest = hashlib.sha256(data)
        kwargs = {"Key": self._key(key), "Body": data, "Metadata": {"sha256": digest.hexdigest()}}
        if self.checksums:
            kwargs.update(ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(digest.digest()))
        if create:
            kwargs["IfNoneMatch"] = "*"
        elif if_match is not None:
            kwargs["IfMatch"] = if_match
        self._call("put_object", key, **kwargs)

    def put_file(
        self, local: Path, key: str, size: int, sha256: str, budget: Budget, progress: Progress
    ) -> None:
        with open(local, "rb") as fh:
            if size <= SINGLE_PUT_MAX:
                with budget.slot():
                    data = fh.read(size + 1)
                    digest = hashlib.sha256(data)
                    if len(data) != size or digest.hexdigest() != sha256:
                        raise StagedChanged(local, digest.hexdigest())  # nothing was sent
                    kwargs = {"Key": self._key(key), "Body": data, "Metadata": {"sha256": sha256}}
                    if self.checksums:
                        kwargs.update(ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(digest.digest()))
                    self._call("put_object", key, IfNoneMatch="*", **kwargs)
                progress(size)
                return
            self._put_parts(fh, local, key, size, sha256, budget, progress)

    def _put_parts(
        self, fh, local: Path, key: str, size: int, sha256: str, budget: Budget, progress: Progress
    ) -> None:
        """A multipart upload read in order by this thread (so the whole file is hashed as it is sent),
        its parts sent concurrently; completed only if the bytes hash to `sha256`, else aborted."""
        crc = {"ChecksumAlgorithm": "CRC32"} if self.checksums else {}
        upload = self._call("create_multipart_upload", key, Key=self._key(key), Metadata={"sha256": sha256},
                            **crc)["UploadId"]  # fmt: skip
        futures = []
        try:
            h = hashlib.sha256()
            for number, start in enumerate(range(0, size, PART_SIZE), start=1):
                budget.take()  # before the part is read: memory stays at the budget's parts
                try:
                    data = fh.read(min(PART_SIZE, size - start))
                    if len(data) != min(PART_SIZE, size - start):
                        raise StagedChanged(local, None)  # shorter than hashed
                    h.update(data)
                except BaseException:
                    budget.give()
                    raise
                futures.append(budget.run(self._part, key, upload, number, data, progress))
            parts = [f.result() for f in futures]
            if fh.read(1) or h.hexdigest() != sha256:
                raise StagedChanged(local, h.hexdigest())
            self._call("complete_multipart_upload", key, Key=self._key(key), UploadId=upload,
                       MultipartUpload={"Parts": parts}, IfNoneMatch="*")  # fmt: skip
        except BaseException:
            wait(futures)  # no part may arrive after the abort
            with contextlib.suppress(Exception):  # the original error matters more
                self._call("abort_multipart_upload", key, Key=self._key(key), UploadId=upload)
            raise

    def _part(self, key: str, upload: str, number: int, data: bytes, progress: Progress) -> dict:
        kwargs = {"Key": self._key(key), "UploadId": upload, "PartNumber": number, "Body": data}
        if self.checksums:
            kwargs.update(ChecksumAlgorithm="CRC32", ChecksumCRC32=_b64(zlib.crc32(data).to_bytes(4, "big")))
        r = self._call("upload_part", f"{key} (part {number})", **kwargs)
        progress(len(data))
        return {
            "PartNumber": number,
            "ETag": r["ETag"],
            **({"ChecksumCRC32": kwargs["ChecksumCRC32"]} if self.checksums else {}),
        }

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Key=self._key(key))

    def list_modified(self, prefix: str, limit: int) -> list[tuple[str, float]]:
        found, token = [], None
        base = self._key(prefix).rstrip("/") + "/" if self._key(prefix) else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        while len(found) < limit:
            kwargs = {"Prefix": base, "MaxKeys": min(1000, limit - len(found)),
                      **({"ContinuationToken": token} if token else {})}  # fmt: skip
            r = self._call("list_objects_v2", prefix, **kwargs)
            found += [(o["Key"][strip:], o["LastModified"].timestamp()) for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                break
            token = r["NextContinuationToken"]
        return found[:limit]

    def abort_uploads(self, prefix: str, older_than_s: float) -> int:
        r = self._call("list_multipart_uploads", prefix, Prefix=self._key(prefix).rstrip("/") + "/",
                       MaxUploads=UPLOADS_LISTED)  # fmt: skip
        now, aborted = time.time(), 0
        for upload in r.get("Uploads", []):
            if now - upload["Initiated"].timestamp() < older_than_s:
                continue
            with contextlib.suppress(FileNotFoundError, Aborted):  # gone meanwhile
                self._call(
                    "abort_multipart_upload", upload["Key"], Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
        return aborted
