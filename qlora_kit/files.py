"""Outputs on disk: never half-written where a complete one is expected, one writer at a time, room checked first.

- `staged_dir(target)`: build a directory in a hidden temporary sibling and rename it into place when complete.
  A crash, a kill or a full disk leaves `target` as it was (the previous adapter, checkpoint or export), never a
  half-written one; the leftover sibling is removed by the next writer (`remove_leftovers`).
- `exclusive(directory)`: an advisory lock that one process holds while it writes into (or replaces) a run
  directory or an export. It is an `flock`, which the kernel drops when its process ends, however it ends: a
  lock left by a dead process never blocks the next run.
- `build_once(target, build)`: a cache entry built once, atomically, by one process while others wait.
- `check_free_space`, `sha256_file`, `fsync_tree`: room before a write, and proof afterwards that what was
  written is what is read back.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qlora_kit.errors import UserError

_CHUNK = 1 << 20  # hashing streams 1 MiB at a time: memory stays flat whatever the file size


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside `target`; publish it at `target` when the block succeeds.

    Publishing gives the directory a plain `mkdir`'s permissions (mkdtemp makes it private), flushes it to disk,
    and renames it into place: an existing `target` is moved aside first and removed only once the new one is
    there. On error the temporary directory goes and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if not tmp.exists():  # the block moved it elsewhere (a rejected export kept for inspection)
            return
        _plain_permissions(tmp)
        fsync_tree(tmp)
        old = target.with_name(f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}") if target.exists() else None
        if old is not None:
            target.rename(old)
        tmp.rename(target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(target: Path, build: Callable[[Path], object], announce: str = "") -> Path:
    """A cache entry: `build(dir)` fills it the first time, atomically; later calls (and processes that waited
    while another built it) reuse it. `announce` is printed when the build starts."""
    target = Path(target)
    if target.is_dir():
        return target
    with exclusive(target, "the cache", wait=True):
        if not target.is_dir():  # another process may have built it while we waited
            remove_leftovers(target)
            if announce:
                print(announce, file=sys.stderr, flush=True)
            with staged_dir(target) as tmp:
                build(tmp)
    return target


def remove_leftovers(target: Path) -> None:
    """Remove what killed writers of `target` left beside it (`.NAME.tmp-*`, `.NAME.old-*`). Call it while
    holding `exclusive(target)`: then no live writer owns them."""
    target = Path(target)
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def publish_file(tmp: Path, target: Path) -> None:
    """The single-file `staged_dir`: give a finished temporary file a plain file's permissions (mkstemp makes it
    private), flush it to disk, and rename it to `target`."""
    _plain_permissions(tmp)
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    tmp.rename(target)
    _fsync_dir(target.parent)


def _plain_permissions(root: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, then the directories: a crash after this cannot leave zero-filled
    files behind names that are already in place."""
    for path in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):  # files before their directories
        if path.is_file():
            with path.open("rb+") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def exclusive(directory: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock of `directory` (a run's output_dir, an export's --out) for the block, or refuse at once.

    The lock file is a hidden sibling, `.NAME.lock` holding the holder's pid, so it survives the directory being
    replaced and never shows up in it; it is removed on release. `what` names the setting in the refusal
    ("'output_dir'", "--out"). `wait`: block until the holder is done instead (a cache entry another process is
    building: it will be there to reuse).
    """
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = directory.parent / f".{directory.name}.lock"
    fd = _lock(path, what, directory, wait)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter that then locks this inode sees it is stale
        os.close(fd)


def _lock(path: Path, what: str, directory: Path, wait: bool) -> int:
    """Open and lock `path`; retried when the file was removed or replaced between opening and locking."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{what}: cannot create the lock file {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{what}: {directory} is in use by another qlora-kit process (pid {holder}); wait for "
                            "it to finish or choose another directory") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder released and removed it meanwhile: lock the current file instead


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse to start a write that cannot fit: a full disk halfway wastes the work done before it."""
    from qlora_kit.memory import human_bytes

    directory = Path(directory)
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"not enough free disk space in {existing}: {what} needs about {human_bytes(needed)}, "
                        f"{human_bytes(free)} free")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
