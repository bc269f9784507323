"""Kept for the code that imports it: the bucket lives in `loram_core.bucket`."""

from loram_core.bucket import bucket_fs, publish_version, resolve_version, verify_version

__all__ = ["bucket_fs", "publish_version", "resolve_version", "verify_version"]
