"""The MQTT link: one aiomqtt client with birth/Last-Will, TCP_NODELAY and MQTT 5 properties.

Topics live under ``prism/v1/{cluster}/`` (docs/design.md §5.1). The link is an async context
manager; the daemon re-enters a fresh one after a failure, with capped full-jitter
backoff (:func:`backoff_s`), and re-subscribes and re-publishes its birth every time.
With ``session_expiry_s`` the link asks for a persistent MQTT 5 session (clean start off):
the broker keeps its subscriptions and queues QoS 1 messages for it while it is away.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from engine.errors import PrismError

#: CONNACK reason codes that no retry will fix (MQTT 3: 4, 5; MQTT 5: 0x84-0x8C).
AUTH_CODES = {4, 5, 134, 135, 138, 140}
#: PUBACK reason code (MQTT 5): accepted, but no subscription matched, so nobody gets it.
NO_SUBSCRIBERS = 16
#: PUBACK reason codes (MQTT 5) from this one on: the broker refused the message and dropped
#: it (0x87 not authorized: an ACL; 0x90 topic name invalid; 0x97 quota exceeded; ...).
REFUSED = 0x80
_LAST_MID: contextvars.ContextVar[int] = contextvars.ContextVar("prism_last_mid", default=-1)


class TransportError(PrismError):
    """The broker could not be reached or refused us."""

    code = "transport_error"

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one node in one cluster."""

    root: str
    node: str

    @property
    def jobs(self) -> str:
        """Jobs any agent may take."""
        return f"{self.root}/jobs"

    @property
    def shared_jobs(self) -> str:
        """The shared subscription that spreads ``jobs`` over agents."""
        return f"$share/prism/{self.root}/jobs"

    @property
    def my_jobs(self) -> str:
        """Jobs for this node only."""
        return f"{self.root}/nodes/{self.node}/jobs"

    def node_jobs(self, node: str) -> str:
        """Jobs for ``node``."""
        return f"{self.root}/nodes/{node}/jobs"

    def result(self, job_id: str) -> str:
        """Where a result goes when the job set no response topic."""
        return f"{self.root}/results/{job_id}"

    @property
    def status(self) -> str:
        """Retained online/offline."""
        return f"{self.root}/nodes/{self.node}/status"

    @property
    def control(self) -> str:
        """This node's control topic (group formation, runs, teardown)."""
        return f"{self.root}/nodes/{self.node}/control"

    @property
    def health(self) -> str:
        """Retained periodic health."""
        return f"{self.root}/nodes/{self.node}/health"

    @property
    def all_status(self) -> str:
        """Every node's status."""
        return f"{self.root}/nodes/+/status"

    @property
    def all_health(self) -> str:
        """Every node's health."""
        return f"{self.root}/nodes/+/health"


def backoff_s(attempt: int, low_s: float, high_s: float, rng: random.Random | None = None) -> float:
    """Capped full-jitter exponential backoff: uniform(0, min(high, low * 2**attempt))."""
    cap = min(high_s, low_s * (2 ** min(attempt, 30)))
    return (rng or random).uniform(0, cap)


