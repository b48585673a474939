"""sd_notify without libsystemd: READY, WATCHDOG and STOPPING datagrams to $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import socket


class Notifier:
    """Sends systemd notifications when started under a unit with a notify socket; else does nothing."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        if address and address.startswith("@"):
            self._address = "\0" + address[1:]  # abstract namespace socket

    @property
    def enabled(self) -> bool:
        """True under systemd (Type=notify)."""
        return bool(self._address)

    def notify(self, state: str) -> None:
        """Send e.g. ``READY=1``; errors are ignored (systemd may be gone while we stop). Never
        blocks the event loop: a receiver whose queue is full loses the datagram (EAGAIN), and
        the next watchdog ping comes a period later."""
        if not self._address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.sendto(state.encode(), self._address)
