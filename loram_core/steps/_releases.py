"""What a consumer relies on across versions: when `LATEST` moves, and when a re-run publishes nothing.

`LATEST` is what `loram pull <bucket>/<name>` gives; `publish.latest` decides whether a version moves
it. `auto` moves it only for a version that holds what the name promises: an aligned model, and its
NF4 variant when the config quantizes. A version's content is everything but the publication itself
(its name, version, time, code version and card): a run whose steps were all reused makes the same
content, and then publishes nothing and reports the version that already holds it (`unchanged`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from loram_core.config import PipelineConfig, fingerprint
from loram_core.manifest import Manifest

# What `pin_version` mints when `publish.version` is unset; only such a version gives way to an
# existing one of the same content (a version the publisher named is published under that name).
MINTED = re.compile(r"^\d{8}-\d{6}$")
CARD = "README.md"  # the card names the version and its URI: not content


def latest_decision(cfg: PipelineConfig, aligned: bool, nf4: bool) -> tuple[bool, str]:
    """(whether `LATEST` moves to this run's version, the sentence that says why).

    Args:
        cfg: the run's config (`publish.latest`, `quantize.enabled`).
        aligned: the version holds an aligned model.
        nf4: the version holds `model-nf4/`.
    """
    policy = cfg.publish.latest
    if policy is True or policy is False:
        return policy, f"publish.latest={str(policy).lower()}"
    promise = "aligned" + (" and NF4-quantized" if cfg.quantize.enabled else "")
    lacks = []
    if not aligned:
        lacks.append("not aligned")
    if cfg.quantize.enabled and not nf4:
        lacks.append("no NF4 variant")
    if lacks:
        return False, (
            f"publish.latest=auto moves LATEST only for an {promise} version, and this one has "
            f"{' and '.join(lacks)}; set publish.latest=true to move it anyway"
        )
    return True, f"publish.latest=auto: an {promise} version"


def content_id(m: Manifest) -> str:
    """sha256 of a version's content: its files but the card (paths and hashes) and its manifest
    without the publication's own fields (name, version, created_at, code_version, files)."""
    facts = m.model_dump(mode="json", exclude={"name", "version", "created_at", "code_version", "files"})
    files = sorted((f.path, f.sha256) for f in m.files if f.path != CARD)
    return hashlib.sha256(json.dumps([facts, files], sort_keys=True).encode()).hexdigest()


def _record_file(workdir: str, uri: str, name: str) -> Path:
    return Path(workdir).expanduser() / "published" / f"{name}-{fingerprint(uri.rstrip('/'))}.json"


def record_published(workdir: str, uri: str, m: Manifest) -> None:
    """Remember which version holds this content (the work dir's own index; `LATEST` may not name it)."""
    path = _record_file(workdir, uri, m.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(path.read_text()) if path.is_file() else {}
    known[content_id(m)] = m.version
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2))
    tmp.replace(path)


def same_content(cfg: PipelineConfig, uri: str, m: Manifest) -> Manifest | None:
    """The published version of `m`'s name that already holds `m`'s content, if any.

    Only for a minted version (`publish.version` unset). Looked for where a re-run finds it: the
    version `LATEST` names, and the versions this work dir published (`record_published`); each is
    read through the strict parser, so a version that is gone or refused is simply not a match.
    """
    if not MINTED.match(m.version):
        return None
    from loram_core.bucket import resolve_version

    wanted = content_id(m)
    path = _record_file(cfg.workdir, uri, m.name)
    known = json.loads(path.read_text()) if path.is_file() else {}
    names = [f"{uri.rstrip('/')}/{m.name}"]
    if wanted in known:
        names.insert(0, f"{uri.rstrip('/')}/{m.name}/{known[wanted]}")
    for candidate in names:
        try:
            _, existing = resolve_version(candidate)
        except Exception:  # noqa: BLE001 - gone, refused or unreachable: not a match (publish reports errors)
            continue
        if existing.version != m.version and content_id(existing) == wanted:
            return existing
    return None
