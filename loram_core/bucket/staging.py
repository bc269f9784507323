"""Where a pull writes before DEST holds it, and how it gets there without DEST ever half-made.

```
<parent>/.<DEST>.loram-pull/     the pull's own folder, named after DEST (never after the manifest);
                                 locked while a pull runs; kept after a failure, so the next resumes
    tree/                        exactly what DEST will hold: the version's files and manifest.json
    scratch/                     our temporary files, named by validated sha256 (.part, .etag,
                                 .ranges, .cache): no name of a version's file can meet them
```

The finished tree is swapped with DEST in one `renameat2(RENAME_EXCHANGE)` (Linux), so DEST is at
every instant the old pull or the new one; where the filesystem cannot exchange, DEST is moved to
`.<DEST>.loram-old-<random>` and the tree renamed in its place, and a pull killed between those two
renames is repaired by the next pull into DEST (the old DEST is put back before anything else). After
the swap DEST is checked against the manifest (the files and their sizes, nothing else); if it does
not match, the old DEST is put back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from loram_core.errors import IntegrityError, LoramError
from loram_core.manifest import short

AREA_TAG = "loram-pull"
OLD_TAG = "loram-old-"
_LEGACY_OLD = r"\.old-[0-9a-f]{8}"  # what pulls before this one moved an earlier DEST to
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def beside(dest: Path, tag: str) -> Path:
    """`.<DEST name>.<tag>` in DEST's folder (a digest of the name when that would be too long)."""
    name = f".{dest.name}.{tag}"
    if len(name.encode()) > 255:
        name = f".loram-{hashlib.sha256(dest.name.encode()).hexdigest()[:16]}.{tag}"
    return dest.with_name(name)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def check_tree(folder: Path, expected: dict[str, int]) -> list[str]:
    """What makes `folder` differ from `expected` (relative path -> size): missing, extra, resized
    files, and anything that is not a plain file or folder. Empty when it matches."""
    problems, seen = [], set()
    for dirpath, dirs, files in os.walk(folder):
        for d in dirs:
            if os.path.islink(os.path.join(dirpath, d)):
                problems.append(f"{short(os.path.relpath(os.path.join(dirpath, d), folder))} is a link")
        for f in files:
            path = os.path.join(dirpath, f)
            rel = Path(os.path.relpath(path, folder)).as_posix()
            st = os.lstat(path)
            if rel not in expected:
                problems.append(f"{short(rel)} is not in the manifest")
            elif not os.path.isfile(path) or os.path.islink(path):
                problems.append(f"{short(rel)} is not a plain file")
            elif st.st_size != expected[rel]:
                problems.append(f"{short(rel)} has {st.st_size} bytes, the manifest says {expected[rel]}")
            seen.add(rel)
    problems += [f"{short(rel)} is missing" for rel in expected if rel not in seen]
    return problems


class Area:
    """The staging folder of pulls into one DEST; `with Area(dest) as area:` holds its lock.

    Entering repairs what a killed pull left beside DEST and creates `tree/` and `scratch/`.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.root = beside(dest, AREA_TAG)
        self.tree = self.root / "tree"
        self.scratch = self.root / "scratch"
        self._fd: int | None = None

    def __enter__(self) -> Area:
        self._fd = self._lock()
        try:
            restore_dest(self.dest)
            self.tree.mkdir(exist_ok=True)
            self.scratch.mkdir(exist_ok=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def _lock(self) -> int:
        """Lock the area (flock on the folder itself); a second pull into DEST is refused, not queued."""
        for _ in range(5):
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:  # removed by a pull finishing just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LoramError(
                    f"another pull into {self.dest} is running (it holds {self.root}); wait for it to end."
                ) from None
            with contextlib.suppress(FileNotFoundError):
                st, held = os.stat(self.root), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                    return fd
            os.close(fd)  # the folder locked was removed by the pull that held it: take the new one
        raise LoramError(f"could not lock {self.root}: other pulls into {self.dest} keep replacing it.")

    def prune(self, expected: set[str]) -> None:
        """Remove from `tree/` whatever an earlier pull (perhaps of another version) left there that
        is not one of `expected` files (relative paths) or one of their folders."""
        folders = {"/".join(p.split("/")[:i]) for p in expected for i in range(1, p.count("/") + 1)}
        for dirpath, dirs, files in os.walk(self.tree):
            rel = Path(os.path.relpath(dirpath, self.tree)).as_posix()
            prefix = "" if rel == "." else rel + "/"
            for d in list(dirs):
                path = os.path.join(dirpath, d)
                if os.path.islink(path) or prefix + d not in folders:
                    dirs.remove(d)
                    if os.path.islink(path):
                        os.unlink(path)
                    else:
                        shutil.rmtree(path)
            for f in files:
                path = os.path.join(dirpath, f)
                if prefix + f not in expected or os.path.islink(path) or not os.path.isfile(path):
                    os.unlink(path)

    def swap_into_place(self, expected: dict[str, int]) -> None:
        """Make the finished tree DEST (see the module's docstring), check it, and remove the area.

        Raises:
            IntegrityError: DEST did not match `expected` after the move; the old DEST is back.
        """
        dest, tree = self.dest, self.tree
        if not dest.exists():
            tree.rename(dest)
            if problems := check_tree(dest, expected):
                dest.rename(tree)
                raise _mismatch(dest, problems)
        elif _exchange(tree, dest):  # tree now holds the old DEST
            if problems := check_tree(dest, expected):
                _exchange(tree, dest)
                raise _mismatch(dest, problems)
        else:
            old = beside(dest, OLD_TAG + uuid.uuid4().hex[:12])
            dest.rename(old)
            tree.rename(dest)
            if problems := check_tree(dest, expected):
                dest.rename(tree)
                old.rename(dest)
                raise _mismatch(dest, problems)
            shutil.rmtree(old)
        shutil.rmtree(self.root)  # scratch, and after an exchange the old DEST


def _mismatch(dest: Path, problems: list[str]) -> IntegrityError:
    return IntegrityError(
        f"after the move into {dest}, it did not match the manifest ({'; '.join(problems[:5])}); the "
        "earlier content of DEST is back in place. Pull again."
    )


def restore_dest(dest: Path) -> None:
    """Repair what a pull killed between its two renames left: put the moved-aside DEST back if
    DEST is missing, and remove every other moved-aside copy (ours, and those of earlier pulls)."""
    if not dest.parent.is_dir():
        return
    ours = beside(dest, OLD_TAG).name
    legacy = re.compile(re.escape(f".{dest.name}") + _LEGACY_OLD)
    olds = []
    for p in dest.parent.iterdir():
        if p.is_symlink() or not p.is_dir():
            continue
        if p.name.startswith(ours) or (legacy.fullmatch(p.name) and (p / "manifest.json").is_file()):
            olds.append(p)
    olds.sort(key=lambda p: (p.name.startswith(ours), p.stat().st_ctime))  # ours, newest, last
    if olds and not dest.exists() and not dest.is_symlink():
        olds.pop().rename(dest)
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)


__all__ = ["Area", "beside", "check_tree", "restore_dest"]
