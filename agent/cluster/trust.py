"""Trust in what other nodes publish: a valid proof (agent/cluster/admission.py) *and* news
(agent/cluster/freshness.py), checked together so no caller can forget one of them."""

from __future__ import annotations

from collections.abc import Mapping

from agent.cluster.admission import Admission
from agent.cluster.freshness import Freshness

#: Health and status older than this are refused (a few health periods, plus clock skew).
FRESH_S = 60.0


class Trust:
    """Who may speak for which node; in an open cluster, anyone may."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.fresh = Freshness()

    @property
    def open(self) -> bool:
        """True without a cluster secret."""
        return self.admission.open

    def accept(
        self, fields: Mapping[str, str], node: str, channel: str, now_s: float, max_age_s: float = FRESH_S
    ) -> bool:
        """A message of ``node`` on ``channel``: signed by a member, recent, and not seen before."""
        if self.open:
            return True
        if fields.get("node", node) != node or not self.admission.verify(fields, now_s, max_age_s):
            return False
        who = Admission.signer(fields, node)
        return who is not None and self.fresh.accept(node, who.boot, who.boot_ts, who.seq, channel)

    def gone(self, fields: Mapping[str, str], node: str, now_s: float) -> bool:
        """A signed goodbye of ``node`` (its Last Will, signed when it connected, or a clean
        ``offline``): True when it is the goodbye of the node's current connection."""
        if self.open:
            return True
        if fields.get("node", node) != node or not self.admission.verify(fields, now_s, max_age_s=-1):
            return False
        who = Admission.signer(fields, node)
        return who is not None and self.fresh.gone(node, who.boot, who.boot_ts, who.seq)
