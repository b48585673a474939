"""The control channel between agents: typed messages in an envelope, one topic per node.

``tell(node, msg)`` publishes ``msg`` (transport/control.py) to ``nodes/{node}/control``;
``open(payload)`` gives back (sender, message) when the envelope is for this node and
trustworthy, else None (logged as ``admission_refused``).

With a cluster secret the body is encrypted and authenticated with AES-GCM under a key
derived from the secret, the header (sender, receiver, boot, sequence, time) bound to it as
associated data: nobody without the secret can read a rendezvous, forge a message or change
its header, and a replayed copy (an old ``form`` or ``run``) is refused by its sequence
number. Without a secret envelopes are plain JSON, and anyone on the broker can speak for
any node: that is what open mode means (README, threat model).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Awaitable, Callable

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.cluster.admission import Admission
from agent.cluster.clock import wall_s
from agent.cluster.trust import Trust
from transport.control import Control, dump_control, parse_control
from transport.schema import WireError

log = structlog.get_logger("prism.control")
Publish = Callable[[str, bytes], Awaitable[None]]
#: Control messages older than this are refused (they are answered within seconds).
CONTROL_MAX_AGE_S = 30.0
_HEADER = ("from", "to", "boot", "bt", "seq", "ts")


def _aad(fields: dict[str, str]) -> bytes:
    return "\n".join(f"{k}={fields[k]}" for k in _HEADER).encode()


class ControlChannel:
    """Seals and opens control envelopes for one node."""

    def __init__(self, node: str, trust: Trust, publish: Publish, topic_for: Callable[[str], str]) -> None:
        self.node = node
        self.trust = trust
        self._publish = publish
        self._topic_for = topic_for
        self._aead = None if trust.open else AESGCM(trust.admission.key("control"))

    def seal(self, to: str, msg: Control) -> bytes:
        """The envelope bytes of ``msg`` for node ``to``."""
        body = dump_control(msg)
        if self._aead is None:
            return json.dumps({"from": self.node, "to": to, "body": body}, separators=(",", ":")).encode()
        adm = self.trust.admission
        fields = {
            "from": self.node,
            "to": to,
            "boot": adm.boot,
            "bt": str(adm.boot_n),
            "seq": str(adm.next_seq()),
            "ts": f"{wall_s():.3f}",
        }
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, body.encode(), _aad(fields))
        fields["n"] = base64.b64encode(nonce).decode()
        fields["ct"] = base64.b64encode(sealed).decode()
        return json.dumps(fields, separators=(",", ":")).encode()

    async def tell(self, to: str, msg: Control) -> None:
        """Send ``msg`` to node ``to`` (raises TransportError when not connected)."""
        await self._publish(self._topic_for(to), self.seal(to, msg))

    def open(self, payload: bytes) -> tuple[str, Control] | None:
        """(sender, message) of an envelope for this node; None when refused. Malformed: WireError."""
        try:
            envelope = json.loads(payload)
        except (ValueError, RecursionError):
            raise WireError("control envelope is not JSON") from None
        if not isinstance(envelope, dict) or not all(isinstance(envelope.get(k), str) for k in ("from", "to")):
            raise WireError("control envelope without from and to")
        sender, to = str(envelope["from"])[:128], str(envelope["to"])[:128]
        if to != self.node:
            return self._refuse(sender, to, "not for this node")
        if self._aead is None:
            if not isinstance(envelope.get("body"), str):
                raise WireError("control envelope without a body")
            return sender, parse_control(envelope["body"])
        return self._open_sealed(envelope, sender, to)

    def _open_sealed(self, envelope: dict[str, object], sender: str, to: str) -> tuple[str, Control] | None:
        assert self._aead is not None
        fields = {k: str(envelope.get(k, "")) for k in _HEADER}
        try:
            nonce = base64.b64decode(str(envelope["n"]), validate=True)
            sealed = base64.b64decode(str(envelope["ct"]), validate=True)
            body = self._aead.decrypt(nonce, sealed, _aad(fields))
        except (KeyError, ValueError, binascii.Error, InvalidTag):
            return self._refuse(sender, to, "no valid seal")
        who = Admission.signer(fields, sender)
        if who is None:
            return self._refuse(sender, to, "no boot, sequence or time in its seal")
        why = self.trust.fresh_enough(who, "control", wall_s(), CONTROL_MAX_AGE_S)
        if why is not None:
            return self._refuse(sender, to, why)
        return sender, parse_control(body.decode(errors="replace"))

    def _refuse(self, sender: str, to: str, why: str) -> tuple[str, Control] | None:
        log.warning("admission_refused", via="control", sender=sender, to=to, why=why)
        return None
