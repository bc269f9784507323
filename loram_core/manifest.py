"""`manifest.json`: what one published version holds, with a size and sha256 for every file.

The model is strict, because a consumer reads it from a bucket it may not control (a mirror, a
misconfigured or compromised bucket): every field has its JSON type (no coercion), every digest is
64 lowercase hex digits, every size a bounded non-negative int, every path a relative POSIX path of
safe components, with no duplicates (after Unicode normalisation and case folding, so no two
entries can land on one file of a case-insensitive disk), no path that is both a file and a
folder, and none of the names the bucket protocol writes itself. `loram_core.bucket.untrusted`
bounds the bytes before they are parsed and turns a refusal into a one-paragraph `LoramError`.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loram_core.errors import IntegrityError, LoramError

SCHEMA_VERSION = 1

# The rule for a published name and version (PublishConfig uses it too): one path component that
# no store, shell or URI treats specially.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
NAME_MAX = 128
NAME_RULE = (
    f"letters, digits, '.', '_' and '-', starting with a letter or digit, at most {NAME_MAX} characters"
)

DIGEST_PATTERN = r"^[0-9a-f]{64}$"
MAX_FILE_BYTES = 5 * 2**40  # S3's largest object
MAX_FILES = 10_000
MAX_PATH_BYTES = 1024  # S3's longest key (the bucket prefix, name and version come on top)
MAX_COMPONENT_BYTES = 255  # the longest file name ext4, xfs and APFS allow
MAX_DEPTH = 32
# Written by the bucket protocol at the top of a version: a file of the version may not take them.
RESERVED = ("manifest.json", ".claim")

Digest = Annotated[str, Field(pattern=DIGEST_PATTERN, min_length=64, max_length=64)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, min_length=1, max_length=NAME_MAX)]


def short(value: object, limit: int = 40) -> str:
    """`repr` of at most the first `limit` characters (or bytes) of a value, for error messages."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    return repr(value)


def check_name(value: object, what: str) -> str:
    """`value` if it is a valid published name or version, else a `LoramError` naming `what`."""
    if isinstance(value, str) and len(value) <= NAME_MAX and re.fullmatch(NAME_PATTERN, value):
        return value
    raise LoramError(f"{what} {short(value)} is not a valid name: {NAME_RULE}.")


def path_problem(path: str) -> str | None:
    """Why `path` is not a safe relative POSIX path for a version's file (None when it is).

    Safe: not empty, not absolute, no backslash, printable characters only (no NUL, control, format
    or surrogate characters), components neither empty, `.` nor `..`, each at most 255 UTF-8 bytes,
    at most 1024 bytes and 32 components in all.
    """
    if not path:
        return "an empty path"
    if len(path) > MAX_PATH_BYTES:  # checked first, so the work below is bounded
        return f"a path longer than {MAX_PATH_BYTES} bytes"
    if not path.isprintable():
        return "a path with a NUL, control or other non-printable character"
    if len(path.encode()) > MAX_PATH_BYTES:
        return f"a path longer than {MAX_PATH_BYTES} bytes"
    if path.startswith(("/", "~")) or "\\" in path:
        return "an absolute path, a '~' path or a backslash"
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        return f"a path deeper than {MAX_DEPTH} components"
    for part in parts:
        if part in ("", ".", ".."):
            return "an empty, '.' or '..' component"
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            return f"a component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def path_key(path: str) -> str:
    """What two paths must not share: NFC-normalised and case-folded (one file on macOS/Windows disks)."""
    return unicodedata.normalize("NFC", path).casefold()


def files_problem(paths: list[str], reserved: tuple[str, ...] = RESERVED) -> str | None:
    """Why a set of safe paths cannot be laid out as one folder (None when it can): duplicates after
    normalisation, a path that is both a file and a folder, or a `reserved` name at the top."""
    taken = {path_key(r) for r in reserved}
    seen: dict[str, str] = {}
    folders: set[str] = set()
    for path in paths:
        key = path_key(path)
        if key in seen:
            return f"{short(path)} twice (as {short(seen[key])} and {short(path)})"
        seen[key] = path
        if key in taken:
            return f"{short(path)}, a name written by loram itself at the top"
        parts = key.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for key, path in seen.items():
        if key in folders:
            return f"{short(path)} both as a file and as a folder"
    return None


class FileEntry(BaseModel):
    """One file of a version: its path relative to the version root, size in bytes and sha256."""

    model_config = ConfigDict(strict=True)

    path: str = Field(max_length=MAX_PATH_BYTES)
    size: int = Field(ge=0, le=MAX_FILE_BYTES)
    sha256: Digest

    @field_validator("path")
    @classmethod
    def _safe(cls, path: str) -> str:
        if problem := path_problem(path):
            raise ValueError(f"unsafe path {short(path)} ({problem})")
        return path


class Manifest(BaseModel):
    model_config = ConfigDict(strict=True)

    schema_version: int = SCHEMA_VERSION
    name: Name
    version: Name
    created_at: str = Field(max_length=64, description="ISO 8601 with a time zone; orders LATEST")
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
    until: str = Field(
        "quantize", max_length=32, description="the last model step the run made: prune, align or quantize"
    )
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
    files: list[FileEntry] = Field(max_length=MAX_FILES)
    code_version: str = Field(max_length=256)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema_version {value} is not one this loram reads ({SCHEMA_VERSION})")
        return value

    @field_validator("created_at")
    @classmethod
    def _timestamp(cls, value: str) -> str:
        try:
            aware = datetime.fromisoformat(value).tzinfo is not None
        except ValueError:
            aware = False
        if not aware:
            raise ValueError(f"{short(value)} is not an ISO 8601 time with a time zone")
        return value

    @model_validator(mode="after")
    def _one_layout(self) -> Manifest:
        if problem := files_problem([f.path for f in self.files]):
            raise ValueError(f"files lists {problem}")
        sizes: dict[str, int] = {}
        for f in self.files:
            if sizes.setdefault(f.sha256, f.size) != f.size:
                raise ValueError(f"files lists sha256 {f.sha256[:12]}... with two different sizes")
        return self

    def content_key(self) -> list[tuple[str, str]]:
        """What makes two publications of a version the same: their files' paths and hashes."""
        return sorted((f.path, f.sha256) for f in self.files)


def validation_message(err: ValidationError) -> str:
    """A pydantic refusal in one short sentence: where, what, and how many more (never the input)."""
    errors = err.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{msg[:300]}{more}"


def sha256_file(path: str | Path, fs=None) -> str:
    h = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(str(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_relative(path: str) -> str:
    """`path` if it is a safe relative path (see `path_problem`), else an `IntegrityError`."""
    if problem := path_problem(path):
        raise IntegrityError(f"manifest lists the unsafe path {short(path)} ({problem}); refusing it.")
    return path


def list_files(root: Path) -> list[FileEntry]:
    """Entries for every file under `root` (sorted), hashed (several files at once: hashlib releases the GIL).

    Raises:
        LoramError: a file whose name cannot be published (see `path_problem`), naming it.
    """
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        if problem := path_problem(f.relative_to(root).as_posix()):
            raise LoramError(f"staged file {short(str(f))} cannot be published: {problem}.")
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(sha256_file, files))
    return [
        FileEntry(path=f.relative_to(root).as_posix(), size=f.stat().st_size, sha256=h)
        for f, h in zip(files, hashes, strict=True)
    ]
