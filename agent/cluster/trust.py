"""Trust in what other nodes publish: a valid proof (agent/cluster/admission.py), a time that
fits the clocks (agent/cluster/skew.py) *and* news (agent/cluster/freshness.py), checked
together so no caller can forget one of them.

With a state file, what the freshness check has seen is saved after every message it
accepts (an atomic replace, not synced: it survives a crash of the agent; a power cut may
lose the last seconds), and loaded at start, so a restarted node refuses replays of what it
accepted before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import structlog

from agent.cluster.admission import Admission, Signed
from agent.cluster.boots import write_atomic
from agent.cluster.freshness import Freshness
from agent.cluster.skew import ClockSkew

log = structlog.get_logger("prism.trust")
#: Health and status older than this are refused (a few health periods).
FRESH_S = 60.0
#: Channels whose messages are signed just before they are sent: they measure clock skew.
LIVE = frozenset({"health", "control"})
#: Why a message was refused when it had been seen (or is of an older boot).
REPLAY = "a replay"


class Trust:
    """Who may speak for which node; in an open cluster, anyone may."""

    def __init__(self, admission: Admission, state_file: Path | None = None) -> None:
        self.admission = admission
        self.skew = ClockSkew(admission.max_skew_s)
        self._file = state_file
        self._save_failed = False
        self.fresh = Freshness(self._load())

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
        if fields.get("node", node) != node or not self.admission.verify(fields, now_s, max_age_s=-1):
            return False
        who = Admission.signer(fields, node)
        if who is None:
            return False
        why = self.fresh_enough(who, channel, now_s, max_age_s)
        if why is not None and why != REPLAY:
            log.warning("admission_refused", node=node, via=channel, why=why, max_clock_skew_s=self.skew.max_skew_s)
        return why is None

    def fresh_enough(self, who: Signed, channel: str, now_s: float, max_age_s: float) -> str | None:
        """None when a message whose proof was checked is news and its time fits (``max_age_s``
        < 0: any time); else why not (:data:`REPLAY`, or what is wrong with its time)."""
        why = None if max_age_s < 0 else self.skew.why_not(who.ts, now_s, max_age_s)
        if why is not None:
            if channel in LIVE:  # signed just before sending: the difference is the clocks'
                self._note(who.node, who.ts - now_s, refused=True)
            return why
        if not self.fresh.accept(who.node, who.boot, who.boot_n, who.seq, channel):
            return REPLAY
        if channel in LIVE:
            self._note(who.node, who.ts - now_s, refused=False)
        self._save()
        return None

    def gone(self, fields: Mapping[str, str], node: str, now_s: float) -> bool:
        """A signed goodbye of ``node`` (its Last Will, signed when it connected, or a clean
        ``offline``): True when it is the goodbye of the node's current connection."""
        if self.open:
            return True
        if fields.get("node", node) != node or not self.admission.verify(fields, now_s, max_age_s=-1):
            return False
        who = Admission.signer(fields, node)
        if who is None or not self.fresh.gone(node, who.boot, who.boot_n, who.seq):
            return False
        self._save()
        return True

    def clock_report(self) -> dict[str, object]:
        """Health's ``clock`` (agent/cluster/skew.py); empty in an open cluster, which signs no times."""
        return {} if self.open else self.skew.report()

    def _note(self, node: str, ahead_s: float, *, refused: bool) -> None:
        if self.skew.note(node, ahead_s, refused=refused):
            level = log.warning if refused or abs(ahead_s) >= self.skew.max_skew_s / 2 else log.info
            level(
                "clock_skew",
                node=node,
                ahead_s=round(ahead_s, 3),
                refused=refused,
                max_clock_skew_s=self.skew.max_skew_s,
            )

    def _load(self) -> dict[str, object] | None:
        if self._file is None:
            return None
        try:
            data = json.loads(self._file.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("freshness_unreadable", path=str(self._file), error=str(exc)[:120])
            return None
        nodes = data.get("nodes") if isinstance(data, dict) else None
        return nodes if isinstance(nodes, dict) else None

    def _save(self) -> None:
        if self._file is None:
            return
        data = json.dumps({"v": 1, "nodes": self.fresh.saved()}, separators=(",", ":")).encode()
        try:
            write_atomic(self._file, data, sync=False)
        except OSError as exc:
            if not self._save_failed:  # once per run of failures, not once per message
                log.warning("freshness_unsaved", path=str(self._file), error=str(exc)[:120])
            self._save_failed = True
        else:
            self._save_failed = False
