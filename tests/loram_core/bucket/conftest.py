"""Fixtures of the bucket tests (the S3 server itself is in tests/s3_server.py)."""

from __future__ import annotations

import pytest

from loram_core.bucket import s3 as s3_module

MiB = 2**20


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """5 MiB parts (S3's minimum), so a 12 MiB file goes up in 3 parts and comes down in 3 ranges."""
    monkeypatch.setattr(s3_module, "PART_SIZE", 5 * MiB)
    monkeypatch.setattr(s3_module, "SINGLE_PUT_MAX", 5 * MiB)
    monkeypatch.setattr("loram_core.bucket.download.RANGE_SIZE", 5 * MiB)
