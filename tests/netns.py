"""A test bed of "hosts": network namespaces joined by a bridge in a switch namespace.

Nothing touches the root namespace's interfaces: the bridge lives in its own namespace,
each host gets one veth into it and an address on a private test subnet, and multicast
(mDNS) stays on that bridge. Teardown deletes the namespaces, which removes everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field


def netns_unavailable() -> str | None:
    """Why a namespace test bed cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"prism-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True)


@dataclass
class Testbed:
    __test__ = False  # a helper, not a test class

    """``hosts`` namespaces on one bridge; host i has address 10.231.0.(i+1)/24 on ``eth0``."""

    hosts: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    names: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"prsw-{self.tag}"

    def address(self, i: int) -> str:
        return f"10.231.0.{i + 1}"

    def up(self) -> Testbed:
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.hosts):
            name = f"prh{i}-{self.tag}"
            self.names.append(name)
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
            # Create the pair inside the host namespace, then move its peer to the switch.
            sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}")
            sh("ip", "-n", name, "link", "set", f"p{i}", "netns", self.switch)
            sh("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", f"p{i}", "up")
            sh("ip", "-n", name, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
            sh("ip", "-n", name, "route", "add", "224.0.0.0/4", "dev", "eth0")
        return self

    def run(self, i: int, *cmd: str) -> list[str]:
        """The command line that runs ``cmd`` on host i."""
        return ["ip", "netns", "exec", self.names[i], *cmd]

    def shape(self, i: int, rate: str) -> None:
        """Limit host i's outgoing rate (tbf; this kernel has no netem)."""
        sh(
            "ip",
            "netns",
            "exec",
            self.names[i],
            "tc",
            "qdisc",
            "replace",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "32kbit",
            "latency",
            "400ms",
        )

    def down(self) -> None:
        for name in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "pids", name], capture_output=True, check=False)
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
            for pid in pids.split():
                subprocess.run(["kill", "-9", pid], check=False)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.names.clear()
