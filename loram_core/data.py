"""The general corpus: read with `datasets`, tokenized, packed into fixed-length blocks, split.

Blocks are int32 tensors of shape `[num_blocks, seq_len]` stored in one safetensors file, so a
re-run (or another step) reads them back without re-tokenizing and without pickle.
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from loram_core.config import CorpusConfig
from loram_core.errors import ConfigError

_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


def demo_corpus_file(cache_dir: str | Path) -> Path:
    """Build (once) and return the demo corpus built from the Python standard library's docs."""
    out = Path(cache_dir).expanduser() / f"corpus-stdlib-py{sys.version_info[0]}{sys.version_info[1]}.txt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([sys.executable, "-m", "loram_core._stdlib_corpus", str(tmp)], check=True)
        tmp.replace(out)
    return out


def resolve_files(cfg: CorpusConfig, cache_dir: str | Path) -> list[str]:
    """The corpus files, expanded from globs; `demo` builds the stdlib corpus."""
    if cfg.paths == "demo":
        return [str(demo_corpus_file(cache_dir))]
    return resolve_patterns(cfg.paths, cache_dir, "corpus.paths")


def resolve_patterns(patterns: list[str], cache_dir: str | Path, key: str) -> list[str]:
    """Files matching local paths/globs or bucket URIs (copied to a local cache), in order.

    Raises:
        ConfigError: an entry matches no file (named with `key`, the config key that lists it).
    """
    from loram_core.hub_datasets import dataset_file, hub_dataset

    files: list[str] = []
    for pattern in patterns:
        if (
            dataset := hub_dataset(pattern)
        ) is not None:  # hf://datasets/ORG/NAME: its train split, as parquet
            files.append(str(dataset_file(dataset, cache_dir, key)))
            continue
        if "://" in pattern and not pattern.startswith("file://"):
            matches = _fetch_remote(pattern, Path(cache_dir).expanduser() / "corpus-remote")
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern.removeprefix("file://"))))
        if not matches:
            raise ConfigError(
                f"{key} entry {pattern!r} matches no file; give existing text/jsonl/parquet files."
            )
        files += matches
    return files


def _fetch_remote(pattern: str, cache: Path) -> list[str]:
    """Copy bucket files (s3://..., globs allowed) to a local cache; `datasets` then reads them locally.

    The cache is keyed by each object's URI, size and ETag (or mtime), so an unchanged object is
    downloaded once; the corpus fingerprint is still computed over the bytes.
    """
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    out = []
    for remote in sorted(paths):
        info = fs.info(remote)
        tag = f"{remote}|{info.get('size')}|{info.get('ETag', info.get('mtime', ''))}"
        local = cache / hashlib.sha256(tag.encode()).hexdigest()[:16] / Path(remote).name
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}.tmp{os.getpid()}")
            fs.get_file(remote, str(tmp))
            tmp.replace(local)
        out.append(str(local))
    return out


