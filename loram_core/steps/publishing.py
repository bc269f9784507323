"""The publish step: stage the version (model/, model-nf4/, masks/, README.md), manifest last."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from loram_core.config import PipelineConfig
from loram_core.steps._common import Progress, fresh
from loram_core.steps.alignment import train_log
from loram_core.steps.inputs import (
    base_files_sha256,
    base_fingerprint,
    corpus_info,
    prepare_calibration,
    prepare_eval,
    text_blocks_info,
)
from loram_core.version import code_version


def pin_version(cfg: PipelineConfig) -> PipelineConfig:
    """The config with `publish.version` set: as given, or the UTC time now (call once per run, so
    a retried publish reuses the version instead of minting another)."""
    if cfg.publish.version:
        return cfg
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"version": stamp})})


def publish_uri(cfg: PipelineConfig) -> str:
    """Where the version goes: `publish.uri`, or `<workdir>/local-bucket` when publishing is off."""
    if cfg.publish.enabled:
        return cfg.publish.uri
    return f"file://{(Path(cfg.workdir).expanduser() / 'local-bucket').absolute()}"


def publish(
    cfg: PipelineConfig,
    base_dir: str,
    blocks_file: str | None,
    aligned_dir: str,
    nf4_dir: str | None,
    evaluation: dict,
    verification: dict | None = None,
    progress: Progress | None = None,
) -> dict:
    """Stage the version (model/, model-nf4/, masks/, README.md), write the manifest last.

    `verification` (the `verify` step's record, when it ran) goes into the manifest and the model card.

    Returns:
        `{"uri", "status" ("published" | "unchanged"), "uploaded_files", "uploaded_bytes", "skipped_files",
        "latest" ({"moved", "reason"})}`. A minted version whose content a published version of the
        name already holds (every step reused) is not published: the result names that version,
        `unchanged` (`steps._releases`).
    """
    from loram_core.bucket import open_store
    from loram_core.bucket import publish as publish_files
    from loram_core.bucket.upload import move_latest
    from loram_core.card import model_card
    from loram_core.manifest import list_files
    from loram_core.steps._releases import latest_decision, record_published, same_content

    version = pin_version(cfg).publish.version
    uri = publish_uri(cfg)
    staging = fresh(Path(cfg.workdir).expanduser() / f"publish-{cfg.publish.name}-{version}")
    try:
        shutil.copytree(Path(aligned_dir) / "masks", staging / "masks")
        variants = {"model": Path(aligned_dir)} | ({"model-nf4": Path(nf4_dir)} if nf4_dir else {})
        remote_code = {
            name: stage_variant(src, staging / name, Path(base_dir), cfg.publish.max_shard_size)
            for name, src in variants.items()
        }
        remote_code["uniform"] = _uniform(staging / "model")
        evaluation = {**evaluation, "params": _as_staged(evaluation["params"], staging)}
        manifest = _manifest(
            cfg, version, base_dir, blocks_file, aligned_dir, nf4_dir, evaluation, verification
        )
        (staging / "README.md").write_text(model_card(manifest, uri, remote_code=remote_code))
        manifest.files = list_files(staging)
        move, reason = latest_decision(cfg, manifest.align.get("enabled", True), nf4_dir is not None)
        existing = same_content(cfg, uri, manifest)
        if existing is not None:  # every step reused: that version already holds this content
            moved = move and move_latest(open_store(uri), existing)
            version_uri = f"{uri.rstrip('/')}/{existing.name}/{existing.version}"
            return {"uri": version_uri, "status": "unchanged", "uploaded_files": 0, "uploaded_bytes": 0,
                    "skipped_files": len(existing.files), "latest": {"moved": moved, "reason": reason}}  # fmt: skip
        check = cfg.publish.check_create_only
        done = publish_files(staging, manifest, uri, check_create_only=check, progress=progress, latest=move)
        record_published(cfg.workdir, uri, manifest)
        return {**asdict(done), "latest": {"moved": done.latest_moved, "reason": reason}}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stage_variant(src: Path, dst: Path, base_dir: Path, max_shard_size: int | str) -> bool:
    """Stage one variant (`model/` or `model-nf4/`) in the Hugging Face layout; returns whether it
    needs `trust_remote_code=True`.

    Its weights are re-sharded to at most `max_shard_size`, the original's tokenizer files, chat
    template and generation config replace the re-saved ones, and its config becomes a plain family
    config where the widths are uniform, else ships the modeling code where stock classes would fail
    (`loram_core.stock`).
    """
    from loram_core.hf_layout import carry_original_files, copy_variant
    from loram_core.stock import make_loadable

    copy_variant(src, dst, max_shard_size, skip=("train_log.json",))
    carry_original_files(base_dir, dst)
    return make_loadable(dst)


def _as_staged(params: dict, staging: Path) -> dict:
    """`params` with the file sizes of the variants as staged: re-sharding rewrites each file's header,
    so the step's checkpoint sizes are not the version's (the manifest and card state the version's)."""
    from loram_core.sizes import stored_sizes

    out = {**params, "stored_bytes": stored_sizes(staging / "model", count_nonzero=False)["stored_bytes"]}
    if "nf4_stored_bytes" in params and (staging / "model-nf4").is_dir():
        out["nf4_stored_bytes"] = stored_sizes(staging / "model-nf4", count_nonzero=False)["stored_bytes"]
    return out


def _uniform(model_dir: Path) -> bool:
    """Whether a staged variant's config is a uniformly pruned plain family config."""
    import json

    return bool((json.loads((model_dir / "config.json").read_text()).get("loram") or {}).get("original"))


def _manifest(
    cfg: PipelineConfig,
    version: str,
    base_dir: str,
    blocks_file: str | None,
    aligned_dir: str,
    nf4_dir: str | None,
    evaluation: dict,
    verification: dict | None,
):
    """The version's manifest (its `files` are filled in once the card is staged too)."""
    from loram_core.manifest import Manifest
    from loram_core.models import load_config

    aligned = cfg.runs("align") and "aligned_ppl" in evaluation["metrics"]
    base_config = load_config(base_dir)
    return Manifest(
        name=cfg.publish.name,
        version=version,
        # LATEST follows publication time: microseconds, so two versions of one second are ordered.
        created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        # base.original: where a consumer finds the original (recover, merge)
        base={**_base_record(cfg.base.source, base_dir, base_config), "original": _original(cfg, base_dir)},
        corpus={k: v for k, v in corpus_info(blocks_file).items() if k != "files"},
        calibration={
            **cfg.calibration.model_dump(mode="json"),
            **text_blocks_info(prepare_calibration(cfg, base_dir, blocks_file)),
        },
        eval={
            **cfg.eval.model_dump(mode="json"),
            **text_blocks_info(prepare_eval(cfg, base_dir, blocks_file)),
        },
        until=cfg.until,
        prune=cfg.prune.model_dump(mode="json"),
        align={**cfg.align.model_dump(mode="json"), **_train_facts(aligned_dir)}
        if aligned
        else {"enabled": False},
        quantize={**cfg.quantize.model_dump(mode="json"), "enabled": True} if nf4_dir else {"enabled": False},
        params=evaluation["params"],
        metrics=evaluation["metrics"],
        compute=evaluation.get("compute", {}),
        verification=verification,
        files=[],
        code_version=code_version(),
    )


def _original(cfg: PipelineConfig, base_dir: str) -> dict:
    """The manifest's `base.original` (`loram_core.original`): for the demo, its cache path
    and what rebuilds it."""
    from loram_core.original import original_record
    from loram_core.sources import heldout_rule

    demo = None
    if cfg.base.source == "demo":
        fraction, unit = heldout_rule(cfg)
        demo = {"demo": cfg.base.demo.model_dump(mode="json"), "cache_dir": cfg.base.cache_dir,
                "heldout_fraction": fraction, "heldout_unit": unit}  # fmt: skip
    return original_record(cfg.base.source, base_dir, demo)


def _base_record(source: str, base_dir: str, base_config) -> dict:
    """The manifest's `base`: source, fingerprint, where it came from (hub repo id, revision and
    commit; or the bucket it was fetched from), each file's sha256, the original's license."""
    from loram_core.bucket.inputs import provenance
    from loram_core.hub import card_license, origin

    hashes = base_files_sha256(base_dir)
    return {
        "source": source,
        "fingerprint": base_fingerprint(base_dir, hashes),
        **origin(source, base_dir),  # a hub id: repo_id, revision, commit
        "files_sha256": hashes,
        **provenance(base_dir),  # an s3:// base: the URI it was fetched from, the sha256s hashed on the way
        **card_license(base_dir),
        "model_type": base_config.model_type,
        "num_hidden_layers": base_config.num_hidden_layers,
    }


def _train_facts(aligned_dir: str) -> dict:
    """The alignment facts the manifest records (final loss, tokens, throughput); {} when it did not run."""
    data = train_log(aligned_dir)
    if not data["losses"]:
        return {}
    return {
        "final_loss": data["losses"][-1][1],
        "tokens_seen": data["tokens"],
        "tokens_per_s": round(data["tokens_per_s"], 1),
    }
