"""The provider pipeline's steps, free of any orchestrator.

Each step takes the config and the paths of its inputs, writes its output into a directory of the
work dir keyed by the hash of its inputs and settings, and returns small things (paths, dicts), so
Prefect tasks can wrap them in a line and a re-run skips finished work. A step writes into a
temporary directory and renames it when complete: a crash never leaves a half-written output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from loram_core import __version__
from loram_core.align import clear_checkpoint, train_causal_lm
from loram_core.config import (
    SPARSE,
    AlignConfig,
    PipelineConfig,
    PruneConfig,
    QuantizeConfig,
    RunContext,
    fingerprint,
)
from loram_core.data import (
    files_fingerprint,
    load_blocks,
    make_blocks,
    read_documents,
    resolve_files,
    resolve_patterns,
    save_blocks,
)
from loram_core.demo import build_demo_base
from loram_core.device import default_dtype, describe, resolve_device
from loram_core.errors import LoramError
from loram_core.evaluate import perplexity
from loram_core.launch import DeadlineExceeded, run_group
from loram_core.manifest import Manifest, list_files, sha256_file
from loram_core.models import load_config, load_model
from loram_core.prune import load_masks, plan, prune_checkpoint, save_masks
from loram_core.quantize import quantize_checkpoint
from loram_core.sizes import size_summary
from loram_core.sources import TextBlocks, calibration_blocks, eval_blocks, heldout_rule

Progress = Callable[[dict], None]


def _step_dir(ctx: RunContext | PipelineConfig, name: str, key: dict) -> Path:
    return Path(ctx.workdir).expanduser() / f"{name}-{fingerprint(key)}"


def compute_device(ctx: RunContext | PipelineConfig) -> torch.device:
    """The device every in-process step computes on (`device`, with `auto` resolved)."""
    return resolve_device(ctx.device)


def _commit(tmp: Path, final: Path) -> Path:
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def base_path(cfg: PipelineConfig) -> Path | None:
    """The base checkpoint directory if the source is a path (None for the demo, built on demand);
    an `s3://` source is fetched into the work dir first (once; verified against its ETags)."""
    from loram_core.bucket.inputs import fetch_tree, is_remote

    if cfg.base.source != "demo" and is_remote(cfg.base.source):
        return fetch_tree(cfg.base.source, cfg.workdir)
    return None if cfg.base.source == "demo" else Path(cfg.base.source).expanduser()


def preflight(cfg: PipelineConfig) -> None:
    """Check what can be checked before any work: base model, corpus, layer range, bucket, workdir.

    Cheap by design (`loram_core.checks`): config files, safetensors headers and the tokenizer
    are read, the corpus is streamed until one block of each split is certain; no weights load.

    Raises:
        LoramError: naming the missing or broken file or the bad value, and the fix.
    """
    from loram_core import checks

    path = base_path(cfg)
    tokenizer = None
    if path is not None:
        num_layers = checks.check_base(path).num_hidden_layers
        tokenizer = checks.check_tokenizer(path)
    else:
        num_layers = cfg.base.demo.num_hidden_layers
        checks.check_writable(cfg.base.cache_dir, "base.cache_dir")
    cfg.prune.layer_range(num_layers)
    compute_device(cfg)  # `device=cuda` on a machine without one is refused here, not at the first step
    if cfg.corpus.paths != "demo":
        fraction, unit = heldout_rule(cfg)
        corpus = cfg.corpus.model_copy(update={"heldout_fraction": fraction})
        checks.check_corpus(corpus, cfg.base.cache_dir, tokenizer, heldout_unit=unit)
    for key, section in (("calibration.source", cfg.calibration), ("eval.source", cfg.eval)):
        if section.source != "corpus":
            checks.check_text_files(
                section.source, section.format, section.text_field, cfg.base.cache_dir, key
            )
    if cfg.publish.enabled:
        checks.check_bucket(cfg.publish.uri)
        checks.check_publish_target(cfg)
    checks.check_writable(cfg.workdir, "workdir")
    from loram_core.verify import check_verify

    check_verify(cfg)  # verify.rank, verify.recover_mode and align.enabled, before any compute


def prepare_base(cfg: PipelineConfig, progress: Progress | None = None) -> str:
    """The original model's checkpoint directory: the given one, or the (cached) demo model."""
    path = base_path(cfg)
    if path is None:
        fraction, unit = heldout_rule(cfg)  # the base never trains on what evaluation scores
        corpus = cfg.corpus.model_copy(update={"heldout_fraction": fraction})
        return str(build_demo_base(cfg.base, corpus, progress, heldout_unit=unit))
    load_config(path)
    return str(path)


