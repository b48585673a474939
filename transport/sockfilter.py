"""A socket filter that lets a listening TCP socket hear only from given IPv4 addresses.

The kernel runs a socket's classic BPF filter on every packet the socket receives, a
listening socket's SYNs included (``tcp_v4_rcv`` filters before it handles a listener's
packet): a SYN from anyone else is dropped before a connection exists, so nothing reaches
``accept`` and no descriptor is spent. The stranger's connect times out. Connections the
socket accepts inherit the filter, which their peers (admitted addresses) pass.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable

SO_ATTACH_FILTER = 26  # asm-generic/socket.h (Python's socket module lacks it)
_SKF_AD_PROTOCOL = -0x1000  # SKF_AD_OFF + SKF_AD_PROTOCOL: the packet's ethertype
_SKF_NET_SRC4 = -0x100000 + 12  # SKF_NET_OFF + 12: an IPv4 header's source address
_ETH_P_IP = 0x0800
_LD_H_ABS, _LD_W_ABS, _JEQ_K, _RET_K = 0x28, 0x20, 0x15, 0x06
_MAX_ADDRESSES = 250  # a jump's offset is one byte


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def admit_program(addresses: Iterable[str]) -> list[bytes]:
    """The filter's instructions: keep an IPv4 packet from one of ``addresses``, drop the rest.

    Raises ValueError for an address that is not IPv4, or for too many."""
    try:
        sources = sorted({int(ipaddress.IPv4Address(a)) for a in addresses})
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"a listener admits IPv4 addresses only: {exc}") from exc
    if not 0 < len(sources) <= _MAX_ADDRESSES:
        raise ValueError(f"a listener admits 1 to {_MAX_ADDRESSES} addresses, not {len(sources)}")
    n = len(sources)
    program = [
        _insn(_LD_H_ABS, 0, 0, _SKF_AD_PROTOCOL),
        _insn(_JEQ_K, 0, n + 1, _ETH_P_IP),  # not IPv4: drop
        _insn(_LD_W_ABS, 0, 0, _SKF_NET_SRC4),
    ]
    program += [_insn(_JEQ_K, n - i, 0, src) for i, src in enumerate(sources)]  # a match jumps to keep
    program += [_insn(_RET_K, 0, 0, 0), _insn(_RET_K, 0, 0, 0xFFFFFFFF)]  # drop; keep all of it
    return program


def admit_only(fd: int, addresses: Iterable[str]) -> None:
    """Attach :func:`admit_program` to the socket ``fd`` (a descriptor this process holds, not
    taken over). Raises OSError when the kernel refuses it, ValueError for bad addresses."""
    program = admit_program(addresses)
    code = ctypes.create_string_buffer(b"".join(program))
    fprog = struct.pack("HP", len(program), ctypes.addressof(code))  # struct sock_fprog
    with socket.socket(fileno=socket.dup(fd)) as sock:  # the same socket; closing the copy leaves it open
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
