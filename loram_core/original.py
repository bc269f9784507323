"""The original model a version was pruned from: recorded by the publisher, found again by the consumer.

The publisher records it in the manifest's `base.original` (`original_record`) in the form a
consumer can use: a hub id with its commit, a bucket URI, a local checkpoint path, or, for the demo,
the exact cache path and the settings that rebuild it (`loram original --build URI`). The consumer's
`recover` and `merge` find it there (`resolve_original`) and check it is the same checkpoint: its
fingerprint (sha256 over its config and weight files, `steps.base_fingerprint`, computed on disk the
same way the publisher computed it) must equal the manifest's. Anything that cannot be resolved is
refused, naming `--original`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loram_core.errors import LoramError

KINDS = ("hub", "path", "uri", "demo")


@dataclass(frozen=True)
class Original:
    """The original model as a recovered adapter names it, and where its files are on this machine."""

    name: str  # the adapter's base_model_name_or_path: a local directory or a hub id
    path: Path | None  # a local checkpoint directory (config.json + weights), when there is one
    revision: str | None = None  # the hub commit the version was pruned from
    how: str = ""  # one clause for messages: where it was found and how it was checked


def original_record(source: str, base_dir: str, demo: dict | None = None) -> dict:
    """What the manifest's `base.original` says about the original, for a consumer to find it.

    Args:
        source: `base.source` as configured (`demo`, a directory, `s3://...`, a hub id).
        base_dir: the checkpoint directory the run read (the demo cache, a fetched copy, the source).
        demo: for the demo base, `{"demo": base.demo settings, "cache_dir", "heldout_fraction",
            "heldout_unit"}`: what `build_demo_base` needs to rebuild it.

    Returns:
        `{"kind": "demo" | "path" | "uri" | "hub", ...}`: `path` (absolute) for a local or demo
        base, `uri` for a bucket, `repo_id` for a hub id; the demo's settings under `demo`.
    """
    from loram_core.bucket.inputs import is_remote

    if source == "demo":
        return {"kind": "demo", "path": str(Path(base_dir).expanduser().absolute()), **(demo or {})}
    if is_remote(source):
        return {"kind": "uri", "uri": source.rstrip("/")}
    if Path(source).expanduser().is_dir():
        return {"kind": "path", "path": str(Path(source).expanduser().absolute())}
    return {"kind": "hub", "repo_id": source.removeprefix("hf://").split("@")[0]}


def original_of(base: dict) -> dict:
    """`base.original` of a manifest; for a manifest written before it existed, inferred from `source`."""
    record = dict(base.get("original") or {})
    if base.get("repo_id"):  # the hub's own record (repo id and the commit that was read) wins
        record = {"kind": "hub", "repo_id": base["repo_id"], "commit": base.get("commit"), **record}
        record["kind"] = "hub"
    if record:
        return record
    source = str(base.get("source") or "")
    if not source or source == "demo":
        return {"kind": "demo"} if source == "demo" else {}
    if "://" in source and not source.startswith("hf://"):
        return {"kind": "uri", "uri": source}
    if source.startswith(("/", ".", "~")):
        return {"kind": "path", "path": source}
    return {"kind": "hub", "repo_id": source.removeprefix("hf://").split("@")[0]}


def resolve_original(
    base: dict | None, given: str | Path | None, where: str, uri: str | None = None
) -> Original:
    """The original a recovered adapter is for: `given` (`--original`), else the manifest's record.

    Args:
        base: the version's manifest `base` section (None for a bare pruned checkpoint).
        given: `--original` as typed: a checkpoint directory, a bucket URI or a hub id.
        where: the pruned base, for messages.
        uri: the version's URI, for the rebuild command in messages.

    Raises:
        LoramError: `given` is a pruned LoRAM base or names no checkpoint; the recorded original is
            not on this machine, or holds another checkpoint than the one the version was pruned
            from (its fingerprint differs); or there is no record. Each names `--original`.
    """
    if given is not None:
        return given_original(str(given))
    if not base:
        raise LoramError(
            f"the base at {where!r} has no manifest naming its original model, so the recovered adapter could "
            "not say which model it is for. Pass --original (the original checkpoint directory or its hub id)."
        )
    record = original_of(base)
    kind = record.get("kind")
    fingerprint = base.get("fingerprint")
    if kind == "hub":
        return _hub(record["repo_id"], record.get("commit") or record.get("revision"))
    if kind == "uri":
        return _checked(_fetch(record["uri"]), fingerprint, f"fetched from {record['uri']}", where)
    if kind == "path":
        path = Path(record["path"]).expanduser()
        if not (path / "config.json").is_file():
            raise LoramError(
                f"the original this version was pruned from, {str(path)!r} (a checkpoint on the publisher's "
                f"machine), is not here. Pass --original a copy of it (fingerprint {fingerprint})."
            )
        return _checked(path, fingerprint, f"recorded in the manifest at {path}", where)
    if kind == "demo":
        return _demo(record, fingerprint, where, uri)
    raise LoramError(
        f"the manifest of the base at {where!r} does not say where its original model is. Pass --original (the "
        "original checkpoint directory or its hub id)."
    )


def demo_candidates(record: dict) -> list[Path]:
    """Where the demo base may be: the recorded path, then the same folder under this machine's cache."""
    from loram_core.config import BaseConfig

    out = []
    if record.get("path"):
        recorded = Path(record["path"]).expanduser()
        default = Path(record.get("cache_dir") or BaseConfig().cache_dir).expanduser()
        out = [recorded, default / recorded.name]
        if Path(BaseConfig().cache_dir).expanduser() != default:
            out.append(Path(BaseConfig().cache_dir).expanduser() / recorded.name)
    return list(dict.fromkeys(out))


