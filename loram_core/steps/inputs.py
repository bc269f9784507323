"""The data steps: the original checkpoint, the packed corpus, the calibration and evaluation blocks.

Each writes into a directory of the work dir keyed by the hash of its inputs and settings and
returns a path, so a re-run (or another run sharing the work dir) reads the result back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loram_core.config import PipelineConfig
from loram_core.steps._common import Progress, commit, step_dir, tmp_for

if TYPE_CHECKING:
    from loram_core.sources import TextBlocks


def base_path(cfg: PipelineConfig, weights: bool = True) -> Path | None:
    """The base checkpoint directory (None for the demo, built on demand), as `base.source` names it.

    An `s3://` source is fetched into the work dir first (once; verified against its ETags); a hub id
    (`ORG/NAME[@REV]`, see `loram_core.hub`) is the snapshot of its commit in the hub cache, with
    only its config, tokenizer and card when `weights` is False (the preflight's cheap look).
    """
    from loram_core.bucket.inputs import fetch_tree, is_remote
    from loram_core.hub import parse_hub_id, snapshot

    source = cfg.base.source
    if source == "demo":
        return None
    if is_remote(source):
        return fetch_tree(source, cfg.workdir)
    hub = parse_hub_id(source)
    if hub is not None:
        return snapshot(hub, weights=weights)
    return Path(source).expanduser()


def prepare_base(cfg: PipelineConfig, progress: Progress | None = None) -> str:
    """The original model's checkpoint directory: the given one (a hub id downloaded), or the demo model."""
    from loram_core.checks import check_weights
    from loram_core.demo import build_demo_base
    from loram_core.models import load_config
    from loram_core.sources import heldout_rule

    path = base_path(cfg)
    if path is None:
        fraction, unit = heldout_rule(cfg)  # the base never trains on what evaluation scores
        corpus = cfg.corpus.model_copy(update={"heldout_fraction": fraction})
        return str(build_demo_base(cfg.base, corpus, progress, heldout_unit=unit))
    load_config(path)
    check_weights(path)  # headers only; a hub download was not there yet when the preflight ran
    return str(path)


def base_files_sha256(base_dir: str) -> dict[str, str]:
    """sha256 of every file of the base checkpoint (relative POSIX names; hub-cache links followed)."""
    from loram_core.hub import is_snapshot, used_files
    from loram_core.manifest import sha256_file

    root = Path(base_dir)
    if is_snapshot(root):  # a hub snapshot: the files a run reads, not whatever else the cache holds
        return {name: sha256_file(root / name) for name in used_files(root)}
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def base_fingerprint(base_dir: str, hashes: dict[str, str] | None = None) -> str:
    """sha256 over the base checkpoint's config and weight files (names and hashes).

    Args:
        base_dir: the checkpoint directory.
        hashes: `base_files_sha256(base_dir)` when already computed (a large base is read once).
    """
    from loram_core.config import fingerprint

    hashes = base_files_sha256(base_dir) if hashes is None else hashes
    return fingerprint(
        [
            (n, h)
            for n, h in sorted(hashes.items())
            if "/" not in n and Path(n).suffix in (".json", ".safetensors")
        ]
    )


def prepare_corpus(cfg: PipelineConfig, base_dir: str) -> str:
    """Tokenize and pack the corpus with the base model's tokenizer; returns the blocks file."""
    from transformers import AutoTokenizer

    from loram_core.data import (
        files_fingerprint,
        make_blocks,
        parts_of,
        read_documents,
        resolve_files,
        save_blocks,
    )
    from loram_core.sources import heldout_rule

    c = cfg.corpus
    fmt, field, mix = c.format, c.text_field, None
    if c.mix is not None:  # the drawn documents, one parquet file (loram_core.corpus_mix)
        from loram_core.corpus_mix import mixed_corpus

        mix_file, mix = mixed_corpus(c.mix, base_dir, cfg.base.cache_dir)
        files, fmt, field = [str(mix_file)], "parquet", "text"
    else:
        files = resolve_files(c, cfg.base.cache_dir)
    corpus_fp = files_fingerprint(files)
    fraction, unit = heldout_rule(cfg)
    key = {"corpus": cfg.corpus.model_dump(), "files": corpus_fp, "base": base_dir}
    if unit == "tokens":  # the documents rule keeps the keys (and work dirs) of earlier runs
        key["heldout"] = [fraction, unit]
    out = step_dir(cfg, "corpus", key)
    blocks_file = out / "blocks.safetensors"
    if blocks_file.is_file():
        return str(blocks_file)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    docs = read_documents(files, fmt, field)
    blocks = make_blocks(docs, tokenizer, c.seq_len, fraction, c.seed, c.max_tokens, c.eval_blocks, unit)
    tmp = tmp_for(out)
    save_blocks(tmp / "blocks.safetensors", blocks, {"fingerprint": corpus_fp})
    info = {
        "fingerprint": corpus_fp,
        "files": files,
        "documents": len(docs),
        "parts": len(parts_of(docs)),  # paragraphs of text files, records: what the held-out rule splits
        "seq_len": c.seq_len,
        "train_tokens": blocks.train_tokens,
        "heldout_tokens": blocks.heldout.numel(),
        **({"mix": mix} if mix is not None else {}),  # the tokens drawn from each source
    }
    (tmp / "corpus.json").write_text(json.dumps(info, indent=2))
    return str(commit(tmp, out) / "blocks.safetensors")


def corpus_info(blocks_file: str | None) -> dict:
    """What `prepare_corpus` recorded about the corpus (fingerprint, files, documents, parts, token
    counts); `{"used": False}` for a run that read no corpus (`PipelineConfig.reads_corpus`)."""
    if blocks_file is None:
        return {"used": False}
    return json.loads((Path(blocks_file).parent / "corpus.json").read_text())


def _text_blocks(
    cfg: PipelineConfig, name: str, make: Callable[..., TextBlocks], base_dir: str, blocks_file: str | None
) -> str:
    """Cache the blocks `make(cfg, tokenizer, blocks_file)` returns as `<name>.safetensors` + `<name>.json`.

    `blocks_file` is None when the run reads no corpus: then the section has files of its own.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from loram_core.data import files_fingerprint, resolve_patterns

    section = getattr(cfg, name)
    key = {name: section.model_dump(), "corpus": blocks_file, "base": base_dir}
    if section.source != "corpus":
        files = resolve_patterns(section.source, cfg.base.cache_dir, f"{name}.source")
        key["files"] = files_fingerprint(files)
    if section.source == "corpus" or name == "calibration":  # corpus-relative defaults (seq_len, blocks)
        key["corpus_section"] = cfg.corpus.model_dump()
    out = step_dir(cfg, name, key)
    if (out / f"{name}.json").is_file():
        return str(out / f"{name}.safetensors")
    result = make(cfg, AutoTokenizer.from_pretrained(base_dir), blocks_file)
    tmp = tmp_for(out)
    save_file({"blocks": result.blocks}, str(tmp / f"{name}.safetensors"))
    (tmp / f"{name}.json").write_text(json.dumps(result.info, indent=2))
    return str(commit(tmp, out) / f"{name}.safetensors")


def prepare_calibration(cfg: PipelineConfig, base_dir: str, blocks_file: str | None) -> str:
    """The calibration blocks (`calibration` section) as a safetensors file; cached like every step."""
    from loram_core.sources import calibration_blocks

    return _text_blocks(cfg, "calibration", calibration_blocks, base_dir, blocks_file)


def prepare_eval(cfg: PipelineConfig, base_dir: str, blocks_file: str | None) -> str:
    """The held-out blocks every model is scored on (`eval` section) as a safetensors file."""
    from loram_core.sources import eval_blocks

    return _text_blocks(cfg, "eval", eval_blocks, base_dir, blocks_file)


def text_blocks_info(blocks_file: str) -> dict:
    """What `prepare_calibration` / `prepare_eval` recorded about their blocks (source, shape, sha256)."""
    path = Path(blocks_file)
    return json.loads(path.with_suffix(".json").read_text())
