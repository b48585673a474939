"""Settings: defaults < TOML file < ``PRISM_*`` environment < command-line flags.

Loaded once in ``main()``; nothing here reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.errors import PrismError
from transport.schema import Limits

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib


class ConfigError(PrismError):
    """A setting is missing, malformed or contradictory."""

    code = "config_error"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model this node serves: the name jobs use, where it loads from, its default task."""

    name: str
    source: str
    task: str | None = None
    max_cr: float | None = None  # accuracy floor: the largest CR auto may pick for this model


@dataclass(frozen=True, slots=True)
class Broker:
    """Where the MQTT broker is; ``tls`` for ``mqtts://``."""

    host: str
    port: int = 1883
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a node needs to run."""

    node_id: str
    cluster: str = "default"
    broker: Broker | None = None
    interface: str | None = None
    models: tuple[ModelSpec, ...] = ()
    threads: int = 1
    queue_max: int = 16
    health_interval_s: float = 5.0
    group_timeout_s: float = 10.0
    probe_interval_s: float = 30.0
    secret_file: str | None = None
    device: str = "auto"
    mqtt_username: str | None = None
    mqtt_password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 10.0
    session_expiry_s: int = 300
    log_format: str = "auto"
    map_file: str | None = None
    objective: str = "latency"
    max_cr: float = 10.0
    idle_watts: float = 0.0
    metrics_port: int = 0  # Prometheus endpoint (agent.node.metrics); 0: off
    metrics_address: str = "127.0.0.1"
    limits: Limits = field(default_factory=Limits)

    @property
    def topic_root(self) -> str:
        """``prism/v1/{cluster}``."""
        return f"prism/v1/{self.cluster}"


def mqtt_credentials(settings: Settings) -> tuple[str | None, str | None]:
    """(username, password) for the broker; the password is read from its file."""
    password = None
    if settings.mqtt_password_file:
        try:
            password = Path(settings.mqtt_password_file).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read mqtt_password_file: {exc.strerror}") from None
    return settings.mqtt_username, password


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A client TLS context for ``mqtts://`` brokers (CA and optional client certificate)."""
    if settings.broker is None or not settings.broker.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=settings.tls_ca)
        if settings.tls_cert:
            ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS setup failed: {exc}") from None
    return ctx


def pick_device(setting: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU (a Jetson's integrated one too), else ``cpu``."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting != "cpu" and not setting.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {setting!r}")
    return setting


def parse_broker(url: str) -> Broker:
    """``mqtt://host[:port]`` (or ``host[:port]``) -> Broker."""
    text = url if "://" in url else f"mqtt://{url}"
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"broker must look like mqtt://host:port or mqtts://host:port, got {url!r}")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"broker port is not a number in {url!r}") from None
    return Broker(parts.hostname, port, tls)


def parse_model(text: str) -> ModelSpec:
    """``NAME=SOURCE`` or ``NAME=SOURCE:TASK``; SOURCE is a directory, hub id or built-in."""
    name, sep, source = text.partition("=")
    if not sep or not name.strip() or not source.strip():
        raise ConfigError(f"--model must be NAME=SOURCE, got {text!r}")
    task = None
    if ":" in source and not source.startswith(("/", ".")) and source.rsplit(":", 1)[1].isidentifier():
        source, task = source.rsplit(":", 1)
    return ModelSpec(name.strip(), source.strip(), task)


def _models_from_toml(table: Any) -> list[ModelSpec]:
    if not isinstance(table, dict):
        raise ConfigError("[models] must be a table of NAME = SOURCE")
    out = []
    for name, value in table.items():
        if isinstance(value, str):
            out.append(ModelSpec(name, value))
        elif isinstance(value, dict) and isinstance(value.get("source"), str):
            max_cr = value.get("max_cr")
            if max_cr is not None and (isinstance(max_cr, bool) or not isinstance(max_cr, (int, float)) or max_cr < 1):
                raise ConfigError(f"model {name!r}: max_cr must be a number >= 1, got {max_cr!r}")
            out.append(ModelSpec(name, value["source"], value.get("task"), None if max_cr is None else float(max_cr)))
        else:
            raise ConfigError(f"model {name!r}: give a source string or {{ source = ..., task = ..., max_cr = ... }}")
    return out


