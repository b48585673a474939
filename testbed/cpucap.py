"""A host's CPU share: one process (all its threads) capped at a fraction of one CPU by a cgroup.

cgroup v2 ``cpu.max`` where the unified hierarchy at ``/sys/fs/cgroup`` has the cpu
controller, else cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` under
``/sys/fs/cgroup/cpu``. A quota is an exact, steady share that needs no competing process (a
busy-loop competitor under ``taskset`` gives about the share, as fair as the scheduler is, and
shares caches). Each capped process gets a group of its own, so P capped ranks are P boxes of
that speed, not one box shared. Root only; only the standard library is imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.procs import TestbedError, UsageError

CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CPU_PERIOD_US = 10_000  # short, so a capped rank never waits long for its next slice
MIN_QUOTA_US = 1_000  # the kernel refuses less


@dataclass(frozen=True, slots=True)
class CpuCap:
    """A cap in force: process ``pid`` in ``group``, ``quota_us`` of CPU time per ``period_us``."""

    pid: int
    group: Path
    fraction: float
    quota_us: int
    period_us: int

    def throttled(self) -> int:
        """Periods in which the kernel has held the group back so far (``cpu.stat`` nr_throttled):
        above 0 once the process wanted more than its share."""
        for line in (self.group / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "nr_throttled":
                return int(value)
        return 0

    def as_dict(self) -> dict[str, object]:
        """The cap as JSON values (what a benchmark records beside its runs)."""
        return {
            "pid": self.pid,
            "cgroup": str(self.group),
            "fraction": self.fraction,
            "quota_us": self.quota_us,
            "period_us": self.period_us,
        }


def _v2() -> bool:
    controllers = CGROUP_V2 / "cgroup.controllers"
    return controllers.is_file() and "cpu" in controllers.read_text().split()


def _member(pid: int, group: Path, root: Path, v2: bool) -> bool:
    """``/proc/PID/cgroup`` puts ``pid`` in ``group`` (its cpu hierarchy's line)."""
    want = "/" + str(group.relative_to(root))
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controllers == "" if v2 else "cpu" in controllers.split(",")) and path.endswith(want):
            return True
    return False


@contextlib.contextmanager
def cpu_cap(pid: int, fraction: float, name: str, period_us: int = CPU_PERIOD_US) -> Iterator[CpuCap]:
    """Cap process ``pid`` at ``fraction`` of one CPU in a new cgroup ``name``; on exit the process
    goes back to the root group and the group is removed. Raises UsageError for a share the
    kernel cannot give, TestbedError when the cap cannot be put in place."""
    quota_us = round(fraction * period_us)
    if quota_us < MIN_QUOTA_US:
        raise UsageError(f"a cap of {fraction:g} CPU is {quota_us} us per {period_us} us; the least is {MIN_QUOTA_US}")
    v2 = _v2()
    root = CGROUP_V2 if v2 else CGROUP_V1_CPU
    if v2 and "cpu" not in (root / "cgroup.subtree_control").read_text().split():
        raise TestbedError(
            f"cgroup v2 without the cpu controller for child groups: echo +cpu > {root}/cgroup.subtree_control"
        )
    if not v2 and not (root / "cpu.cfs_quota_us").is_file():
        raise TestbedError(f"no cgroup cpu controller at {CGROUP_V2} (v2) or {root} (v1)")
    group = root / name
    group.mkdir()
    try:
        if v2:
            (group / "cpu.max").write_text(f"{quota_us} {period_us}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period_us))
            (group / "cpu.cfs_quota_us").write_text(str(quota_us))
        (group / "cgroup.procs").write_text(str(pid))  # every thread of the process moves with it
        if not _member(pid, group, root, v2):
            raise TestbedError(f"process {pid} is not in {group} after moving it there")
        yield CpuCap(pid, group, fraction, quota_us, period_us)
    finally:
        with contextlib.suppress(OSError):  # the process may have exited
            (root / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            group.rmdir()
