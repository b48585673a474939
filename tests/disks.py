"""A small real filesystem for tests of a full disk: a tmpfs that a test fills to ENOSPC
and frees again (mounting needs root)."""

from __future__ import annotations

import contextlib
import errno
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
