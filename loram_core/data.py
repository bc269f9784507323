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


@dataclass(frozen=True)
class Document:
    """One document of the corpus: a jsonl/parquet record, or a whole text file.

    `parts` are what the held-out split decides on, each by its own content: a record is one part;
    a text file's parts are its paragraphs, its text cut at blank lines (`"\\n\\n"`, exactly where
    `datasets`' paragraph reader cuts it; blank parts dropped). A split's text of a document is its
    parts of that split joined by `"\\n\\n"` again, so a text file none of which is held out reads as
    written: its newlines kept, no EOS inside it.
    """

    parts: tuple[str, ...]

    def text(self, keep: list[bool] | None = None) -> str:
        """The document's text, or the text of the parts where `keep` is true, as written."""
        parts = self.parts if keep is None else [p for p, k in zip(self.parts, keep, strict=True) if k]
        return PARAGRAPH.join(parts)


PARAGRAPH = "\n\n"  # what separates the paragraphs of a text file (the held-out unit of a text file)


def read_documents(files: list[str], fmt: str = "auto", text_field: str = "text") -> list[Document]:
    """Read documents with `datasets`: each text file whole (its paragraphs as parts), or each record's `text_field`.

    Raises:
        ConfigError: the format cannot be told from the file names, or `text_field` is no column.
    """
    from datasets import load_dataset  # heavy import; only the steps that read text pay for it

    fmt = _format_of(files, fmt)
    if fmt == "text":  # one row per file, its text as written (universal newlines)
        ds = load_dataset("text", data_files=files, split="train", sample_by="document")
        texts = [t.split(PARAGRAPH) for t in ds["text"]]
    else:
        ds = load_dataset(fmt, data_files=files, split="train")
        if text_field not in ds.column_names:
            raise ConfigError(
                f"corpus.text_field={text_field!r} is not a column of {files[0]!r}; columns are {ds.column_names}."
            )
        texts = [[t] for t in ds[text_field] if t is not None]
    docs = [Document(tuple(p for p in parts if p.strip())) for parts in texts]
    return [d for d in docs if d.parts]


def parts_of(docs: list[Document]) -> list[str]:
    """Every document's parts, in order: what `split_flags` decides on."""
    return [p for d in docs for p in d.parts]


def split_texts(docs: list[Document], flags: list[bool]) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): each document's parts of that split, joined as written.

    `flags` holds one held-out flag per part (`parts_of(docs)` order). A document with no part in a
    split gives no text there, so EOS (added between texts when packed) stays between real documents.
    """
    train, held = [], []
    i = 0
    for d in docs:
        f = flags[i : i + len(d.parts)]
        i += len(d.parts)
        if not all(f):
            train.append(d.text([not x for x in f]))
        if any(f):
            held.append(d.text(f))
    return train, held


def files_fingerprint(files: list[str]) -> str:
    """sha256 over the corpus files' bytes, in order: what the manifest records as the corpus."""
    import fsspec

    h = hashlib.sha256()
    for f in files:
        with fsspec.open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each text (no special tokens), each text tokenized whole, 1000 texts a batch.

    A text file is one text, tokenized as one string, as the references tokenize WikiText's test
    split (`"\\n\\n".join(...)`), so its paragraph breaks are tokens of the stream, not EOS.
    """
    rows: list[list[int]] = []
    for batch_start in range(0, len(texts), 1000):
        batch = texts[batch_start : batch_start + 1000]
        # verbose=False: a whole file is longer than the model's context, which is expected here.
        rows += tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
    return rows


def pack_ids(rows: list[list[int]], eos: int, seq_len: int, key: str = "corpus.seq_len") -> torch.Tensor:
    """Join token rows (one per document) with `eos` between them and cut the stream into blocks.

    Returns:
        int32 tensor `[num_blocks, seq_len]`: consecutive windows of the stream; the tail shorter
        than a block is dropped.
    """
    ids: list[int] = []
    for i, row in enumerate(rows):
        if i:
            ids.append(eos)
        ids += row
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigError(f"the corpus holds {len(ids)} tokens, fewer than one block of {key}={seq_len}.")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int32).view(n, seq_len)


def pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Tokenize texts (one per document), join them with EOS between them and cut the stream into blocks.

    Returns:
        int32 tensor `[num_blocks, seq_len]`; the tail shorter than a block is dropped.
    """
    return pack_ids(tokenize(texts, tokenizer), tokenizer.eos_token_id, seq_len)


