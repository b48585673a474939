"""A disk that fails on demand: a FUSE filesystem that passes everything through to a backing
directory, except that while a flag file exists every write, truncate and fsync fails with
EIO, as a dying SD card's do. Reads keep working. Run by tests/disks.py in its own process:

    python -m tests.failing_fs BACKING MOUNTPOINT FLAG

It serves until unmounted (``fusermount3 -u MOUNTPOINT``). Needs /dev/fuse and libfuse3
(scripts/setup.sh dev installs it) and the ``mfusepy`` binding (the dev extra).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from mfusepy import FUSE, FuseOSError, Operations

_STAT_FIELDS = ("st_atime", "st_ctime", "st_mtime", "st_gid", "st_uid", "st_mode", "st_nlink", "st_size")


class FailingFS(Operations):  # type: ignore[misc]
    """Pass-through to ``root``; writes fail with EIO while ``flag`` exists."""

    use_ns = True

    def __init__(self, root: str, flag: str) -> None:
        self.root = root
        self.flag = flag

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _check(self) -> None:
        if os.path.exists(self.flag):
            raise FuseOSError(errno.EIO)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._path(path))
        attrs: dict[str, Any] = {k: getattr(st, k) for k in _STAT_FIELDS}
        for k in ("st_atime", "st_ctime", "st_mtime"):
            attrs[k] = getattr(st, f"{k}_ns")
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path), flags)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._check()
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._check()
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._check()
        os.truncate(self._path(path), length)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self._check()
        os.fsync(fh)

    def flush(self, path: str, fh: int) -> None:
        return None

    def release(self, path: str, fh: int) -> None:
        os.close(fh)

    def unlink(self, path: str) -> None:
        os.unlink(self._path(path))

    def rename(self, old: str, new: str) -> None:
        self._check()
        os.rename(self._path(old), self._path(new))

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._path(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._path(path))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._path(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._path(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        os.utime(self._path(path), ns=times)


def main(argv: list[str]) -> None:
    """Serve ``FailingFS(backing, flag)`` on ``mountpoint`` until unmounted."""
    backing, mountpoint, flag = argv
    FUSE(FailingFS(backing, flag), mountpoint, foreground=True, nothreads=True)


if __name__ == "__main__":
    main(sys.argv[1:])
