"""Base checkpoints named by their Hugging Face hub id: `ORG/NAME` or `ORG/NAME@REVISION`.

How `base.source` is read (the same rule everywhere, stated in the field's description):

1. `demo` is the embedded demo model; `s3://...` a checkpoint folder in a bucket;
2. `hf://ORG/NAME[@REV]` is always a hub id;
3. a path that exists on this machine is that local directory (it wins over rule 4);
4. otherwise `ORG/NAME[@REV]` (two names of letters, digits, `-`, `_`, `.`; no leading `.`, `/`
   or `~`) is a hub id; anything else is a local path (reported missing).

A hub id is fetched with `huggingface_hub.snapshot_download` into the standard hub cache
(`HF_HUB_CACHE`, else `HF_HOME/hub`), only the files a checkpoint needs (`HUB_FILES` + its
safetensors shards), with `HF_TOKEN` from the environment (else a stored login). With
`HF_HUB_OFFLINE=1` it resolves from that cache alone. The snapshot folder is named by the commit,
so the revision a run used is known exactly; the manifest records repo id, revision and commit.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from loram_core.errors import LoramError

HF_PREFIX = "hf://"
# What a base checkpoint needs and nothing else: no pickled weights, no `original/` consolidated copies.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*",
    "README.md",  # the original's card: its license travels with the pruned versions
]
INDEX = "model.safetensors.index.json"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]{{0,199}}))?$")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})$")


@dataclass(frozen=True)
class HubId:
    """A model repository on the hub and the revision asked for (`main` when none is given)."""

    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"


def parse_hub_id(source: str) -> HubId | None:
    """The hub id `source` names under the rule above, or None when it is a local path (or demo, s3://)."""
    explicit = source.startswith(HF_PREFIX)
    text = source.removeprefix(HF_PREFIX) if explicit else source
    if not explicit and (source == "demo" or "://" in source or Path(source).expanduser().exists()):
        return None
    match = _HUB_ID.match(text)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        if explicit:
            raise LoramError(
                f"base.source={source!r} is not a hub id; write hf://ORG/NAME or hf://ORG/NAME@REVISION "
                "(as on the model's page, e.g. hf://meta-llama/Llama-3.1-8B)."
            )
        return None
    return HubId(match["repo"], match["rev"] or "main")


def _cache_dir() -> str | None:
    # Read at call time (huggingface_hub reads it once at import), so a run's environment decides.
    return os.environ.get("HF_HUB_CACHE") or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def snapshot(hub: HubId, weights: bool = True) -> Path:
    """The local snapshot of `hub` (downloaded now, or found in the hub cache).

    Args:
        hub: repo id and revision.
        weights: also fetch the safetensors weights (the shards the index names, else
            `model.safetensors`); False fetches config, tokenizer and card only (the preflight).

    Returns:
        `<hub cache>/models--ORG--NAME/snapshots/<commit>`.

    Raises:
        LoramError: the repo or revision does not exist, is gated or private without a token,
            the hub is unreachable and the cache lacks it, or it holds no safetensors weights.
    """
    path = _download(hub, HUB_FILES)
    if not (path / "config.json").is_file():
        raise LoramError(
            f"base.source={str(hub)!r}: the repository has no config.json at {hub.revision!r}, so it is no "
            "transformers checkpoint; name a model repository (ORG/NAME as on its page)."
        )
    if not weights:
        return path
    shards = weight_files(path)
    path = _download(hub, HUB_FILES + shards)
    missing = [s for s in shards if not (path / s).is_file()]
    if missing and _offline():
        raise LoramError(
            f"base.source={str(hub)!r}: the local hub cache lacks {', '.join(missing[:3])} of commit {path.name}; "
            f"download it once with network access (`hf download {hub.repo_id} --revision {hub.revision}`) "
            "or unset HF_HUB_OFFLINE."
        )
    if missing:
        raise LoramError(
            f"base.source={str(hub)!r}: the repository has neither model.safetensors nor {INDEX} at commit "
            f"{path.name}; this project reads safetensors weights only (never pickled .bin). Use a revision "
            "with safetensors, or convert the checkpoint and point base.source at the local directory."
        )
    return path


def used_files(path: Path) -> list[str]:
    """The files of a snapshot that a run reads: those `snapshot` asks for (a cache filled by a full
    download may hold more, e.g. pickled or consolidated copies, which are neither read nor hashed)."""
    from huggingface_hub.utils import filter_repo_objects

    present = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return list(filter_repo_objects(present, allow_patterns=HUB_FILES + weight_files(path)))


def weight_files(path: Path) -> list[str]:
    """The safetensors files a snapshot's index names, else `["model.safetensors"]`."""
    index = path / INDEX
    if not index.is_file():
        return ["model.safetensors"]
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise LoramError(
            f"{index} is not a safetensors index (no `weight_map`); the repo is broken."
        ) from None


def _download(hub: HubId, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"base.source={str(hub)!r}"
    token = os.environ.get("HF_TOKEN") or None
    try:
        return Path(
            snapshot_download(
                hub.repo_id,
                revision=hub.revision,
                allow_patterns=patterns,
                cache_dir=_cache_dir(),
                local_files_only=_offline(),
                token=token,
            )
        )
    except GatedRepoError:  # before RepositoryNotFoundError: it is a subclass
        with_token = "the HF_TOKEN set has no access" if token else "HF_TOKEN is not set"
        raise LoramError(
            f"{where}: {hub.repo_id} is a gated repository and {with_token}. Accept its terms on "
            f"https://huggingface.co/{hub.repo_id} and set HF_TOKEN to a read token of that account."
        ) from None
    except RepositoryNotFoundError:
        raise LoramError(
            f"{where}: no model repository {hub.repo_id!r} on the hub (or it is private and "
            f"{'HF_TOKEN grants no access' if token else 'HF_TOKEN is not set'}). Check ORG/NAME against the model's "
            "page, set HF_TOKEN, or point base.source at a local directory (a path that exists wins)."
        ) from None
    except RevisionNotFoundError:
        raise LoramError(
            f"{where}: {hub.repo_id} has no revision {hub.revision!r}; write ORG/NAME@BRANCH, @TAG or @COMMIT "
            "(or no @ for main)."
        ) from None
    except LocalEntryNotFoundError as err:
        cache = _cache_dir() or "the default hub cache (~/.cache/huggingface/hub)"
        if _offline():
            raise LoramError(
                f"{where}: HF_HUB_OFFLINE=1 and {cache} holds no complete snapshot of {hub.repo_id} at "
                f"{hub.revision!r}. Download it once with network access (`hf download {hub.repo_id} "
                f"--revision {hub.revision}`, same HF_HUB_CACHE), or unset HF_HUB_OFFLINE."
            ) from None
        reason = str(err.__cause__ or err).splitlines()[0]
        raise LoramError(
            f"{where}: the hub cannot be reached ({reason}) and {cache} holds no snapshot of it. Check the "
            "network (or HF_ENDPOINT), or fill the cache elsewhere and run with HF_HUB_OFFLINE=1."
        ) from None
    except HfHubHTTPError as err:
        raise LoramError(f"{where}: the hub refused the download ({str(err).splitlines()[0]}).") from None


def is_snapshot(path: str | Path) -> bool:
    """Whether `path` is a snapshot folder of a hub cache (`.../models--ORG--NAME/snapshots/<commit>`)."""
    return _CACHE_SNAPSHOT.search(Path(path).expanduser().absolute().as_posix()) is not None


def origin(source: str, base_dir: str | Path) -> dict:
    """What the manifest records of a hub base: `{"repo_id", "revision", "commit"}`, else {}.

    A local directory inside a hub cache (`.../models--ORG--NAME/snapshots/<commit>`) is known too.
    """
    hub = parse_hub_id(source) if source != "demo" else None
    match = _CACHE_SNAPSHOT.search(Path(base_dir).expanduser().absolute().as_posix())
    if hub is None and match is None:
        return {}
    record = {"repo_id": hub.repo_id if hub else f"{match['org']}/{match['name']}"}
    if hub is not None:
        record["revision"] = hub.revision
    if match is not None:
        record["commit"] = match["commit"]
    return record


def card_license(base_dir: str | Path) -> dict[str, str]:
    """The original's license as its card's YAML block (or its config.json) states it, else {}.

    Returns `{"license": ...}`, with `license_name` / `license_link` when the card gives them
    (the hub's form for `license: other`, e.g. Llama's community licenses).
    """
    import yaml

    base_dir = Path(base_dir)
    card = base_dir / "README.md"
    meta: dict = {}
    if card.is_file():
        text = card.read_text(errors="replace")
        if text.startswith("---"):
            block = text[3:].split("\n---", 1)[0]
            try:
                meta = yaml.safe_load(block) or {}
            except yaml.YAMLError:
                meta = {}
    if not isinstance(meta, dict) or not meta.get("license"):
        try:
            config = json.loads((base_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        meta = {"license": config["license"]} if isinstance(config.get("license"), str) else {}
    return {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}
