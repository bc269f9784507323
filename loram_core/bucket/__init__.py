"""The bucket: publishing immutable versions to, and pulling verified copies from, file:// or S3.

publish(staging, manifest, uri) -> Publication    files, then manifest.json create-only, then LATEST
pull(uri, dest, only=...) -> Manifest              ranged, ETag-pinned, sha256-verified, staged, cached
resolve_version(uri), verify_version(uri)          a version (or a name's LATEST) checked in place

What a bucket hands a consumer (manifest, LATEST, listings) is parsed by `untrusted` alone.
"""

from loram_core.bucket.download import pull
from loram_core.bucket.store import bucket_fs, open_store
from loram_core.bucket.upload import Publication, move_latest, probe_create_only, publish, publish_version
from loram_core.bucket.versions import resolve_version, verify_version

__all__ = [
    "Publication",
    "bucket_fs",
    "move_latest",
    "open_store",
    "probe_create_only",
    "publish",
    "publish_version",
    "pull",
    "resolve_version",
    "verify_version",
]