def is_heldout(doc: str, fraction: float) -> bool:
    """Whether a part (paragraph or record) belongs to the held-out split: decided by its content hash alone.

    The rule depends on nothing but the text, so the demo base's pretraining, alignment and every
    evaluation agree on which text was never trained on, whatever their block length or seed.
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
        token_counts: tokens of each document (part).
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
    """Packed corpus, split by part (paragraph or record) into a training and a held-out part."""

    train: torch.Tensor  # int32 [n_train, seq_len], in a seeded shuffled order
    heldout: torch.Tensor  # int32 [n_heldout, seq_len], consecutive windows of the held-out stream

    @property
    def train_tokens(self) -> int:
        """Tokens in the training split."""
        return self.train.numel()


def make_blocks(
    docs: list[Document],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    heldout_fraction: float,
    seed: int = 0,
    max_tokens: int | None = None,
    eval_blocks: int | None = None,
    heldout_unit: Literal["documents", "tokens"] = "documents",
) -> Blocks:
    """Split the documents' parts into train/held-out, pack each split, shuffle the training blocks, apply the budget.

    Each split is a token stream: per document, its parts of that split joined as written
    (`split_texts`), tokenized whole, with EOS between documents. `heldout_unit` says what
    `heldout_fraction` is a share of: parts (each held out by its content hash alone:
    `is_heldout`) or `tokens` (`heldout_by_tokens`).

    Raises:
        ConfigError: nothing is held out, or a split holds less than one block.
    """
    flags = split_flags(parts_of(docs), heldout_fraction, heldout_unit, tokenizer)
    if not any(flags):
        raise ConfigError(
            f"corpus.heldout_fraction={heldout_fraction} holds out none of the {len(flags)} paragraphs and "
            "records of the corpus; raise it."
        )
    train_texts, held_texts = split_texts(docs, flags)
    eos = tokenizer.eos_token_id
    train = pack_ids(tokenize(train_texts, tokenizer), eos, seq_len)
    train = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))]
    if max_tokens is not None:
        train = train[: max(1, max_tokens // seq_len)]
    heldout = pack_ids(tokenize(held_texts, tokenizer), eos, seq_len)
    if eval_blocks is not None:
        heldout = heldout[:eval_blocks]
    return Blocks(train=train.contiguous(), heldout=heldout.contiguous())


def split_flags(
    parts: list[str],
    fraction: float,
    unit: Literal["documents", "tokens"],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[bool]:
    """Which parts (paragraphs, records) are held out: by content hash alone, or up to a share of tokens.

    The one rule of the whole pipeline: the demo base's pretraining, the corpus blocks (alignment,
    calibration, evaluation) and verification's task all split with it. `tokens` counts each part's
    tokens (`tokenizer` needed).
    """
    if unit == "tokens":
        if tokenizer is None:
            raise ValueError("the tokens rule counts tokens: pass the tokenizer")
        return heldout_by_tokens(parts, [len(r) for r in tokenize(parts, tokenizer)], fraction)
    return [is_heldout(p, fraction) for p in parts]


def save_blocks(path: str | Path, blocks: Blocks, metadata: dict[str, str]) -> None:
    """Write both splits (int32 `[n, seq_len]` each) to one safetensors file with `metadata`."""
    save_file({"train": blocks.train, "heldout": blocks.heldout}, str(path), metadata=metadata)


def load_blocks(path: str | Path) -> Blocks:
    """Read the splits `save_blocks` wrote."""
    t = load_file(str(path))
    return Blocks(train=t["train"], heldout=t["heldout"])
