"""Heartbeats within groups: which peer a coordinator waits on has gone quiet (pure, no I/O,
no clock: times are passed in, so tests drive it).

A peer whose cable is pulled stays connected to the broker for its keep-alive, so no Last Will
comes; while it forms a group or holds its engine for a run, it says ``beat`` to the
coordinator every ``beat_s``. The coordinator watches a peer from the moment it waits on it
(``form``, ``reserve``) until the run ends; a watched peer not heard from for ``limit_s``
fails the run at once, whatever the run was waiting for (a rendezvous key, a grant, a
collective). A check that comes late (this node's own loop stalled, so words may be waiting
unread) restarts every clock instead of blaming the peers.
"""

from __future__ import annotations

from collections.abc import Hashable


class Silence:
    """The coordinator's side: watched peers and when each was last heard from."""

    def __init__(self, limit_s: float, stall_s: float) -> None:
        self.limit_s = limit_s
        self.stall_s = stall_s
        self._watches: dict[tuple[str, Hashable], dict[str, float]] = {}  # (gid, what) -> node -> since
        self._heard: dict[tuple[str, str], float] = {}  # (gid, node) -> last word
        self._checked: float | None = None

    def watch(self, gid: str, what: Hashable, node: str, now_s: float) -> None:
        """Start waiting on ``node`` for ``what`` (formation, a run) of group ``gid``."""
        self._watches.setdefault((gid, what), {}).setdefault(node, now_s)

    def unwatch(self, gid: str, what: Hashable) -> None:
        """``what`` is over: stop waiting on its peers."""
        self._watches.pop((gid, what), None)

    def forget(self, gid: str) -> None:
        """Group ``gid`` is gone."""
        for key in [k for k in self._watches if k[0] == gid]:
            del self._watches[key]
        for key in [k for k in self._heard if k[0] == gid]:
            del self._heard[key]

    def heard(self, gid: str, node: str, now_s: float) -> None:
        """A word from ``node`` about group ``gid`` (a beat or any other control message)."""
        self._heard[(gid, node)] = now_s

    def heard_since(self, gid: str, node: str, since_s: float) -> bool:
        """Has ``node`` said anything about group ``gid`` (a beat, say) since ``since_s``?"""
        return self._heard.get((gid, node), float("-inf")) >= since_s

    def silent(self, now_s: float) -> list[tuple[str, str, float]]:
        """(gid, node, seconds quiet) for each watch with a peer quiet for over ``limit_s``; each
        such watch is reported once (it is dropped)."""
        late = self._checked is not None and now_s - self._checked > self.stall_s
        self._checked = now_s
        found: list[tuple[str, str, float]] = []
        for key, nodes in list(self._watches.items()):
            if late:
                self._watches[key] = dict.fromkeys(nodes, now_s)
                continue
            gid = key[0]
            quiet = {n: now_s - max(since, self._heard.get((gid, n), since)) for n, since in nodes.items()}
            node, quiet_s = max(quiet.items(), key=lambda kv: kv[1])
            if quiet_s > self.limit_s:
                found.append((gid, node, quiet_s))
                del self._watches[key]
        return found
