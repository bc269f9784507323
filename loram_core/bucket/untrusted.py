"""The one parser for what a bucket hands a consumer: a manifest, a LATEST, a listing.

A consumer pulls from buckets it does not control, so nothing read from one is used before it
passed here: sizes are bounded before an object is read whole, the manifest is the strict model of
`loram_core.manifest` (digests, sizes, paths, counts, one layout) whose name and version must be the
ones the URI asked for, LATEST must be one valid version name, and a listing's keys are safe paths
of one layout. Every refusal is a `LoramError` (`IntegrityError`) of one paragraph that quotes at
most a short prefix of what it refuses.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from loram_core.bucket.store import Store, TooLarge
from loram_core.errors import IntegrityError
from loram_core.manifest import (
    MAX_FILES,
    NAME_MAX,
    NAME_PATTERN,
    NAME_RULE,
    Manifest,
    files_problem,
    path_problem,
    short,
    validation_message,
)

MAX_MANIFEST_BYTES = 4 * 2**20  # 10,000 entries take about 1.5 MB
MAX_LATEST_BYTES = 1024  # one name of at most 128 characters
MAX_LISTING = MAX_FILES


def read_bounded(store: Store, key: str, limit: int, where: str) -> bytes:
    """The whole object `key`, refused (not read) if it holds more than `limit` bytes.

    Raises:
        FileNotFoundError: there is no such object.
        IntegrityError: it is larger than `limit`.
    """
    try:
        data, _ = store.read(key, limit=limit)
    except TooLarge as err:
        raise IntegrityError(
            f"{where} holds {err.size if err.size is not None else 'more than ' + str(limit)} bytes, more than "
            f"the {limit} it may have; refusing it (the bucket does not hold a version this loram published)."
        ) from None
    return data


def parse_manifest(data: bytes, where: str, expect: tuple[str, str] | None = None) -> Manifest:
    """A manifest read from a bucket, checked whole (see `loram_core.manifest`).

    Args:
        data: the object's bytes (at most `MAX_MANIFEST_BYTES`).
        where: its URI, for messages.
        expect: (name, version) the URI asked for; the manifest must name exactly these.

    Raises:
        IntegrityError: anything the strict model refuses, or another name or version.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise IntegrityError(
            f"{where} holds {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} it may have."
        )
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as err:
        raise IntegrityError(
            f"{where} is not a valid manifest, refusing the version: {validation_message(err)}."
        ) from None
    if expect is not None and (manifest.name, manifest.version) != expect:
        raise IntegrityError(
            f"{where} is the manifest of {short(manifest.name)}/{short(manifest.version)}, but the URI asks for "
            f"{expect[0]}/{expect[1]}; refusing it (a bucket may not hand one version out as another)."
        )
    return manifest


def parse_latest(data: bytes, where: str) -> str:
    """The version a LATEST object names: one valid name, ASCII, with nothing else but white space around it.

    Raises:
        IntegrityError: anything else, quoting at most a short prefix.
    """
    text = data.strip(b" \t\r\n")
    if len(text) <= NAME_MAX and text.isascii():
        version = text.decode("ascii")
        if re.fullmatch(NAME_PATTERN, version):
            return version
    raise IntegrityError(
        f"{where} does not name a version ({short(data)}); a version name is {NAME_RULE}. Pull "
        "<bucket>/<name>/<version> to choose one, or ask the publisher to fix LATEST."
    )


def parse_listing(keys: list[str], where: str, reserved: tuple[str, ...] = ()) -> list[str]:
    """The keys of a listing (relative to its prefix) as safe relative paths of one folder.

    Folder markers (keys ending in '/') are skipped; at most `MAX_LISTING` keys.

    Raises:
        IntegrityError: too many keys, an unsafe key, two keys for one file, a key that is both a file
            and a folder, or one of `reserved` (our own file names) at the top.
    """
    if len(keys) > MAX_LISTING:
        raise IntegrityError(f"{where} lists more than {MAX_LISTING} objects; refusing to fetch it.")
    paths = [k for k in keys if not k.endswith("/")]
    for path in paths:
        if problem := path_problem(path):
            raise IntegrityError(
                f"{where} lists the unsafe key {short(path)} ({problem}); refusing to fetch it."
            )
    if problem := files_problem(paths, reserved):
        raise IntegrityError(f"{where} lists {problem}; refusing to fetch it.")
    return paths


__all__ = [
    "MAX_LATEST_BYTES",
    "MAX_LISTING",
    "MAX_MANIFEST_BYTES",
    "parse_latest",
    "parse_listing",
    "parse_manifest",
    "read_bounded",
]
