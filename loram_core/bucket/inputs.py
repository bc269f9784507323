"""Inputs from a bucket: a base checkpoint under `s3://...` fetched once into the work dir.

The listing passes `untrusted.parse_listing` (bounded, safe relative keys, one layout, not our own
record's name); every object under the prefix is downloaded in ranges pinned to its ETag and hashed on the way;
the folder is reused while the listing (keys, sizes, ETags) is unchanged. `SOURCE` beside the
files records where they came from and each file's sha256: the provenance the manifest keeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fsspec.core import split_protocol

from loram_core.bucket.store import PART_SIZE, Changed, Store, open_store
from loram_core.bucket.untrusted import MAX_LISTING, parse_listing
from loram_core.errors import LoramError

SOURCE = ".loram-source.json"
REMOTE = ("s3", "s3a")


def is_remote(source: str) -> bool:
    """Whether a path names a bucket (s3://...) rather than a local path."""
    return split_protocol(source)[0] in REMOTE


def fetch_tree(uri: str, workdir: str | Path, key: str = "base.source") -> Path:
    """The local copy of every object under `uri` (fetched now, or earlier with the same listing).

    Args:
        uri: `s3://bucket/prefix` of a checkpoint folder.
        workdir: the run's work dir; the copy goes to `<workdir>/inputs/<hash of uri>/`.
        key: the config key that names `uri`, for messages.

    Returns:
        The local folder.

    Raises:
        LoramError: nothing under `uri`, or a file that changed while it was fetched.
    """
    uri = uri.rstrip("/")
    store = open_store(uri)
    # The listing is the bucket's word: bounded, and every key a safe path of one folder (none ours).
    keys = parse_listing(store.list("", limit=MAX_LISTING + 1), f"{key}={uri!r}", reserved=(SOURCE,))
    listing = {k: store.head(k) for k in keys}
    if not listing:
        raise LoramError(f"{key}={uri!r}: no objects under it; give the s3:// prefix of a checkpoint folder.")
    stamp = {k: [i.size, i.etag] for k, i in listing.items() if i is not None}
    out = Path(workdir).expanduser() / "inputs" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    record = out / SOURCE
    if record.is_file() and json.loads(record.read_text()).get("listing") == stamp:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with ThreadPoolExecutor(8, thread_name_prefix="loram-input") as pool:
        hashes = dict(
            zip(stamp, pool.map(lambda k: _fetch(store, k, stamp[k], tmp / k, key), stamp), strict=True)
        )
    (tmp / SOURCE).write_text(json.dumps({"uri": uri, "listing": stamp, "sha256": hashes}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _fetch(store: Store, key: str, size_etag: list, target: Path, config_key: str) -> str:
    size, etag = size_etag
    try:
        return _fetch_pinned(store, key, size, etag, target)
    except Changed:
        raise LoramError(
            f"{config_key}: {store.uri}/{key} changed while it was fetched; run again."
        ) from None


def _fetch_pinned(store: Store, key: str, size: int, etag: str, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(target, "wb") as fh:
        for start in range(0, size, PART_SIZE):
            data = store.read_range(key, start, min(start + PART_SIZE, size), etag)
            h.update(data)
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


def provenance(local: str | Path) -> dict:
    """`{"fetched_from": uri, "files_sha256": {...}}` for a folder `fetch_tree` made, else {}."""
    record = Path(local) / SOURCE
    if not record.is_file():
        return {}
    data = json.loads(record.read_text())
    return {"fetched_from": data["uri"], "files_sha256": data["sha256"]}


__all__ = ["fetch_tree", "is_remote", "provenance"]