def base_fingerprint(base_dir: str) -> str:
    """sha256 over the base checkpoint's config and weight files (names and hashes)."""
    files = sorted(p for p in Path(base_dir).iterdir() if p.suffix in (".json", ".safetensors"))
    return fingerprint([(p.name, sha256_file(p)) for p in files])


def prepare_corpus(cfg: PipelineConfig, base_dir: str) -> str:
    """Tokenize and pack the corpus with the base model's tokenizer; returns the blocks file."""
    files = resolve_files(cfg.corpus, cfg.base.cache_dir)
    corpus_fp = files_fingerprint(files)
    fraction, unit = heldout_rule(cfg)
    key = {"corpus": cfg.corpus.model_dump(), "files": corpus_fp, "base": base_dir}
    if unit == "tokens":  # the documents rule keeps the keys (and work dirs) of earlier runs
        key["heldout"] = [fraction, unit]
    out = _step_dir(cfg, "corpus", key)
    blocks_file = out / "blocks.safetensors"
    if blocks_file.is_file():
        return str(blocks_file)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    docs = read_documents(files, cfg.corpus.format, cfg.corpus.text_field)
    c = cfg.corpus
    blocks = make_blocks(docs, tokenizer, c.seq_len, fraction, c.seed, c.max_tokens, c.eval_blocks, unit)
    tmp = _fresh(out.with_name(out.name + ".tmp"))
    save_blocks(tmp / "blocks.safetensors", blocks, {"fingerprint": corpus_fp})
    info = {
        "fingerprint": corpus_fp,
        "files": files,
        "documents": len(docs),
        "seq_len": c.seq_len,
        "train_tokens": blocks.train_tokens,
        "heldout_tokens": blocks.heldout.numel(),
    }
    (tmp / "corpus.json").write_text(json.dumps(info, indent=2))
    return str(_commit(tmp, out) / "blocks.safetensors")


def corpus_info(blocks_file: str) -> dict:
    return json.loads((Path(blocks_file).parent / "corpus.json").read_text())


def _text_blocks(
    cfg: PipelineConfig, name: str, make: Callable[..., TextBlocks], base_dir: str, blocks_file: str
) -> str:
    """Cache the blocks `make(cfg, tokenizer, blocks_file)` returns as `<name>.safetensors` + `<name>.json`."""
    section = getattr(cfg, name)
    key = {name: section.model_dump(), "corpus": blocks_file, "base": base_dir}
    if section.source != "corpus":
        files = resolve_patterns(section.source, cfg.base.cache_dir, f"{name}.source")
        key["files"] = files_fingerprint(files)
    if section.source == "corpus" or name == "calibration":  # corpus-relative defaults (seq_len, blocks)
        key["corpus_section"] = cfg.corpus.model_dump()
    out = _step_dir(cfg, name, key)
    if (out / f"{name}.json").is_file():
        return str(out / f"{name}.safetensors")
    result = make(cfg, AutoTokenizer.from_pretrained(base_dir), blocks_file)
    tmp = _fresh(out.with_name(out.name + ".tmp"))
    save_file({"blocks": result.blocks}, str(tmp / f"{name}.safetensors"))
    (tmp / f"{name}.json").write_text(json.dumps(result.info, indent=2))
    return str(_commit(tmp, out) / f"{name}.safetensors")


def prepare_calibration(cfg: PipelineConfig, base_dir: str, blocks_file: str) -> str:
    """The calibration blocks (`calibration` section) as a safetensors file; cached like every step."""
    return _text_blocks(cfg, "calibration", calibration_blocks, base_dir, blocks_file)


def prepare_eval(cfg: PipelineConfig, base_dir: str, blocks_file: str) -> str:
    """The held-out blocks every model is scored on (`eval` section) as a safetensors file."""
    return _text_blocks(cfg, "eval", eval_blocks, base_dir, blocks_file)


