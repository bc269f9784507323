"""Preflight checks: each bad input is refused by name, with the fix, before any compute."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from loram_core import checks
from loram_core.config import CorpusConfig, load_config
from loram_core.errors import ConfigError, LoramError
from loram_core.steps import preflight
from tests.conftest import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "far", "away"]


def write_corpus(path: Path, docs: int = 300, words: int = 40) -> Path:
    """A text corpus of `docs` paragraphs of lowercase words (the tiny tokenizer's alphabet)."""
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(docs)))
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A complete tiny checkpoint: 4 layers, safetensors weights, a character tokenizer."""
    path = tmp_path / "base"
    tiny_model(num_hidden_layers=4).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _cfg(tmp_path: Path, base: Path | str, corpus: Path | str, *more: str):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"base.source={base}", f"corpus.paths=[{corpus}]", "corpus.seq_len=64", "prune.keep_first=1",
        "prune.keep_last=1", f"workdir={tmp_path / 'work'}", f"publish.uri=file://{tmp_path / 'bucket'}", *more,
    ])  # fmt: skip


def test_a_complete_input_passes_and_creates_nothing(tmp_path: Path, base: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    preflight(_cfg(tmp_path, base, corpus))
    assert not (tmp_path / "work").exists() and not (tmp_path / "bucket").exists()


# --- the base checkpoint -------------------------------------------------------------------------


def test_truncated_safetensors_is_named(base: Path) -> None:
    weights = base / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 1000)
    with pytest.raises(LoramError, match=r"model.safetensors is truncated or corrupt: .* holds [\d,]+; copy"):
        checks.check_base(base)
    os.truncate(weights, 5)  # shorter than the 8-byte header length
    with pytest.raises(LoramError, match="too short for its header"):
        checks.check_base(base)


def test_garbage_safetensors_header_is_named(base: Path) -> None:
    (base / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"not a json header!!!")
    with pytest.raises(LoramError, match="has no valid safetensors header"):
        checks.check_base(base)


def test_config_that_is_not_json_is_named(base: Path) -> None:
    (base / "config.json").write_text("{model_type: llama")
    with pytest.raises(LoramError, match=r"config.json is not valid JSON \(.*line 1"):
        checks.check_base(base)


def test_unsupported_model_type_lists_the_families(base: Path) -> None:
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(LoramError, match="'gpt2' is not supported; supported families"):
        checks.check_base(base)


def test_sharded_checkpoint_index_and_shards_are_checked(base: Path) -> None:
    shard = "model-00001-of-00002.safetensors"
    (base / "model.safetensors").rename(base / shard)
    names = list(checks.safetensors_header(base / shard))
    index = base / checks.INDEX
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, shard)}))
    checks.check_weights(base)  # complete: passes
    weight_map = {**dict.fromkeys(names, shard), "lm_head.weight": "model-00002-of-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(LoramError, match="names shards that are not in .*: model-00002-of-00002.safetensors"):
        checks.check_weights(base)
    index.write_text(json.dumps({"weight_map": {**dict.fromkeys(names, shard), "extra.weight": shard}}))
    with pytest.raises(LoramError, match=f"{shard} lacks 1 tensors .* 'extra.weight'"):
        checks.check_weights(base)
    index.write_text("[1, 2]")
    with pytest.raises(LoramError, match="is not a safetensors index"):
        checks.check_weights(base)


def test_missing_weights_and_tokenizer(base: Path) -> None:
    (base / "model.safetensors").unlink()
    with pytest.raises(LoramError, match=r"has no \*.safetensors weights"):
        checks.check_base(base)
    for f in base.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(LoramError, match=r"no usable tokenizer .*tokenizer.save_pretrained"):
        checks.check_tokenizer(base)


# --- the corpus ----------------------------------------------------------------------------------


def _corpus(tmp_path: Path, paths: list[str], **kw) -> None:
    cfg = CorpusConfig(paths=paths, seq_len=kw.pop("seq_len", 64), **kw)
    checks.check_corpus(cfg, str(tmp_path / "cache"), tiny_tokenizer())


def test_empty_corpus_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ConfigError, match=r"matches only empty files \(.*a.txt"):
        _corpus(tmp_path, [str(tmp_path / "a.txt")])
    with pytest.raises(ConfigError, match="matches only empty files"):
        _corpus(tmp_path, [str(tmp_path / "*.txt")])  # a glob that matches only empty files
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    with pytest.raises(ConfigError, match="holds no text"):
        _corpus(tmp_path, [str(tmp_path / "blank.txt")])
    write_corpus(tmp_path / "c.txt")
    _corpus(tmp_path, [str(tmp_path / "*.txt")])  # empty files beside a real one are harmless


def test_corpus_too_small_for_a_block_or_the_heldout_split(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c.txt", docs=300, words=40)  # ~70k characters
    with pytest.raises(
        ConfigError, match=r"training split holds \d+ tokens, fewer than one block of corpus.seq_len=100000"
    ):
        _corpus(tmp_path, [str(tmp_path / "c.txt")], seq_len=100_000)
    with pytest.raises(
        ConfigError, match=r"held-out split holds \d+ tokens, fewer than one block of corpus.seq_len=5000"
    ):
        _corpus(tmp_path, [str(tmp_path / "c.txt")], seq_len=5000)  # 5% held out: ~3.5k tokens
    write_corpus(tmp_path / "one.txt", docs=1)
    with pytest.raises(ConfigError, match="heldout_fraction=0.05 holds out none of the 1 documents"):
        _corpus(tmp_path, [str(tmp_path / "one.txt")])


def test_without_a_tokenizer_bytes_bound_the_tokens(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c.txt", docs=300, words=40)
    cfg = CorpusConfig(paths=[str(tmp_path / "c.txt")], seq_len=100_000)
    with pytest.raises(ConfigError, match=r"bytes \(an upper bound on tokens\)"):
        checks.check_corpus(cfg, str(tmp_path / "cache"), None)
    checks.check_corpus(cfg.model_copy(update={"seq_len": 256}), str(tmp_path / "cache"), None)


def test_records_without_the_text_field_and_unreadable_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": " ".join(WORDS[i % 13 :] + WORDS[: i % 13]) + " " * i} for i in range(50)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ConfigError, match=r"text_field='text' is not a field of .*c.jsonl.*\['body'\]"):
        _corpus(tmp_path, [str(tmp_path / "c.jsonl")])
    _corpus(tmp_path, [str(tmp_path / "c.jsonl")], text_field="body", heldout_fraction=0.5)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    with pytest.raises(ConfigError, match=r"is not a field of .*c.parquet"):
        _corpus(tmp_path, [str(tmp_path / "c.parquet")])
    (tmp_path / "bad.jsonl").write_text('{"text": "a b"}\n{"text": \n')
    with pytest.raises(LoramError, match=r"cannot read corpus file .*bad.jsonl' as json: .*fix the file"):
        _corpus(tmp_path, [str(tmp_path / "bad.jsonl")])


# --- the bucket and the work dir -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("ftp://example.invalid/bucket", "ftp:// is known to fsspec but is not a bucket"),
        ("http://example.invalid/bucket", "http:// is known to fsspec but is not a bucket"),
        ("nosuch://bucket", "nosuch:// is not a protocol fsspec knows"),
        ("simplecache::s3://bucket", "a chained fsspec URL .* is not a bucket"),
    ],
)
def test_publish_uri_that_is_no_bucket_is_refused_without_connecting(uri: str, expected: str) -> None:
    with pytest.raises(LoramError, match=expected + r".*Use file://PATH or s3://BUCKET/PREFIX"):
        checks.check_bucket(uri)


def test_local_bucket_and_workdir_must_be_writable(tmp_path: Path) -> None:
    checks.check_bucket(f"file://{tmp_path}/not/yet/there")  # created at publish time: fine
    checks.check_bucket("s3://bucket/prefix")  # no connection is made
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        LoramError, match=r"publish.uri='file://.*/file/b' cannot be created: .*/file is a file"
    ):
        checks.check_bucket(f"file://{tmp_path}/file/b")
    with pytest.raises(LoramError, match=r"workdir='.*/file' is a file"):
        checks.check_writable(tmp_path / "file", "workdir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_bucket_directory_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(LoramError, match="is not writable"):
        checks.check_bucket(f"file://{ro}/bucket")
