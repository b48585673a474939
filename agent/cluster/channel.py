"""The control channel between agents: typed messages in a signed envelope, one topic per node.

``tell(node, msg)`` publishes ``msg`` (transport/control.py) to ``nodes/{node}/control``;
``open(payload)`` gives back (sender, message) when the envelope is for this node and its
proof is valid and fresh, else None (logged as ``admission_refused``). Without a cluster
secret envelopes are unsigned, and anyone on the broker can speak for any node: that is what
open mode means (README, threat model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import structlog

from agent.cluster.admission import Admission
from transport.control import Control, dump_control, parse_control
from transport.schema import WireError

log = structlog.get_logger("prism.control")
Publish = Callable[[str, bytes], Awaitable[None]]


class ControlChannel:
    """Seals and opens control envelopes for one node."""

    def __init__(self, node: str, admission: Admission, publish: Publish, topic_for: Callable[[str], str]) -> None:
        self.node = node
        self.admission = admission
        self._publish = publish
        self._topic_for = topic_for

    def seal(self, to: str, msg: Control) -> bytes:
        """The envelope bytes of ``msg`` for node ``to``."""
        fields = {"from": self.node, "to": to, "body": dump_control(msg)}
        return json.dumps(self.admission.sign(fields, time.time()), separators=(",", ":")).encode()

    async def tell(self, to: str, msg: Control) -> None:
        """Send ``msg`` to node ``to`` (raises TransportError when not connected)."""
        await self._publish(self._topic_for(to), self.seal(to, msg))

    def open(self, payload: bytes) -> tuple[str, Control] | None:
        """(sender, message) of an envelope for this node; None when refused. Malformed: WireError."""
        try:
            envelope = json.loads(payload)
        except (ValueError, RecursionError):
            raise WireError("control envelope is not JSON") from None
        if not isinstance(envelope, dict) or not all(isinstance(envelope.get(k), str) for k in ("from", "to", "body")):
            raise WireError("control envelope without from, to and body")
        fields = {str(k): str(v) for k, v in envelope.items()}
        if fields["to"] != self.node or not self.admission.verify(fields, time.time()):
            log.warning("admission_refused", via="control", sender=fields["from"][:64], to=fields["to"][:64])
            return None
        return fields["from"], parse_control(fields["body"])
