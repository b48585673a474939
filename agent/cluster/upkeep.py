"""A node's periodic group duties, every ``beat_s`` (one supervised loop, agent/node/daemon.py):

- as a peer, say ``beat`` to the coordinator of every group I am forming or hold my engine
  for (and for ``silence_s`` after a run, while the coordinator finishes);
- as a coordinator, fail every run whose watched peer went silent (agent/cluster/beats.py);
- drop groups idle for ``idle_s`` and rendezvous keys whose group never formed;
- free descriptors before they run out. Connections to a GLOO listener each cost a descriptor
  until the group is destroyed (gloo never closes them) and gloo aborts the process when
  ``accept`` finds none left. Strangers are kept off (a forming group's listener admits only
  the members, a formed group's is closed: transport/listener.py); as a backstop, when the
  node holds more than :func:`descriptor_ceiling` descriptors, every group is dropped, a
  running one too (its run fails and the job runs locally; a later job forms a new group).
"""

from __future__ import annotations

import asyncio
import resource
import time

import structlog

from agent.cluster.group import Group, gather_all, open_descriptors, quietly
from agent.cluster.group_state import GroupEvent, GroupState
from agent.cluster.groups import GroupManager
from engine.errors import FailureReason
from transport.control import Beat

log = structlog.get_logger("prism.groups")

#: Descriptors over the start's count at which groups are dropped ...
FD_SLACK = 512
#: ... or the share of the soft limit kept free, whichever comes first.
FD_FREE_SHARE = 0.25


def descriptor_ceiling(baseline: int, soft_limit: int) -> int:
    """How many open descriptors the node may hold before it drops its groups."""
    return min(baseline + FD_SLACK, int(soft_limit * (1 - FD_FREE_SHARE)))


def idle(group: Group, now_s: float, idle_s: float) -> bool:
    """Is ``group`` formed and unused for over ``idle_s``: no reservation held for a peer, no
    job of this node on it (a job that reserves engines after a long formation is using it)?"""
    unused = not group.holds and not group.users
    return group.state is GroupState.READY and unused and now_s - group.used_s > idle_s


async def upkeep(groups: GroupManager) -> None:
    """Forever: the duties of the module docstring."""
    baseline = open_descriptors()
    timing = groups.timing
    while True:
        await asyncio.sleep(timing.beat_s)
        now = time.monotonic()
        beats = [
            groups.channel.tell(g.coordinator, Beat(gid=g.gid))
            for g in groups.groups
            if g.rank > 0 and (g.state is GroupState.FORMING or g.holds or now - g.used_s < timing.silence_s)
        ]
        if beats:
            groups.spawn(quietly(gather_all(beats)), "beats")
        for gid, node, quiet_s in groups.silence.silent(now):
            group = next((g for g in groups.groups if g.gid == gid), None)
            if group is not None:
                group.silent = node
                groups.on_silent(node)
                group.fail(FailureReason.PEER_SILENT, f"{node} was silent for {quiet_s:.1f} s")
        held, ceiling = open_descriptors(), descriptor_ceiling(baseline, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        if held > ceiling and groups.groups:
            log.warning("descriptors_reclaimed", open=held, ceiling=ceiling, groups=len(groups.groups))
            groups.drop_all(FailureReason.DESCRIPTORS, "too many open descriptors (stray connections)")
        for group in groups.groups:
            if idle(group, now, timing.idle_s):
                groups.drop(group, GroupEvent.IDLE, FailureReason.IDLE, f"idle for {timing.idle_s:g} s")
        groups.early.expire(now - timing.group_s)