def text_blocks_info(blocks_file: str) -> dict:
    """What `prepare_calibration` / `prepare_eval` recorded about their blocks (source, shape, sha256)."""
    path = Path(blocks_file)
    return json.loads(path.with_suffix(".json").read_text())


def prune(
    prune: PruneConfig, ctx: RunContext, base_dir: str, calib_file: str, progress: Progress | None = None
) -> str:
    """Prune the base model; returns a directory with the checkpoint, tokenizer and `masks/`.

    Args:
        prune: the `prune` section.
        ctx: the run's work dir and device.
        base_dir: the original checkpoint.
        calib_file: the calibration blocks (`prepare_calibration`).
        progress: called with `{"step", "total", "what"}` per layer and phase.
    """
    device = compute_device(ctx)
    key = {"prune": prune.model_dump(), "base": base_dir, "calibration": calib_file, "device": device.type}
    out = _step_dir(ctx, "prune", key)
    if (out / "config.json").is_file():
        return str(out)
    tmp = _fresh(out.with_name(out.name + ".tmp"))
    calib = load_file(calib_file)["blocks"]
    torch.manual_seed(prune.seed)

    def report(what: str, done: int, total: int) -> None:
        if progress is not None:
            progress({"step": done, "total": total, "what": what})

    masks = prune_checkpoint(base_dir, tmp, prune, calib, report, device=device)
    save_masks(masks, tmp / "masks" / "masks.safetensors")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    return str(_commit(tmp, out))


def _sparse_masks(pruned_dir: str) -> dict[str, torch.Tensor] | None:
    masks = load_masks(Path(pruned_dir) / "masks" / "masks.safetensors")
    return masks.keep_masks() or None


def align(
    align: AlignConfig, ctx: RunContext, pruned_dir: str, blocks_file: str, progress: Progress | None = None
) -> str:
    """Continual pre-training of the pruned model; resumes from the last checkpoint after a crash.

    Args:
        align: the `align` section (`nproc_per_node` > 1 runs it under torchrun).
        ctx: the run's work dir and device.
        pruned_dir: the pruned checkpoint (`prune`).
        blocks_file: the corpus's packed blocks (`prepare_corpus`); trained on its training split.
        progress: called with `{"step", "total", "loss", ...}` as training goes.
    """
    device = compute_device(ctx)
    key = {
        "align": align.model_dump(exclude={"deadline_minutes"}),  # a deadline does not change the result
        "pruned": pruned_dir,
        "corpus": blocks_file,
        "device": device.type,
    }
    out = _step_dir(ctx, "align", key)
    if (out / "config.json").is_file():
        return str(out)
    if not align.enabled:
        return pruned_dir
    work = out.with_name(out.name + ".partial")  # checkpoints live here until the model is saved
    work.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(out.with_name(out.name + ".tmp"))
    if align.nproc_per_node > 1:
        result = _align_torchrun(align, pruned_dir, blocks_file, work, tmp, progress)
    else:
        model = load_model(pruned_dir).to(device)  # fp32 master weights; bf16 autocast on a GPU
        blocks = load_blocks(blocks_file)
        result = train_causal_lm(
            model, blocks.train, align, checkpoint_dir=work, masks=_sparse_masks(pruned_dir),
            progress=_with_deadline(progress, _deadline_s(align), work),
        ).to_dict()  # fmt: skip
        model.to("cpu").save_pretrained(tmp)
    AutoTokenizer.from_pretrained(pruned_dir).save_pretrained(tmp)
    shutil.copytree(Path(pruned_dir) / "masks", tmp / "masks")
    (tmp / "train_log.json").write_text(json.dumps(result))
    _commit(tmp, out)
    clear_checkpoint(work)
    shutil.rmtree(work, ignore_errors=True)
    return str(out)


_DEADLINE_FIX = "run it again to resume from there, with a larger align.deadline_minutes (or none)."


def _deadline_s(align: AlignConfig) -> float | None:
    minutes = align.deadline_minutes
    return None if minutes is None else 60.0 * minutes