def _demo(record: dict, fingerprint: str | None, where: str, uri: str | None) -> Original:
    candidates = demo_candidates(record)
    rebuild = f"`loram original --build {uri}`" if uri else "`loram original --build URI`"
    for path in candidates:
        if (path / "config.json").is_file():
            return _checked(path, fingerprint, f"the demo base at {path}", where)
    if not candidates:  # a manifest from before the record: it never said where the demo base was
        raise LoramError(
            f"the base at {where!r} was pruned from the demo base, but its manifest predates the record of where "
            "that base is cached. Pass --original the demo base's folder (<base.cache_dir>/demo-base-*)."
        )
    raise LoramError(
        f"the demo base this version was pruned from is not on this machine (looked in {candidates[0]}"
        + (f" and {candidates[1]}" if len(candidates) > 1 else "")
        + f"). Rebuild it with {rebuild} (pretrains it here: minutes on a CPU; another machine may "
        "pretrain a slightly different model, which the fingerprint check then refuses), or pass --original "
        "its folder."
    )


def _checked(path: Path, fingerprint: str | None, how: str, where: str) -> Original:
    """`path` as the original, if its fingerprint is the manifest's."""
    from loram_core.steps.inputs import base_fingerprint

    _refuse_pruned(path, "the recorded original")
    if fingerprint:
        found = base_fingerprint(str(path))
        if found != fingerprint:
            raise LoramError(
                f"{str(path)!r} ({how}) holds another checkpoint than the one the base at {where!r} was pruned from: "
                f"its fingerprint is {found}, the manifest's {fingerprint} (sha256 over config and weight files). "
                "A demo base rebuilt on another machine pretrains a slightly different model. Pass --original "
                f"{path} to use it anyway, or --original the checkpoint the version was pruned from."
            )
        how += f", fingerprint {found} matches"
    return Original(str(path.absolute()), path.absolute(), how=how)


def given_original(given: str, hint: str = "") -> Original:
    """`--original` as typed: a directory, a bucket URI (fetched into the cache), or a hub id.

    Args:
        given: the value (a hub id may carry `@revision`).
        hint: a sentence added when `given` is a pruned LoRAM base.

    Raises:
        LoramError: a directory without config.json, a pruned base, or a path that does not exist.
    """
    if "://" in given and not given.startswith(("hf://", "file://")):
        return Original(*_named(_fetch(given)), how=f"fetched from {given}")
    text = given.removeprefix("file://")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoramError(
                f"--original {given!r} is a directory without config.json; pass the original checkpoint's "
                "directory (config.json + *.safetensors) or its hub id."
            )
        _refuse_pruned(path, f"--original {given!r}", hint)
        return Original(str(path.absolute()), path.absolute(), how="given with --original")
    if given.startswith(("/", ".", "~", "file://")) or path.exists() or given.count("/") != 1:
        raise LoramError(
            f"--original {given!r} is not a checkpoint directory here (nor a hub id ORG/NAME); pass the original "
            "checkpoint's directory or its hub id."
        )
    repo, _, revision = given.removeprefix("hf://").partition("@")
    return _hub(repo, revision or None)


def _named(path: Path) -> tuple[str, Path]:
    return str(path.absolute()), path.absolute()


def _refuse_pruned(path: Path, what: str, hint: str = "") -> None:
    """A LoRAM base (a `loram` section in config.json) is never an original; read without remote code."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return  # the shape checks report an unreadable config
    if isinstance(config, dict) and config.get("loram"):
        raise LoramError(
            f"{what} ({str(path)!r}) is a pruned LoRAM base (its config.json has a `loram` section), not the "
            "original model. Pass --original the checkpoint it was pruned from (the published version's README "
            f"names it).{' ' + hint if hint else ''}"
        )


def _hub(repo_id: str, revision: str | None) -> Original:
    """A hub id: its local snapshot when the hub cache holds it (no download), else the id alone."""
    path = None
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no huggingface_hub): peft downloads it when loading
        path = None
    at = f"@{revision}" if revision else ""
    how = f"the hub model {repo_id}{at}" + (f", cached at {path}" if path else "")
    return Original(repo_id, path, revision, how)


def _fetch(uri: str) -> Path:
    """A bucket copy of the original, fetched once into `~/.cache/loram-provider/originals`."""
    from loram_core.bucket.inputs import fetch_tree
    from loram_core.config import BaseConfig

    return fetch_tree(uri, Path(BaseConfig().cache_dir).expanduser() / "originals", key="--original")
