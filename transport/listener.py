"""Closing a GLOO device's listening socket once its group has formed.

A GLOO TCP device listens on an ephemeral port for its pairs' connections, and keeps
listening until the device is destroyed, though it needs the port only while the group
forms (gloo/transport/tcp/pair.cc: an eager pair's ``connect`` waits until the pair is
connected, so every pair is connected when the group's constructor returns). Anyone on
the LAN may connect to that port, and gloo handles such strangers badly
(gloo/transport/tcp/listener.cc, helpers.h, loop.cc):

- each accepted connection waits for an 8-byte sequence number in a one-shot read whose
  handler stays in the loop's table after it fires, so the socket is never closed: every
  stranger, even one that closes at once, costs a descriptor until the group is destroyed;
- the accept loop turns any error but EAGAIN into ``GLOO_ENFORCE(false, "accept: ...")``,
  thrown on gloo's loop thread: with descriptors gone (EMFILE) the process aborts.

So once the group is formed, :func:`seal` puts ``/dev/null`` in place of the listening
socket (``dup2``: the descriptor number stays the listener's, gloo closes it with the
device). The socket closes, epoll forgets it, and later connects are refused by the
kernel. On teardown gloo stops its loop before it shuts the listener down
(``Device::shutdown``), so it never asks epoll about the descriptor again.

While the group forms the port must stay open, so before anyone learns it (the group's
constructor publishes it) :func:`new_listeners` can attach a filter that admits only the
members' addresses (transport/sockfilter.py): a stranger's SYN is dropped by the kernel.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from transport.sockfilter import admit_only

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's ``st`` column
_lock = threading.Lock()


def listening_sockets() -> dict[int, tuple[int, int]]:
    """This process's listening TCP sockets: descriptor -> (socket inode, port)."""
    listening: dict[int, int] = {}  # inode -> port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == _LISTEN:
                    listening[int(cols[9])] = int(cols[1].rsplit(":", 1)[1], 16)
    found: dict[int, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                target = os.readlink(f"/proc/self/fd/{name}")
                if target.startswith("socket:[") and int(target[8:-1]) in listening:
                    found[int(name)] = (int(target[8:-1]), listening[int(target[8:-1])])
    return found


def _epolls() -> dict[int, set[int]]:
    """This process's epoll instances: descriptor -> the descriptors it watches."""
    found: dict[int, set[int]] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                    info = Path(f"/proc/self/fdinfo/{name}").read_text()
                    found[int(name)] = {int(m) for m in re.findall(r"^tfd:\s*(\d+)", info, re.MULTILINE)}
    return found


@contextlib.contextmanager
def new_listeners(admit: Sequence[str] | None = None) -> Iterator[dict[int, tuple[int, int]]]:
    """The listening sockets a GLOO device created inside the block (filled in when it ends):
    new ones that a new epoll instance (the device's loop) watches. One block at a time in
    the process, so two groups forming at once do not take each other's.

    With ``admit`` (IPv4 addresses), each of them hears only from those when the block ends;
    ValueError if the block created none (nothing to guard) or an address is bad."""
    with _lock:
        before, polls = listening_sockets(), set(_epolls())
        found: dict[int, tuple[int, int]] = {}
        yield found
        watched = set().union(*(fds for ep, fds in _epolls().items() if ep not in polls))
        new = {fd: sock for fd, sock in listening_sockets().items() if before.get(fd) != sock}
        found.update({fd: sock for fd, sock in new.items() if fd in watched})
        if admit is not None:
            if not found:
                raise ValueError("found no listener of the new GLOO device to guard")
            for fd in found:
                admit_only(fd, admit)


def seal(listeners: dict[int, tuple[int, int]]) -> list[int]:
    """Close the listening sockets ``listeners`` (descriptor -> (inode, port)) in place: each
    descriptor that still holds its socket is pointed at ``/dev/null``. The ports closed."""
    ports: list[int] = []
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd, (inode, port) in listeners.items():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == f"socket:[{inode}]":
                    os.dup2(null, fd, inheritable=False)
                    ports.append(port)
    finally:
        os.close(null)
    return ports
