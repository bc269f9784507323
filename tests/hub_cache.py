"""A Hugging Face hub cache built locally: the `models--ORG--NAME/{blobs,refs,snapshots,trees}` layout.

What `huggingface_hub.snapshot_download` leaves behind, written without a network: each file's
content once in `blobs/` (named by its sha256 for LFS files, its git blob sha1 for the others, as
the hub's ETags are), `snapshots/<commit>/<path>` a relative symlink to it, `refs/<revision>`
holding the commit, and `trees/<commit>.json` (the tree listing huggingface_hub >= 2 caches, written
with its own writer). huggingface_hub's `scan_cache_dir` and `snapshot_download(local_files_only=True)`
read it as their own; the tests check that they do.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".model")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's object id


def add_to_hub_cache(cache: Path, repo_id: str, src: Path, revision: str = "main") -> str:
    """Put every file under `src` into `cache` as commit `<hash>` of `repo_id`, named by `revision`.

    Returns:
        The commit hash (40 hex digits).
    """
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    entries: dict[str, TreeCacheEntry] = {}
    etags: dict[str, str] = {}
    for f in files:
        data = f.read_bytes()
        rel = f.relative_to(src).as_posix()
        blob_id = _git_blob_sha1(data)
        if f.suffix in LFS_SUFFIXES:
            sha = hashlib.sha256(data).hexdigest()
            entries[rel] = TreeCacheEntry(size=len(data), blob_id=blob_id, lfs_sha256=sha, lfs_size=len(data))
            etags[rel] = sha
        else:
            entries[rel] = TreeCacheEntry(size=len(data), blob_id=blob_id)
            etags[rel] = blob_id
        blob = storage / "blobs" / etags[rel]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
    commit = hashlib.sha1("".join(f"{k}:{v}" for k, v in sorted(etags.items())).encode()).hexdigest()  # noqa: S324
    snap = storage / "snapshots" / commit
    for rel, etag in etags.items():
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(storage / "blobs" / etag, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    write_tree_cache(str(storage), commit, entries)
    return commit
