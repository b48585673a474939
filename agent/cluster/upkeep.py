"""A node's periodic group duties, every ``beat_s`` (one supervised loop, agent/node/daemon.py):

- as a peer, say ``beat`` to the coordinator of every group I am forming or hold my engine
  for (and for ``silence_s`` after a run, while the coordinator finishes);
- as a coordinator, fail every run whose watched peer went silent (agent/cluster/beats.py);
- drop groups idle for ``idle_s`` and rendezvous keys whose group never formed;
- free descriptors when stray connections pile up on GLOO listeners. GLOO keeps every
  connection to a group's listener that is not one of its members' open until the group is
  destroyed (nothing closes it otherwise; torch's Python API offers no TLS or filtering for
  it). So when the node holds :data:`FD_SLACK` more descriptors than it did at the start,
  every group not running is dropped (a later job forms a new one).
"""

from __future__ import annotations

import asyncio
import time

import structlog

from agent.cluster.group import gather_all, open_descriptors, quietly
from agent.cluster.group_state import GroupEvent, GroupState
from agent.cluster.groups import GroupManager
from transport.control import Beat

log = structlog.get_logger("prism.groups")

#: Descriptors over the start's count at which idle groups are dropped.
FD_SLACK = 512


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
                groups.fail(group, f"{node} was silent for {quiet_s:.1f} s")
        if open_descriptors() > baseline + FD_SLACK:
            idle = [g for g in groups.groups if g.state is not GroupState.RUNNING and not g.holds]
            if idle:
                log.warning("descriptors_reclaimed", open=open_descriptors(), baseline=baseline, groups=len(idle))
            for group in idle:
                groups.drop(group, GroupEvent.IDLE, "too many open descriptors (stray connections)")
        for group in groups.groups:
            if group.state is GroupState.READY and not group.holds and now - group.used_s > timing.idle_s:
                groups.drop(group, GroupEvent.IDLE, f"idle for {timing.idle_s:g} s")
        groups.early.expire(now - timing.group_s)
