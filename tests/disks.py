"""Real filesystems for tests of a full or failing disk (mounting needs root):

- ``small_disk()``: a 1 MiB tmpfs that a test fills to ENOSPC and frees again;
- ``failing_disk()``: a FUSE filesystem (tests/failing_fs.py) whose writes, truncates and
  fsyncs fail with EIO while the test says so, as a dying SD card's do.

Both yield an object with ``path``, ``fail()`` and ``recover()``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

ROOT = Path(__file__).resolve().parent.parent


class Disk(Protocol):
    """A state directory on a disk a test can break and mend."""

    path: Path

    def fail(self) -> None:
        """From now on the disk refuses writes."""

    def recover(self) -> None:
        """Writes work again."""


class SmallDisk:
    """A 1 MiB tmpfs that can be filled to ENOSPC and freed again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Write until the kernel says ENOSPC."""
        with self.filler.open("ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise

    def free(self) -> None:
        """Give the space back."""
        self.filler.unlink(missing_ok=True)

    fail, recover = fill, free


@contextlib.contextmanager
def small_disk() -> Iterator[SmallDisk]:
    """A 1 MiB tmpfs on a fresh directory, unmounted and removed after."""
    path = Path(tempfile.mkdtemp(prefix="prism-small-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


class FailingDisk:
    """The mount of a FUSE filesystem whose writes fail with EIO between ``fail()`` and ``recover()``."""

    def __init__(self, path: Path, flag: Path) -> None:
        self.path = path
        self.flag = flag

    def fail(self) -> None:
        """Every write, truncate and fsync from now on gets EIO (reads still work)."""
        self.flag.touch()

    def recover(self) -> None:
        """Writes work again."""
        self.flag.unlink(missing_ok=True)


def fuse_available() -> bool:
    """Can this machine mount tests/failing_fs.py (root, /dev/fuse, libfuse3 and mfusepy)?"""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return False
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError):  # OSError: the binding found no libfuse
        return False
    return True


@contextlib.contextmanager
def failing_disk(timeout_s: float = 10.0) -> Iterator[FailingDisk]:
    """A FUSE mount over a fresh backing directory, served by its own process; unmounted after.
    Skips the test where the kernel or a sandbox refuses FUSE mounts (as tests/netns.py does
    where namespaces cannot be made)."""
    work = Path(tempfile.mkdtemp(prefix="prism-failing-disk-"))
    backing, mount, flag = work / "backing", work / "mnt", work / "fail"
    backing.mkdir()
    mount.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.failing_fs", str(backing), str(mount), str(flag)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not os.path.ismount(mount):
            if server.poll() is not None:  # no mount at all: this machine's kernel or sandbox refuses FUSE
                why = server.stderr.read().decode(errors="replace").strip()[-300:]  # type: ignore[union-attr]
                pytest.skip(f"FUSE cannot mount here: {why}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mount} was not mounted in {timeout_s:g} s")
            time.sleep(0.02)  # polling a mount table: there is no event to wait on
        yield FailingDisk(mount, flag)
    finally:
        flag.unlink(missing_ok=True)
        subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False, capture_output=True)
        try:
            server.wait(timeout_s)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
