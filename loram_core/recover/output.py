"""Where `recover` and `merge` write: never over an existing folder unless asked, never half-written."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loram_core.errors import LoramError


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing, non-empty `out` unless `force` (an empty folder is fine).

    Raises:
        LoramError: naming `--out` and `--force`.
    """
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not force:
        what = "a folder with files" if out.is_dir() else "a file"
        raise LoramError(
            f"--out {str(out)!r} exists ({what}); nothing was written. Pass --force to replace it, or choose "
            "another --out."
        )


@contextmanager
def replacing(out: Path, force: bool) -> Iterator[Path]:
    """A fresh folder beside `out` to write into, renamed to `out` when the block succeeds.

    `out` (with `force`) is replaced only then, so a refusal or a failure midway leaves it as it was.

    Raises:
        LoramError: `out` exists and `force` is False (before anything is written).
    """
    out = Path(out)
    check_out(out, force)
    tmp = out.with_name(f".{out.name}.loram-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.is_dir():  # the block wrote nothing (refused): nothing to put in place
            return
        if out.is_dir() and not out.is_symlink():
            old = out.with_name(f".{out.name}.loram-old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists() or out.is_symlink():
                out.unlink()
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
