"""`corpus.mix`: several text sources interleaved into one corpus, each drawn to its share of tokens.

The LoRAM reference aligns on FineWeb and OpenWebMath interleaved with `datasets.interleave_datasets`
(probabilities 0.5 / 0.25 / 0.25 over blocks of equal length, so the weights are shares of tokens).
Here documents differ in length, so the weights are made shares of tokens directly: the next
document comes from a source drawn at random (seeded) among those still below their share, with a
chance proportional to its weight; a source leaves the draw once its tokens (counted with the base
model's tokenizer) reach its share, the document that crosses it kept whole. A source that runs out
first starts over (`stopping: all_exhausted`, the reference's oversampling) or ends the mix
(`first_exhausted`). The documents, in drawn order, are written once into a parquet file with
`text` and `source` columns, which the corpus step reads as it reads any parquet corpus; the tokens
actually drawn from each source go into the corpus record (and the manifest).

Text files of a `paths` source are read by paragraph (each paragraph one document), jsonl and
parquet record by record, datasets record by record (streamed when the source says so).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from loram_core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from loram_core.config import CorpusMix, MixSource

TOKENIZE_BATCH = 256  # documents tokenized at a time per source


def _key(i: int) -> str:
    return f"corpus.mix.sources[{i}]"


def source_texts(src: MixSource, i: int, cache_dir: str | Path) -> Iterator[str]:
    """The documents of one source, in its own order (nothing read ahead)."""
    from loram_core.hub_datasets import texts

    if src.dataset is not None:
        yield from texts(src.dataset, _key(i))
        return
    from loram_core.checks import _documents
    from loram_core.data import _format_of, resolve_patterns

    files = resolve_patterns(src.paths, cache_dir, f"{_key(i)}.paths")
    fmt = _format_of(files, src.format)
    for file in files:
        if os.path.getsize(file) > 0:
            yield from _documents(file, fmt, src.text_field, _key(i))


class _Drawn:
    """One source while the mix draws from it: documents tokenized a batch at a time, restarts counted."""

    def __init__(
        self, src: MixSource, i: int, cache_dir: str | Path, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.src, self.i, self.cache_dir, self.tokenizer = src, i, cache_dir, tokenizer
        self.docs: Iterator[str] = source_texts(src, i, cache_dir)
        self.buffer: list[tuple[str, int]] = []
        self.tokens = self.documents = 0
        self.passes = 1
        self.pass_documents = 0

    def next(self, restart: bool) -> tuple[str, int] | None:
        """The next document and its token count; None when the source is done (and not restarted)."""
        if not self.buffer:
            batch = [d for _, d in zip(range(TOKENIZE_BATCH), self.docs, strict=False)]
            if not batch:
                if self.pass_documents == 0:
                    raise ConfigError(
                        f"{_key(self.i)} ({self.src.describe()}) holds no text; point it at text, or remove it."
                    )
                if not restart:
                    return None
                self.docs, self.passes, self.pass_documents = (
                    source_texts(self.src, self.i, self.cache_dir),
                    self.passes + 1,
                    0,
                )
                return self.next(restart)
            ids = self.tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            self.buffer = [(d, len(t)) for d, t in zip(batch, ids, strict=True)][::-1]
        text, n = self.buffer.pop()
        self.tokens += n
        self.documents += 1
        self.pass_documents += 1
        return text, n


def draw(
    mix: CorpusMix, tokenizer: PreTrainedTokenizerBase, cache_dir: str | Path
) -> tuple[list[str], list[int], dict]:
    """Draw the mix's documents.

    Args:
        mix: the `corpus.mix` section.
        tokenizer: the base model's tokenizer (the budget is in its tokens, no special tokens).
        cache_dir: where bucket files and materialized datasets are cached.

    Returns:
        `(documents, source index of each, record)`; the record holds, per source, its label, normalized
        weight, target and drawn tokens, documents and passes (more than 1: it was started over).

    Raises:
        ConfigError: a source without text.
    """
    total = sum(s.weight for s in mix.sources)
    weights = [s.weight / total for s in mix.sources]
    targets = [round(mix.tokens * w) for w in weights]
    sources = [_Drawn(s, i, cache_dir, tokenizer) for i, s in enumerate(mix.sources)]
    rng = random.Random(mix.seed)
    active = [i for i, t in enumerate(targets) if t > 0]
    docs: list[str] = []
    origin: list[int] = []
    stopped_by = None
    while active:
        i = rng.choices(active, weights=[weights[j] for j in active])[0]
        got = sources[i].next(restart=mix.stopping == "all_exhausted")
        if got is None:  # first_exhausted: the first source to run out ends the mix
            stopped_by = mix.sources[i].describe()
            break
        docs.append(got[0])
        origin.append(i)
        if sources[i].tokens >= targets[i]:
            active.remove(i)
    record = {
        "tokens": mix.tokens, "seed": mix.seed, "stopping": mix.stopping, "stopped_by": stopped_by,
        "drawn_tokens": sum(s.tokens for s in sources),
        "sources": [{"source": s.src.describe(), "weight": round(w, 6), "target_tokens": t, "tokens": s.tokens,
                     "documents": s.documents, "passes": s.passes}
                    for s, w, t in zip(sources, weights, targets, strict=True)],
    }  # fmt: skip
    return docs, origin, record


def mix_identity(mix: CorpusMix, cache_dir: str | Path) -> list:
    """What the mix's documents depend on besides its settings: each source's files or dataset version."""
    from loram_core.data import files_fingerprint, resolve_patterns
    from loram_core.hub_datasets import identity

    out = []
    for i, s in enumerate(mix.sources):
        if s.dataset is not None:
            out.append(identity(s.dataset))
        else:
            out.append(files_fingerprint(resolve_patterns(s.paths, cache_dir, f"{_key(i)}.paths")))
    return out


def mixed_corpus(mix: CorpusMix, base_dir: str, cache_dir: str | Path) -> tuple[Path, dict]:
    """The mix as a parquet file of `text` and `source` columns (drawn once, then read back), and its record.

    The file lives in `<cache_dir>/mixes/`, keyed by the mix's settings, its sources' identities and
    the base model (whose tokenizer counts the tokens).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from loram_core.config import fingerprint

    key = fingerprint(
        {"mix": mix.model_dump(mode="json"), "sources": mix_identity(mix, cache_dir), "base": base_dir}
    )
    out = Path(cache_dir).expanduser() / "mixes" / f"mix-{key}.parquet"
    record_file = out.with_suffix(".json")
    if out.is_file() and record_file.is_file():
        return out, json.loads(record_file.read_text())
    docs, origin, record = draw(mix, AutoTokenizer.from_pretrained(base_dir), cache_dir)
    labels = [s.describe() for s in mix.sources]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(pa.table({"text": docs, "source": [labels[i] for i in origin]}), str(tmp))
    record_file.write_text(json.dumps(record, indent=2))
    tmp.rename(out)
    return out, record


def check_mix(mix: CorpusMix, cache_dir: str | Path) -> None:
    """The preflight's look at a mix: every source exists and its first record has text (datasets streamed).

    Raises:
        LoramError: naming the source, what is wrong and the fix.
    """
    for i, s in enumerate(mix.sources):
        probe = (
            s.model_copy(update={"dataset": s.dataset.model_copy(update={"streaming": True})})
            if s.dataset
            else s
        )
        if next(source_texts(probe, i, cache_dir), None) is None:
            raise ConfigError(f"{_key(i)} ({s.describe()}) holds no text; point it at text, or remove it.")
