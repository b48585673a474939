"""This node's boot number: above every earlier boot's, whatever the wall clock says.

Receivers tell a restart from a replay by the boot number signed into every message
(agent/cluster/freshness.py). It is kept in the state directory and written, atomically and
synced, before the node announces itself: each start takes the stored number + 1, or the
wall clock in milliseconds when that is higher, so a node whose state directory was lost
still starts above its old boots as long as its clock is right. A clock set back (corrected
after a fast start, or a box without an RTC battery booting before NTP) cannot make a new
boot look older.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import structlog

log = structlog.get_logger("prism.boots")


def write_atomic(path: Path, data: bytes, *, sync: bool) -> None:
    """Replace ``path`` with ``data``: readers see the old bytes or the new, never a mix.
    ``sync`` also makes it survive a power cut (fsync of the file and its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def next_boot(path: Path, now_s: float) -> int:
    """Count this start in ``path`` and return its boot number (see the module docstring)."""
    last = 0
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text().strip()
        try:
            last = int(text)
        except ValueError:
            log.warning("boot_counter_unreadable", path=str(path), content=text[:40], action="counting from the clock")
    boot = max(last + 1, int(now_s * 1000))
    write_atomic(path, f"{boot}\n".encode(), sync=True)
    if boot == last + 1 and last:
        log.info("boot_counted", boot=boot, clock_behind_last_boot_s=round(last / 1000 - now_s, 3))
    return boot
