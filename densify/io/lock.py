"""One job per output folder: every command holds a lock file in its --out for the job's lifetime.

`OutputLock(folder)` creates the folder if needed and takes an exclusive `flock` on `<folder>/.densify.lock`
(`.densify-<i>.lock` for shard i of a label job, so shards share a folder); a second job on the same folder
is refused at once with `OutputLockedError` (exit 4), naming the folder and the job that holds it. The lock
goes with the process (a killed job leaves no stale lock: the kernel drops it), and a folder the lock itself
created is removed again when nothing else was written to it.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["OutputLock", "OutputLockedError", "lock_name"]


class OutputLockedError(RuntimeError):
    """Another job holds the output folder."""


def lock_name(shard: tuple[int, int] = (0, 1)) -> str:
    return ".densify.lock" if shard[1] == 1 else f".densify-{shard[0]}.lock"


class OutputLock:
    """An exclusive lock on an output folder (see the module docstring); a context manager."""

    def __init__(self, folder: str | Path, *, shard: tuple[int, int] = (0, 1), what: str = "--out"):
        self.folder = Path(folder)
        self.path = self.folder / lock_name(shard)
        self.what = what
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> "OutputLock":
        import fcntl

        missing = []
        p = self.folder
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        for parent in (self.folder, *self.folder.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise NotADirectoryError(f"{self.what} {self.folder}: {parent} is a file, not a folder; give a "
                                             f"new or existing folder")
                break
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_created()
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputLockedError(
                        f"{self.what} {self.folder}: another densify job is writing to this folder{holder}; wait "
                        f"for it to end, or give this job another {self.what}") from None
                raise
            try:  # the holder may have removed the file between our open and our lock: lock the file that is there
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "command": " ".join(os.path.basename(a) if i == 0 else a
                                                     for i, a in enumerate(sys.argv))[:300]}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting job then locks a fresh file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        """Remove the folders this lock created if nothing was written to them."""
        for d in self._created:
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (pid {info['pid']}, since {info['since']}: {info.get('command', '')})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
