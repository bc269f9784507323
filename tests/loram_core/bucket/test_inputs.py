"""Inputs from a bucket: an s3:// base fetched once into the work dir, with its provenance; an s3:// corpus."""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest

from loram_core import steps
from loram_core.bucket import s3 as s3_module
from loram_core.bucket.inputs import provenance
from loram_core.config import CorpusConfig, load_config
from loram_core.data import resolve_files
from loram_core.errors import LoramError
from tests.s3_server import BUCKET

REPO = Path(__file__).resolve().parents[3]


def test_an_s3_base_is_fetched_once_and_its_hashes_recorded(
    s3: str, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = boto3.client("s3")
    for f in tiny_checkpoint.iterdir():
        client.upload_file(str(f), BUCKET, f"bases/tiny/{f.name}")
    cfg = load_config(
        REPO / "configs" / "demo.yaml", [f"base.source={s3}/bases/tiny", f"workdir={tmp_path / 'w'}"]
    )
    local = steps.base_path(cfg)
    assert local is not None and local.is_relative_to(tmp_path / "w")
    for f in tiny_checkpoint.iterdir():
        assert (local / f.name).read_bytes() == f.read_bytes()
    record = provenance(local)
    assert record["fetched_from"] == f"{s3}/bases/tiny"
    assert (
        record["files_sha256"]["model.safetensors"]
        == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    )
    fetched = []
    monkeypatch.setattr(s3_module.S3Store, "read_range", lambda *a: fetched.append(a) or b"")
    assert steps.base_path(cfg) == local and not fetched  # the same listing: no download again
    empty = load_config(
        REPO / "configs" / "demo.yaml", [f"base.source={s3}/bases/none", f"workdir={tmp_path / 'w'}"]
    )
    with pytest.raises(LoramError, match=r"base.source='s3://loram-test/bases/none': no objects under it"):
        steps.base_path(empty)


def test_an_s3_corpus_is_fetched_into_the_cache(s3: str, tmp_path: Path) -> None:
    boto3.client("s3").put_object(Bucket=BUCKET, Key="corpus/part-0.txt", Body=b"hello world\n\nmore text\n")
    files = resolve_files(CorpusConfig(paths=[f"{s3}/corpus/*.txt"]), tmp_path)
    assert len(files) == 1 and Path(files[0]).read_bytes() == b"hello world\n\nmore text\n"
