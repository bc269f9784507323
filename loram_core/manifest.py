"""`manifest.json`: what one published version holds, with a size and sha256 for every file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field

from loram_core.errors import IntegrityError

SCHEMA_VERSION = 1


class FileEntry(BaseModel):
    path: str  # relative to the version root, POSIX separators
    size: int
    sha256: str


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created_at: str
    base: dict[str, Any] = Field(description="source, fingerprint (sha256 over its files), model_type")
    corpus: dict[str, Any] = Field(description="files' fingerprint, token counts, block length")
    calibration: dict[str, Any] = Field(
        default_factory=dict,
        description="pruning's calibration text: settings, source, blocks x seq_len, sha256 of its tokens and text",
    )
    eval: dict[str, Any] = Field(
        default_factory=dict,
        description="the held-out text the metrics are measured on: settings, source, shape, sha256 hashes",
    )
    until: str = Field("quantize", description="the last model step the run made: prune, align or quantize")
    prune: dict[str, Any]
    align: dict[str, Any] = Field(
        description="settings and training facts; {'enabled': False} when it did not run"
    )
    quantize: dict[str, Any]
    params: dict[str, Any] = Field(description="original/pruned counts, reduction, HBM figures")
    metrics: dict[str, Any] = Field(description="original_ppl, pruned_ppl, aligned_ppl, ... on held-out text")
    compute: dict[str, Any] = Field(
        default_factory=dict, description="device the steps ran on (name, memory, torch/CUDA versions)"
    )
    verification: dict[str, Any] | None = Field(
        None, description="LoRA ablation (loram_core.verify): task, LoRA settings, held-out task loss per row"
    )
    files: list[FileEntry]
    code_version: str

    def content_key(self) -> list[tuple[str, str]]:
        """What makes two publications of a version the same: their files' paths and hashes."""
        return sorted((f.path, f.sha256) for f in self.files)


def sha256_file(path: str | Path, fs=None) -> str:
    h = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(str(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_relative(path: str) -> str:
    """Refuse manifest paths that could escape the destination directory."""
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path or not p.parts or path.startswith("~"):
        raise IntegrityError(
            f"manifest lists the unsafe path {path!r}; refusing it (it would escape the destination)."
        )
    return str(p)


def list_files(root: Path) -> list[FileEntry]:
    """Entries for every file under `root` (sorted), hashed (several files at once: hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(sha256_file, files))
    return [
        FileEntry(path=f.relative_to(root).as_posix(), size=f.stat().st_size, sha256=h)
        for f, h in zip(files, hashes, strict=True)
    ]