_SCALARS: dict[str, type] = {
    "node_id": str,
    "cluster": str,
    "interface": str,
    "threads": int,
    "queue_max": int,
    "health_interval_s": float,
    "group_timeout_s": float,
    "probe_interval_s": float,
    "secret_file": str,
    "device": str,
    "mqtt_username": str,
    "mqtt_password_file": str,
    "tls_ca": str,
    "tls_cert": str,
    "tls_key": str,
    "reconnect_min_s": float,
    "reconnect_max_s": float,
    "session_expiry_s": int,
    "log_format": str,
    "map_file": str,
    "objective": str,
    "max_cr": float,
    "idle_watts": float,
    "metrics_port": int,
    "metrics_address": str,
}


def _coerce(key: str, value: Any) -> Any:
    kind = _SCALARS[key]
    try:
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {key!r} must be {kind.__name__}, got {value!r}") from None


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers and validate. ``overrides`` come from the command line."""
    values: dict[str, Any] = {}
    models: dict[str, ModelSpec] = {}
    limits: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {config_file} is not valid TOML: {exc}") from None
        for key, value in data.items():
            if key in _SCALARS:
                values[key] = _coerce(key, value)
            elif key == "broker":
                values["broker"] = parse_broker(str(value))
            elif key == "models":
                models.update({m.name: m for m in _models_from_toml(value)})
            elif key == "limits" and isinstance(value, dict):
                limits.update(value)
            else:
                raise ConfigError(f"unknown setting {key!r} in {config_file}")
    for key, value in (env or {}).items():
        if not key.startswith("PRISM_"):
            continue
        name = key.removeprefix("PRISM_").lower()
        if name in _SCALARS:
            values[name] = _coerce(name, value)
        elif name == "broker":
            values["broker"] = parse_broker(value)
        elif name == "models":
            models.update({m.name: m for m in (parse_model(t) for t in value.split(",") if t.strip())})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "broker":
            values["broker"] = parse_broker(value)
        elif key == "models":
            models.update({m.name: m for m in (parse_model(t) for t in value)})
        elif key in _SCALARS:
            values[key] = _coerce(key, value)
    values.setdefault("node_id", socket.gethostname())
    try:
        settings = Settings(models=tuple(models.values()), limits=Limits(**limits), **values)
    except TypeError as exc:
        raise ConfigError(f"bad [limits]: {exc}") from None
    return _validated(settings)


def _validated(s: Settings) -> Settings:
    for name, value in (("node_id", s.node_id), ("cluster", s.cluster)):
        if not value or any(c in value for c in "/+#") or len(value) > 64:
            raise ConfigError(f"{name} must be 1-64 characters without / + #, got {value!r}")
    if s.threads < 1 or s.queue_max < 1:
        raise ConfigError("threads and queue_max must be >= 1")
    if s.log_format not in ("auto", "json", "console"):
        raise ConfigError(f"log_format must be auto, json or console, got {s.log_format!r}")
    if s.objective not in ("latency", "energy"):
        raise ConfigError(f"objective must be latency or energy, got {s.objective!r}")
    if s.max_cr < 1 or s.idle_watts < 0:
        raise ConfigError("max_cr must be >= 1 and idle_watts >= 0")
    if not 0 < s.reconnect_min_s <= s.reconnect_max_s:
        raise ConfigError("need 0 < reconnect_min_s <= reconnect_max_s")
    if not 0 <= s.metrics_port <= 65535:
        raise ConfigError(f"metrics_port must be 0 (off) to 65535, got {s.metrics_port}")
    if not 0 <= s.session_expiry_s <= 0xFFFFFFFF:
        raise ConfigError("session_expiry_s must be between 0 and 4294967295")
    for limit in dataclasses.fields(s.limits):
        if getattr(s.limits, limit.name) < 1:
            raise ConfigError(f"limit {limit.name} must be >= 1")
    return s