def _with_deadline(progress: Progress | None, deadline_s: float | None, work: Path) -> Progress | None:
    """The in-process loop's progress callback, which stops training once the deadline has passed."""
    if deadline_s is None:
        return progress
    end = time.monotonic() + deadline_s

    def report(event: dict) -> None:
        if progress is not None:
            progress(event)
        if time.monotonic() > end:
            raise DeadlineExceeded(
                f"alignment ran past align.deadline_minutes={deadline_s / 60:.4g} and was stopped at step "
                f"{event['step']}/{event['total']}. Its checkpoint in {work} is kept: {_DEADLINE_FIX}"
            )

    return report


def _align_torchrun(
    align: AlignConfig, pruned_dir: str, blocks_file: str, work: Path, out: Path, progress: Progress | None
) -> dict:
    """Run the alignment loop in `align.nproc_per_node` processes on this node under torchrun."""
    config_file = work / "align-config.json"
    config_file.write_text(align.model_dump_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={align.nproc_per_node}", "-m", "loram_core.align_worker",
           "--config", str(config_file), "--pruned", pruned_dir, "--blocks", blocks_file,
           "--workdir", str(work), "--out", str(out)]  # fmt: skip

    def on_line(line: str) -> None:
        if line.startswith('{"progress"'):
            if progress is not None:
                progress(json.loads(line)["progress"])
        else:
            sys.stdout.write(line)

    what = f"alignment under torchrun ({align.nproc_per_node} processes)"
    try:  # torchrun and its workers run in a process group of their own, killed on every exit path
        code = run_group(cmd, on_line, _deadline_s(align), what)
    except DeadlineExceeded as err:
        raise DeadlineExceeded(f"{err} Its checkpoint in {work} is kept: {_DEADLINE_FIX}") from None
    if code:
        raise LoramError(
            f"{what} exited with code {code}; the workers' errors are in the log above. Its checkpoint "
            f"in {work} is kept."
        )
    result_file = out / "train_result.json"
    result = json.loads(result_file.read_text())
    result_file.unlink()  # not part of the model directory
    return result


def quantize(quantize: QuantizeConfig, ctx: RunContext, aligned_dir: str) -> str | None:
    """The 4-bit variant of the aligned (or pruned) model, or None when the section is disabled."""
    if not quantize.enabled:
        return None
    device = compute_device(ctx)
    key = {"quantize": quantize.model_dump(), "aligned": aligned_dir, "device": device.type}
    out = _step_dir(ctx, "quantize", key)
    if (out / "config.json").is_file():
        return str(out)
    tmp = _fresh(out.with_name(out.name + ".tmp"))
    quantize_checkpoint(aligned_dir, tmp, quantize, device=str(device))
    AutoTokenizer.from_pretrained(aligned_dir).save_pretrained(tmp)
    return str(_commit(tmp, out))