def _nodelay() -> list[tuple[int, int, int]]:
    return [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class _Client(aiomqtt.Client):
    """aiomqtt's client, keeping what it drops: each PUBACK's reason code (by message id)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.puback_codes: dict[int, int] = {}
        paho_publish = self._client.publish

        def publish(*a: Any, **k: Any) -> Any:
            info = paho_publish(*a, **k)
            self.puback_codes.pop(info.mid, None)  # a reused id: forget a stale code
            _LAST_MID.set(info.mid)  # the publishing task's own context: read after the await
            return info

        self._client.publish = publish  # type: ignore[method-assign]

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        code = int(getattr(reason_code, "value", 0) or 0)
        if code:
            self.puback_codes[mid] = code
        super()._on_publish(client, userdata, mid, reason_code, properties)


class MqttLink:
    """A connected client for one node (async context manager)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        will: tuple[str, bytes] | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
        session_expiry_s: int | None = None,
        manual_ack: bool = False,
    ) -> None:
        self.address = f"{host}:{port}"
        will_msg = aiomqtt.Will(will[0], will[1], qos=1, retain=True) if will else None
        connect_props = None
        if session_expiry_s is not None:
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = session_expiry_s
        self._client = _Client(
            host,
            port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will_msg,
            username=username,
            password=password,
            timeout=timeout_s,
            keepalive=30,
            socket_options=_nodelay(),
            tls_context=tls,
            clean_start=session_expiry_s is None,
            properties=connect_props,
        )
        if manual_ack:  # QoS 1 messages are acknowledged by :meth:`ack`, once they are safe
            self._client._client.manual_ack_set(True)

    async def __aenter__(self) -> MqttLink:
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            rc = getattr(exc, "rc", None)
            value = int(getattr(rc, "value", rc or 0))
            message = f"broker refused the connection at {self.address}: {exc}"
            raise TransportError(message, fatal=value in AUTH_CODES) from exc
        except aiomqtt.MqttError as exc:
            raise TransportError(f"cannot reach the broker at {self.address}: {exc}") from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # already gone: nothing left to close
            await self._client.__aexit__(exc_type, exc, tb)

    async def subscribe(self, *topics: str) -> None:
        """Subscribe to ``topics`` at QoS 1."""
        try:
            for topic in topics:
                await self._client.subscribe(topic, qos=1)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"subscribe failed: {exc}") from exc

    async def unsubscribe(self, *topics: str) -> None:
        """Stop receiving ``topics``."""
        try:
            for topic in topics:
                await self._client.unsubscribe(topic)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"unsubscribe failed: {exc}") from exc

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> int:
        """Publish, with MQTT 5 response-topic and correlation properties when given.

        Returns the broker's PUBACK reason code (MQTT 5, QoS 1; else 0): ``NO_SUBSCRIBERS``
        says the broker took the message but nobody will get it.
        """
        props = None
        if response_topic or correlation:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except (aiomqtt.MqttError, ValueError) as exc:
            raise TransportError(f"publish to {topic} failed: {exc}") from exc
        return self._client.puback_codes.pop(_LAST_MID.get(), 0)

    def ack(self, message: aiomqtt.Message) -> None:
        """Acknowledge a QoS 1 message (with ``manual_ack``; a no-op otherwise and for QoS 0)."""
        if message.qos > 0:
            self._client._client.ack(message.mid, message.qos)

    async def messages(self) -> AsyncIterator[aiomqtt.Message]:
        """Incoming messages until the connection drops (then TransportError).

        Messages already read off the socket are handed out before the error (without
        ``manual_ack`` the broker counts them delivered and will not send them again).
        """
        try:
            async for message in self._client.messages:
                yield message
        except aiomqtt.MqttError as exc:
            queue = self._client._queue  # aiomqtt would drop these with the client
            while not queue.empty():
                yield queue.get_nowait()
            raise TransportError(f"connection lost: {exc}") from exc


def reason_name(code: int) -> str:
    """The MQTT 5 name of a PUBACK reason code (``"Not authorized"``), or its number."""
    try:
        return str(ReasonCode(PacketTypes.PUBACK, identifier=code).getName())
    except (KeyError, ValueError):
        return f"reason code {code}"


def transport_error(exc: BaseException) -> TransportError | None:
    """``exc`` itself or the first TransportError inside an exception group, if any."""
    if isinstance(exc, TransportError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = transport_error(inner)
        if found is not None:
            return found
    return None


def reply_route(message: aiomqtt.Message) -> tuple[str | None, bytes | None]:
    """The MQTT 5 response topic and correlation data a request carried, if any."""
    props: Any = message.properties
    topic = getattr(props, "ResponseTopic", None) if props is not None else None
    corr = getattr(props, "CorrelationData", None) if props is not None else None
    if not isinstance(topic, str) or not topic or topic.startswith("$") or "+" in topic or "#" in topic:
        topic = None  # not a topic anyone can publish to: answer on results/{id}
    return topic, corr
