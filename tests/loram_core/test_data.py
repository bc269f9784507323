import json
from pathlib import Path

import pytest
import torch

from loram_core.config import CorpusConfig
from loram_core.data import Document, is_heldout, make_blocks, pack, read_documents, resolve_files
from loram_core.errors import ConfigError
from tests.conftest import tiny_tokenizer


@pytest.fixture
def char_tokenizer():
    return tiny_tokenizer()


def test_text_jsonl_and_parquet_read_the_same_paragraphs(tmp_path: Path) -> None:
    """A text file is one document whose parts are its paragraphs and whose text is the file as written;
    a jsonl/parquet record is a document of one part (HEAD read a text file as 3 separate documents)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first doc line one\nline two", "second doc", "third doc"]
    text = "\n\n".join(docs) + "\n"
    (tmp_path / "c.txt").write_text(text)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    (txt,) = read_documents([str(tmp_path / "c.txt")])
    assert txt.text() == text and txt.parts == (docs[0], docs[1], docs[2] + "\n")
    assert (
        txt.text([True, False, True]) == docs[0] + "\n\n" + docs[2] + "\n"
    )  # kept paragraphs, joined as written
    assert read_documents([str(tmp_path / "c.jsonl")], text_field="body") == [Document((d,)) for d in docs]
    assert read_documents([str(tmp_path / "c.parquet")], text_field="body") == [Document((d,)) for d in docs]
    two = read_documents([str(tmp_path / "c.txt"), str(tmp_path / "c.txt")])
    assert [d.text() for d in two] == [text, text]  # separate files: separate documents (EOS between them)
    with pytest.raises(ConfigError, match="corpus.text_field='text' is not a column"):
        read_documents([str(tmp_path / "c.jsonl")])


def test_globs_file_uris_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("y")
    cfg = CorpusConfig(paths=[f"file://{tmp_path}/*.txt"])
    assert resolve_files(cfg, tmp_path) == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    with pytest.raises(ConfigError, match="matches no file"):
        resolve_files(CorpusConfig(paths=[str(tmp_path / "none*.txt")]), tmp_path)


def test_remote_files_are_fetched_once_into_the_cache(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/corpus/part-0.txt", b"hello world\n\nmore text\n")
    files = resolve_files(CorpusConfig(paths=["memory://bucket/corpus/*.txt"]), tmp_path)
    assert len(files) == 1 and Path(files[0]).read_bytes() == b"hello world\n\nmore text\n"
    assert resolve_files(CorpusConfig(paths=["memory://bucket/corpus/*.txt"]), tmp_path) == files


def test_packing_joins_documents_with_eos_and_drops_the_tail(char_tokenizer) -> None:
    blocks = pack(["abc", "de"], char_tokenizer, seq_len=3)
    assert blocks.dtype == torch.int32 and blocks.tolist() == [[1, 2, 3], [0, 4, 5]]  # tail </s> dropped


def test_heldout_split_depends_on_content_only(char_tokenizer) -> None:
    import random

    rng = random.Random(0)
    docs = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(40)) for _ in range(200)]
    held = {d for d in docs if is_heldout(d, 0.1)}
    assert 5 < len(held) < 40
    records = [Document((d,)) for d in docs]
    a = make_blocks(records, char_tokenizer, 16, 0.1, seed=0)
    b = make_blocks(list(reversed(records)), char_tokenizer, 16, 0.1, seed=1, max_tokens=160)
    assert a.heldout.shape[1] == 16 and b.train.shape == (10, 16)
    train_text = {tuple(r) for r in a.train.tolist()}
    assert not train_text & {tuple(r) for r in a.heldout.tolist()}
