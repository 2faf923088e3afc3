"""Storage behind one small interface, so remote storage can plug in later.

Paths are relative to the storage root (the Checkpointer's directory). :class:`LocalStorage` is the
local-filesystem implementation; it counts every byte it reads (``bytes_read``), which the tests use
to prove that unrequested tensors are never read.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from typing import Protocol

from .errors import CheckpointCorruptError

__all__ = ["LocalStorage", "Storage"]


class Storage(Protocol):
    """What the checkpointer needs from a storage backend."""

    root: str
    bytes_read: int

    def local_path(self, rel: str) -> str: ...
    def exists(self, rel: str) -> bool: ...
    def listdir(self, rel: str) -> list[str]: ...
    def size(self, rel: str) -> int: ...
    def read_bytes(self, rel: str, offset: int = 0, length: int = -1) -> bytes: ...
    def read_into(self, rel: str, offset: int, buffer: memoryview) -> None: ...
    def write_atomic(self, rel: str, data: bytes) -> None: ...
    def makedirs(self, rel: str) -> None: ...
    def rename_dir(self, src: str, dst: str) -> None: ...
    def remove_tree(self, rel: str) -> None: ...


class LocalStorage:
    """A directory on the local filesystem (or any POSIX mount)."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}

    def local_path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.local_path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self.local_path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def size(self, rel: str) -> int:
        return os.stat(self.local_path(rel)).st_size

    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is None:
            with self._lock:  # readers may run in threads (verify): open each file once
                fd = self._fds.get(rel)
                if fd is None:
                    fd = self._fds[rel] = os.open(self.local_path(rel), os.O_RDONLY)
        return fd

    def read_bytes(self, rel: str, offset: int = 0, length: int = -1) -> bytes:
        with open(self.local_path(rel), "rb") as f:
            f.seek(offset)
            data = f.read() if length < 0 else f.read(length)
        self._count(len(data))
        return data

    def read_into(self, rel: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset`` of file ``rel`` (one copy, no staging)."""
        fd = self._fd(rel)
        view = buffer.cast("B") if buffer.format != "B" else buffer
        done, total = 0, len(view)
        while done < total:
            n = os.preadv(fd, [view[done : done + (1 << 30)]], offset + done)
            if n <= 0:
                raise CheckpointCorruptError(
                    f"{self.local_path(rel)}: size check failed: file ended at byte "
                    f"{offset + done}, expected {total - done} more bytes (truncated?)"
                )
            done += n
        self._count(total)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` under a temporary name, fsync, then rename into place."""
        path = self.local_path(rel)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.fsync_dir(os.path.dirname(rel))

    def fsync_dir(self, rel: str) -> None:
        if not self.fsync:
            return
        try:
            fd = os.open(self.local_path(rel), os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def makedirs(self, rel: str) -> None:
        os.makedirs(self.local_path(rel), exist_ok=True)

    def rename_dir(self, src: str, dst: str) -> None:
        """Atomically rename a directory; fails if ``dst`` exists (never replaces a checkpoint)."""
        s, d = self.local_path(src), self.local_path(dst)
        if os.path.exists(d):
            raise FileExistsError(d)
        os.rename(s, d)
        self.fsync_dir(os.path.dirname(dst))

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self.local_path(rel), ignore_errors=True)

    def __enter__(self) -> LocalStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