def evaluate(
    cfg: PipelineConfig,
    base_dir: str,
    pruned_dir: str,
    aligned_dir: str,
    nf4_dir: str | None,
    blocks_file: str,
) -> dict:
    """Held-out perplexity of the models this run made, once each, and the published checkpoint's size.

    The original and the pruned model always; the aligned one when alignment ran (`cfg.runs`), and
    the 4-bit variant when given (`aligned_nf4_ppl`, or `pruned_nf4_ppl` without alignment). Models
    are scored one at a time on the run's device (bf16 on a GPU unless `evaluate.dtype` says
    otherwise) on the `eval` blocks; the result records that device and the seconds each took.
    """
    device = compute_device(cfg)
    eval_file = prepare_eval(cfg, base_dir, blocks_file)
    aligned = cfg.runs("align") and aligned_dir != pruned_dir
    key = {
        "dirs": [base_dir, pruned_dir, aligned_dir if aligned else None, nf4_dir],
        "eval": eval_file,
        "evaluate": cfg.evaluate.model_dump(),
        "device": device.type,
    }
    out = _step_dir(cfg, "evaluate", key)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    heldout = load_file(eval_file)["blocks"]
    bs = cfg.evaluate.batch_size
    dtype = default_dtype(device, cfg.evaluate.dtype)
    metrics: dict = {}
    seconds: dict[str, float] = {}
    models = {"original_ppl": base_dir, "pruned_ppl": pruned_dir}
    if aligned:
        models["aligned_ppl"] = aligned_dir
    for name, path in models.items():
        t0 = time.perf_counter()
        metrics[name] = perplexity(load_model(path, dtype=dtype).to(device), heldout, bs)
        seconds[name] = round(time.perf_counter() - t0, 3)
    if nf4_dir is not None:
        name = "aligned_nf4_ppl" if aligned else "pruned_nf4_ppl"
        t0 = time.perf_counter()
        metrics[name] = perplexity(load_model(nf4_dir, device_map=str(device)), heldout, bs)
        seconds[name] = round(time.perf_counter() - t0, 3)
    if aligned:
        damage = metrics["pruned_ppl"] - metrics["original_ppl"]
        metrics["recovered"] = (
            (metrics["pruned_ppl"] - metrics["aligned_ppl"]) / damage if damage > 0 else None
        )
    metrics["heldout_tokens"] = heldout.numel()
    p = plan(load_config(base_dir), cfg.prune).to_dict()
    params = size_summary(p, aligned_dir if aligned else pruned_dir, sparse=cfg.prune.strategy in SPARSE)
    compute = {**describe(device), "eval_dtype": str(dtype).removeprefix("torch."), "eval_seconds": seconds}
    result = {"metrics": metrics, "params": params, "compute": compute}
    tmp = _fresh(out.with_name(out.name + ".tmp"))
    (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
    _commit(tmp, out)
    return result


def code_version() -> str:
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


def publish(
    cfg: PipelineConfig,
    base_dir: str,
    blocks_file: str,
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
    from dataclasses import asdict

    from loram_core.bucket import publish as publish_files
    from loram_core.bucket.inputs import provenance
    from loram_core.card import model_card
    from loram_core.stock import ship_modeling_code

    version = pin_version(cfg).publish.version
    uri = publish_uri(cfg)
    aligned = cfg.runs("align") and "aligned_ppl" in evaluation["metrics"]
    staging = _fresh(Path(cfg.workdir).expanduser() / f"publish-{cfg.publish.name}-{version}")
    try:
        model_files = [p for p in Path(aligned_dir).iterdir() if p.is_file() and p.name != "train_log.json"]
        (staging / "model").mkdir()
        for f in model_files:
            shutil.copy2(f, staging / "model" / f.name)
        shutil.copytree(Path(aligned_dir) / "masks", staging / "masks")
        if nf4_dir is not None:
            shutil.copytree(nf4_dir, staging / "model-nf4")
        # Per-layer widths: the variant ships its modeling code (auto_map), see loram_core.stock.
        variants = [staging / v for v in ("model", "model-nf4") if (staging / v).is_dir()]
        remote_code = any([ship_modeling_code(v) for v in variants])
        base_config = load_config(base_dir)
        manifest = Manifest(
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
            align={**cfg.align.model_dump(mode="json"), **_train_log(aligned_dir)}
            if aligned
            else {"enabled": False},
            quantize={**cfg.quantize.model_dump(mode="json"), "enabled": True}
            if nf4_dir
            else {"enabled": False},
            params=evaluation["params"],
            metrics=evaluation["metrics"],
            compute=evaluation.get("compute", {}),
            verification=verification,
            files=[],
            code_version=code_version(),
        )
        (staging / "README.md").write_text(model_card(manifest, uri, remote_code=remote_code))
        manifest.files = list_files(staging)
        check = cfg.publish.check_create_only
        return asdict(publish_files(staging, manifest, uri, check_create_only=check, progress=progress))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_uri(cfg: PipelineConfig) -> str:
    """Where the version goes: `publish.uri`, or `<workdir>/local-bucket` when publishing is off."""
    if cfg.publish.enabled:
        return cfg.publish.uri
    return f"file://{(Path(cfg.workdir).expanduser() / 'local-bucket').absolute()}"


def train_log(aligned_dir: str) -> dict:
    """The alignment run's loss history and throughput (empty when alignment was off)."""
    log = Path(aligned_dir) / "train_log.json"
    if not log.is_file():
        return {"losses": [], "tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0, "resumed_from": None}
    return json.loads(log.read_text())


def _train_log(aligned_dir: str) -> dict:
    """The alignment facts the manifest records (final loss, tokens, throughput); {} when it did not run."""
    data = train_log(aligned_dir)
    if not data["losses"]:
        return {}
    return {
        "final_loss": data["losses"][-1][1],
        "tokens_seen": data["tokens"],
        "tokens_per_s": round(data["tokens_per_s"], 1),
    }