def _format_of(files: list[str], declared: str) -> str:
    if declared != "auto":
        return declared
    kinds = {_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(
            f"corpus.format=auto cannot tell the format of {files[:3]}; use one kind of file "
            f"({', '.join(sorted(_FORMATS))}) or set corpus.format to text, json or parquet."
        )
    return kinds.pop()


def read_documents(files: list[str], fmt: str = "auto", text_field: str = "text") -> list[str]:
    """Read documents with `datasets`: a paragraph of a text file, or one record's `text_field`."""
    from datasets import load_dataset  # heavy import; only the steps that read text pay for it

    fmt = _format_of(files, fmt)
    kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
    ds = load_dataset(fmt, data_files=files, split="train", **kwargs)
    if text_field not in ds.column_names:
        raise ConfigError(
            f"corpus.text_field={text_field!r} is not a column of {files[0]!r}; columns are {ds.column_names}."
        )
    return [t for t in ds[text_field] if t and t.strip()]


def files_fingerprint(files: list[str]) -> str:
    """sha256 over the corpus files' bytes, in order: what the manifest records as the corpus."""
    import fsspec

    h = hashlib.sha256()
    for f in files:
        with fsspec.open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenize(docs: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each document (no special tokens), tokenized in batches of 1000 documents."""
    rows: list[list[int]] = []
    for batch_start in range(0, len(docs), 1000):
        rows += tokenizer(docs[batch_start : batch_start + 1000], add_special_tokens=False)["input_ids"]
    return rows


def pack_ids(rows: list[list[int]], eos: int, seq_len: int, key: str = "corpus.seq_len") -> torch.Tensor:
    """Join token rows with `eos` after each and cut the stream into blocks.

    Returns:
        int32 tensor `[num_blocks, seq_len]`; the tail shorter than a block is dropped.
    """
    ids: list[int] = []
    for row in rows:
        ids += row
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigError(f"the corpus holds {len(ids)} tokens, fewer than one block of {key}={seq_len}.")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int32).view(n, seq_len)


def pack(docs: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Tokenize documents, join them with EOS and cut the stream into blocks.

    Returns:
        int32 tensor `[num_blocks, seq_len]`; the tail shorter than a block is dropped.
    """
    return pack_ids(tokenize(docs, tokenizer), tokenizer.eos_token_id, seq_len)


def is_heldout(doc: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: decided by its content hash alone.

    The rule depends on nothing but the text, so the demo base's pretraining, alignment and every
    evaluation agree on which documents were never trained on, whatever their block length or seed.
    """
    h = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def _hash_rank(doc: str) -> int:
    return int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "little")


def heldout_by_tokens(docs: list[str], token_counts: list[int], fraction: float) -> list[bool]:
    """Hold out whole documents, in the order of their content hash, up to `fraction` of the tokens.

    Documents are visited in the order of their content hash and each is held out if it still fits
    in the share (identical documents count as one, so they fall on the same side). The held-out
    split therefore holds at most `fraction` of the tokens, and all but a sliver of it when the
    documents are small next to the share, however unequal their lengths: one long document can no
    longer take a quarter of the corpus. If no document fits, the first in hash order is held out.
    Which documents it takes depends on the texts alone, not on the order of the files.

    Args:
        docs: the documents.
        token_counts: tokens of each document (as packed: EOS included).
        fraction: share of the tokens to hold out, 0 < fraction < 1.

    Returns:
        one flag per document: held out?
    """
    ranks = [_hash_rank(d) for d in docs]
    sizes: dict[int, int] = {}
    for rank, n in zip(ranks, token_counts, strict=True):
        sizes[rank] = sizes.get(rank, 0) + n
    budget = fraction * sum(token_counts)
    taken: set[int] = set()
    held = 0
    for rank in sorted(sizes):
        if held + sizes[rank] <= budget:
            taken.add(rank)
            held += sizes[rank]
    if not taken and sizes:
        taken.add(min(sizes))
    return [r in taken for r in ranks]


@dataclass
class Blocks:
    """Packed corpus, split by document into a training and a held-out part."""

    train: torch.Tensor  # int32 [n_train, seq_len], in a seeded shuffled order
    heldout: torch.Tensor  # int32 [n_heldout, seq_len]

    @property
    def train_tokens(self) -> int:
        """Tokens in the training split."""
        return self.train.numel()


def make_blocks(
    docs: list[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    heldout_fraction: float,
    seed: int = 0,
    max_tokens: int | None = None,
    eval_blocks: int | None = None,
    heldout_unit: Literal["documents", "tokens"] = "documents",
) -> Blocks:
    """Split documents into train/held-out, pack each, shuffle the training blocks, apply the budget.

    `heldout_unit` says what `heldout_fraction` is a share of: `documents` (each held out by its
    content hash alone: `is_heldout`) or `tokens` (`heldout_by_tokens`).
    """
    rows = tokenize(docs, tokenizer)
    held = split_flags(docs, rows, heldout_fraction, heldout_unit)
    if not any(held):
        raise ConfigError(
            f"corpus.heldout_fraction={heldout_fraction} holds out none of the {len(docs)} documents; raise it."
        )
    eos = tokenizer.eos_token_id
    train = pack_ids([r for r, h in zip(rows, held, strict=True) if not h], eos, seq_len)
    train = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))]
    if max_tokens is not None:
        train = train[: max(1, max_tokens // seq_len)]
    heldout = pack_ids([r for r, h in zip(rows, held, strict=True) if h], eos, seq_len)
    if eval_blocks is not None:
        heldout = heldout[:eval_blocks]
    return Blocks(train=train.contiguous(), heldout=heldout.contiguous())


def split_flags(
    docs: list[str], rows: list[list[int]], fraction: float, unit: Literal["documents", "tokens"]
) -> list[bool]:
    """Which documents are held out: by content hash alone (`documents`) or up to a share of tokens."""
    if unit == "tokens":
        return heldout_by_tokens(docs, [len(r) + 1 for r in rows], fraction)
    return [is_heldout(d, fraction) for d in docs]


def save_blocks(path: str | Path, blocks: Blocks, metadata: dict[str, str]) -> None:
    """Write both splits (int32 `[n, seq_len]` each) to one safetensors file with `metadata`."""
    save_file({"train": blocks.train, "heldout": blocks.heldout}, str(path), metadata=metadata)


def load_blocks(path: str | Path) -> Blocks:
    """Read the splits `save_blocks` wrote."""
    t = load_file(str(path))
    return Blocks(train=t["train"], heldout=t["heldout"])
