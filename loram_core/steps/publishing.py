"""The publish step: stage the version (model/, model-nf4/, masks/, README.md), manifest last."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from loram_core import __version__
from loram_core.config import PipelineConfig
from loram_core.steps._common import Progress, fresh
from loram_core.steps.alignment import train_log
from loram_core.steps.inputs import (
    base_fingerprint,
    corpus_info,
    prepare_calibration,
    prepare_eval,
    text_blocks_info,
)


def code_version() -> str:
    """This package's version, with the git commit when it runs from a checkout (`0.1.0+gabc1234`)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return f"{__version__}+g{sha}"
    except (OSError, subprocess.CalledProcessError):
        return __version__


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
        `{"uri", "status" ("published" | "unchanged"), "uploaded_files", "uploaded_bytes", "skipped_files"}`.
    """
    from loram_core.bucket import publish as publish_files
    from loram_core.card import model_card
    from loram_core.manifest import list_files
    from loram_core.stock import ship_modeling_code

    version = pin_version(cfg).publish.version
    uri = publish_uri(cfg)
    staging = fresh(Path(cfg.workdir).expanduser() / f"publish-{cfg.publish.name}-{version}")
    try:
        (staging / "model").mkdir()
        for f in Path(aligned_dir).iterdir():
            if f.is_file() and f.name != "train_log.json":
                shutil.copy2(f, staging / "model" / f.name)
        shutil.copytree(Path(aligned_dir) / "masks", staging / "masks")
        if nf4_dir is not None:
            shutil.copytree(nf4_dir, staging / "model-nf4")
        # Per-layer widths: the variant ships its modeling code (auto_map), see loram_core.stock.
        variants = [staging / v for v in ("model", "model-nf4") if (staging / v).is_dir()]
        remote_code = any([ship_modeling_code(v) for v in variants])
        manifest = _manifest(
            cfg, version, base_dir, blocks_file, aligned_dir, nf4_dir, evaluation, verification
        )
        (staging / "README.md").write_text(model_card(manifest, uri, remote_code=remote_code))
        manifest.files = list_files(staging)
        check = cfg.publish.check_create_only
        return asdict(publish_files(staging, manifest, uri, check_create_only=check, progress=progress))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    from loram_core.bucket.inputs import provenance
    from loram_core.manifest import Manifest
    from loram_core.models import load_config

    aligned = cfg.runs("align") and "aligned_ppl" in evaluation["metrics"]
    base_config = load_config(base_dir)
    return Manifest(
        name=cfg.publish.name,
        version=version,
        # LATEST follows publication time: microseconds, so two versions of one second are ordered.
        created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        base={
            "source": cfg.base.source,
            "fingerprint": base_fingerprint(base_dir),
            **provenance(base_dir),  # where an s3:// base was fetched from, each file's sha256
            "model_type": base_config.model_type,
            "num_hidden_layers": base_config.num_hidden_layers,
        },
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
