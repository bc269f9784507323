"""Calibration and evaluation text: the blocks pruning calibrates on and every model is scored on.

Both come from the corpus by default (calibration: its training blocks, the same ones alignment
trains on; evaluation: its held-out split, never trained on) or from files of their own. Each
result carries what the manifest records about it: where it came from, its shape, and sha256
hashes of the exact token blocks and of their text, so a reader can tell two runs' data apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from loram_core.config import PipelineConfig
from loram_core.data import (
    Document,
    files_fingerprint,
    load_blocks,
    pack_ids,
    parts_of,
    read_documents,
    resolve_files,
    resolve_patterns,
    split_flags,
    split_texts,
    tokenize,
)
from loram_core.errors import ConfigError
from loram_core.evaluate import protocol


@dataclass
class TextBlocks:
    """Token blocks of one purpose (calibration or evaluation) and what the manifest says of them."""

    blocks: torch.Tensor  # int32 [n, seq_len]
    info: dict


def heldout_rule(cfg: PipelineConfig) -> tuple[float, Literal["documents", "tokens"]]:
    """What the corpus holds out: `eval.heldout_fraction` of its tokens, else `corpus.heldout_fraction` of its parts.

    Parts are paragraphs of text files and records of jsonl/parquet (`data.Document`).
    """
    if cfg.eval.heldout_fraction is not None:
        return cfg.eval.heldout_fraction, "tokens"
    return cfg.corpus.heldout_fraction, "documents"


def block_hashes(blocks: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """sha256 of the blocks as little-endian int32 bytes, and of their decoded text (UTF-8, blocks in order)."""
    tokens = hashlib.sha256(blocks.to(torch.int32).contiguous().numpy().astype("<i4").tobytes()).hexdigest()
    text = hashlib.sha256()
    for row in blocks.tolist():
        text.update(tokenizer.decode(row).encode())
    return {"tokens_sha256": tokens, "text_sha256": text.hexdigest()}


@dataclass
class CorpusSplit:
    """The corpus as read, and which of its parts (paragraphs, records) are held out."""

    files: list[str]
    docs: list[Document]
    flags: list[bool]  # one per part, in `parts_of(docs)` order: held out?

    def texts(self, heldout: bool) -> list[str]:
        """Each document's text of one split, joined as written (`data.split_texts`)."""
        return split_texts(self.docs, self.flags)[1 if heldout else 0]

    def parts(self, heldout: bool) -> list[str]:
        """The parts of one split, in order."""
        return [p for p, h in zip(parts_of(self.docs), self.flags, strict=True) if h == heldout]


def corpus_split(cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase) -> CorpusSplit:
    """Read the corpus and split it by `heldout_rule`: the split every step uses (one rule, one place).

    `prepare_corpus` packs it, calibration and evaluation of other lengths re-pack it, verification
    builds its task sets from it, and the demo base pretrains on its training side.
    """
    files = resolve_files(cfg.corpus, cfg.base.cache_dir)
    docs = read_documents(files, cfg.corpus.format, cfg.corpus.text_field)
    fraction, unit = heldout_rule(cfg)
    return CorpusSplit(files, docs, split_flags(parts_of(docs), fraction, unit, tokenizer))


def _corpus_rows(
    cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, heldout: bool
) -> tuple[list[list[int]], list[str]]:
    """Token rows (one per document) of the corpus's training (or held-out) split, as `prepare_corpus` splits it."""
    split = corpus_split(cfg, tokenizer)
    return tokenize(split.texts(heldout), tokenizer), split.files


def _own_files(
    patterns: list[str],
    fmt: str,
    text_field: str,
    cfg: PipelineConfig,
    tokenizer: PreTrainedTokenizerBase,
    key: str,
) -> tuple[list[list[int]], list[str]]:
    files = resolve_patterns(patterns, cfg.base.cache_dir, key)
    return tokenize([d.text() for d in read_documents(files, fmt, text_field)], tokenizer), files


def _shuffled(blocks: torch.Tensor, seed: int | None) -> torch.Tensor:
    if seed is None:
        return blocks
    return blocks[torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))]


def _describe(source: str | list[str], files: list[str], blocks: torch.Tensor, tokenizer) -> dict:
    return {
        "source": source if source == "corpus" else [Path(f).name for f in files],
        "files_sha256": files_fingerprint(files),
        "blocks": blocks.shape[0],
        "seq_len": blocks.shape[1],
        "tokens": blocks.numel(),
        **block_hashes(blocks, tokenizer),
    }


def calibration_blocks(
    cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, corpus_blocks: str
) -> TextBlocks:
    """The first `calibration.samples` blocks of `calibration.seq_len` tokens of the calibration source.

    With the defaults (source `corpus`, the corpus's block length, no seed of its own) these are the
    first blocks of the corpus's training split in the order alignment sees them: what pruning
    always calibrated on. Another length or seed packs the training documents anew.

    Args:
        cfg: the pipeline config (its `calibration` and `corpus` sections).
        tokenizer: the base model's tokenizer.
        corpus_blocks: the corpus's blocks file (`steps.prepare_corpus`).

    Raises:
        ConfigError: the source holds fewer than `samples` blocks, or a file is missing or unreadable.
    """
    c = cfg.calibration
    seq_len = c.seq_len or cfg.corpus.seq_len
    if c.source == "corpus" and seq_len == cfg.corpus.seq_len and c.seed is None:
        pool = load_blocks(corpus_blocks).train
        files = resolve_files(cfg.corpus, cfg.base.cache_dir)
    else:
        if c.source == "corpus":
            rows, files = _corpus_rows(cfg, tokenizer, heldout=False)
            seed = cfg.corpus.seed if c.seed is None else c.seed
        else:
            rows, files = _own_files(c.source, c.format, c.text_field, cfg, tokenizer, "calibration.source")
            seed = c.seed
        pool = _shuffled(pack_ids(rows, tokenizer.eos_token_id, seq_len, "calibration.seq_len"), seed)
    if pool.shape[0] < c.samples:
        budget = " (its training split is cut to corpus.max_tokens)" if c.source == "corpus" else ""
        raise ConfigError(
            f"calibration.samples={c.samples} blocks of {seq_len} tokens asked, but calibration.source="
            f"{c.source!r} holds {pool.shape[0]}{budget}; lower calibration.samples or calibration.seq_len, "
            "or give more text."
        )
    blocks = pool[: c.samples].contiguous()
    info = {**_describe(c.source, files, blocks, tokenizer), "seed": c.seed}
    return TextBlocks(blocks, info)


def eval_blocks(cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, corpus_blocks: str) -> TextBlocks:
    """The held-out stream every model is scored on: `eval.blocks` windows of `eval.seq_len` tokens.

    From the corpus: its held-out split (what `heldout_rule` holds out, never trained on), in
    document order, each text file's held-out paragraphs joined as written; from files: their text
    from the start, each file whole. EOS only between documents. The rows are consecutive windows
    of one stream (`evaluate.perplexity` scores them by the windowed protocol; `info["protocol"]`
    says how many windows and tokens). With the defaults these are exactly the corpus's held-out blocks.

    Raises:
        ConfigError: a file is missing or unreadable, or the text is shorter than one block.
    """
    e = cfg.eval
    seq_len = e.seq_len or cfg.corpus.seq_len
    n = e.blocks or cfg.corpus.eval_blocks
    if e.source == "corpus" and seq_len == cfg.corpus.seq_len and n <= cfg.corpus.eval_blocks:
        blocks = load_blocks(corpus_blocks).heldout[:n]
        files = resolve_files(cfg.corpus, cfg.base.cache_dir)
    else:
        if e.source == "corpus":
            rows, files = _corpus_rows(cfg, tokenizer, heldout=True)
        else:
            rows, files = _own_files(e.source, e.format, e.text_field, cfg, tokenizer, "eval.source")
        blocks = pack_ids(rows, tokenizer.eos_token_id, seq_len, "eval.seq_len")[:n]
    blocks = blocks.contiguous()
    info = _describe(e.source, files, blocks, tokenizer)
    info["protocol"] = protocol(blocks.numel(), seq_len, e.stride)
    if e.source == "corpus":
        fraction, unit = heldout_rule(cfg)
        info["heldout"] = {"fraction": fraction, "of": unit}
    return TextBlocks(blocks, info)
