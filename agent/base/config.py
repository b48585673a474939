"""Settings: defaults < TOML file < ``PRISM_*`` environment < command-line flags.

Loaded once in ``main()``; nothing here reads the environment at import time. Every value is
validated by pydantic against the type and range written on its field (strictly for the TOML
file, whose values are typed; leniently for the environment, whose values are strings), and a
bad one is a one-line :class:`ConfigError` naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints
from urllib.parse import urlsplit

from pydantic import Field, TypeAdapter, ValidationError

from engine.errors import PrismError
from transport.schema import Limits

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib


class ConfigError(PrismError):
    """A setting is missing, malformed or contradictory."""

    code = "config_error"


Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^/+#\s]+$")]
Fidelity = Annotated[float, Field(gt=0, le=1)]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model this node serves: the name jobs use, where it loads from, its default task."""

    name: str
    source: str
    task: str | None = None
    min_fidelity: float | None = None  # accuracy floor for auto (a cosine vs local), else the node's
    max_new_tokens: int | None = None  # most tokens a generate job may ask of this model, else the node's


@dataclass(frozen=True, slots=True)
class Broker:
    """Where the MQTT broker is; ``tls`` for ``mqtts://``."""

    host: str
    port: int = 1883
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a node needs to run (ranges on each field are checked at load)."""

    node_id: Name
    cluster: Name = "default"
    broker: Broker | None = None
    interface: str | None = None
    models: tuple[ModelSpec, ...] = ()
    threads: Count = 1
    queue_max: Count = 16
    health_interval_s: Annotated[float, Field(ge=0.1, le=3600)] = 5.0
    group_timeout_s: Annotated[float, Field(ge=0.5, le=3600)] = 10.0
    collective_timeout_s: Annotated[float, Field(ge=0.1, le=3600)] = 2.0
    group_idle_s: Annotated[float, Field(ge=1, le=86400)] = 60.0
    peer_silence_s: Annotated[float, Field(ge=1, le=3600)] = 3.0
    probe_interval_s: Annotated[float, Field(ge=0.1, le=86400)] = 30.0
    probe_backoff_s: Annotated[float, Field(ge=1, le=86400)] = 60.0
    mdns_name_check_ms: Annotated[int, Field(ge=50, le=10000)] = 1000
    probe_max_connections: Count = 32
    secret_file: str | None = None
    max_clock_skew_s: Annotated[float, Field(ge=0, le=86400)] = 30.0  # signed times may be this far off, either way
    clock_offset_s: Annotated[float, Field(ge=-1e9, le=1e9)] = 0.0  # a test hook: shifts this agent's wall clock
    device: str = "auto"
    mqtt_username: str | None = None
    mqtt_password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    reconnect_min_s: Positive = 0.2
    # Capped full-jitter backoff: an agent waiting for its broker tries again within 2 s of
    # it appearing, at the cost of about one connection attempt a second per waiting agent.
    reconnect_max_s: Positive = 2.0
    session_expiry_s: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 300
    log_format: Literal["auto", "json", "console"] = "auto"
    map_file: str | None = None
    objective: Literal["latency", "energy"] = "latency"
    min_fidelity: Fidelity = 0.999
    idle_watts: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    state_dir: str | None = None
    journal_sync: Literal["normal", "full"] = "normal"
    journal_max_bytes: Annotated[int, Field(ge=1 << 20)] = 256 << 20
    outbox_max_bytes: Annotated[int, Field(ge=1 << 16)] = 64 << 20
    max_new_tokens: Annotated[int, Field(ge=1, le=100_000)] = 256  # most tokens a generate job may ask for
    kv_cache_max_bytes: Annotated[int, Field(ge=1 << 16)] = 512 << 20  # a generation's K/V cache at most
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0  # Prometheus /metrics; 0: off
    metrics_address: str = "127.0.0.1"
    limits: Limits = field(default_factory=Limits)

    @property
    def topic_root(self) -> str:
        """``prism/v1/{cluster}``."""
        return f"prism/v1/{self.cluster}"

    def state_file(self, kind: str, suffix: str = "") -> Path:
        """Where this node keeps its ``kind`` of state (one file per cluster and node)."""
        base = Path(self.state_dir).expanduser() if self.state_dir else Path.home() / ".local/state/prism-agent"
        return base / f"{kind}-{self.cluster}-{self.node_id}{suffix}"

    def journal_path(self) -> Path:
        """Where this node keeps its job journal."""
        return self.state_file("journal", ".sqlite3")


#: Keys a file or the environment may set, with their validated types.
_FIELDS = {
    f.name: get_type_hints(Settings, include_extras=True)[f.name]
    for f in dataclasses.fields(Settings)
    if f.name not in ("broker", "models", "limits")
}
_LIMITS = Annotated[int, Field(ge=1)]
_RENAMED = {"max_cr": "min_fidelity (a cosine of the output vs local, default 0.999; max_cr is gone)"}


def _check(key: str, kind: Any, value: Any, where: str, *, strict: bool) -> Any:
    try:
        return TypeAdapter(kind).validate_python(value, strict=strict)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"])
        if err["type"] == "string_pattern_mismatch":
            msg = "must be 1-64 characters without / + # or spaces"
        raise ConfigError(f"{key} = {value!r} ({where}): {msg[0].lower()}{msg[1:]}") from None


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


def _models_from_toml(table: Any, where: str) -> list[ModelSpec]:
    if not isinstance(table, dict):
        raise ConfigError(f"[models] must be a table of NAME = SOURCE ({where})")
    out = []
    for name, value in table.items():
        if isinstance(value, str):
            out.append(ModelSpec(name, value))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("source"), str):
            raise ConfigError(f"model {name!r}: give a source string or {{ source = ..., task = ... }} ({where})")
        for key in value:
            if key in _RENAMED:
                raise ConfigError(f"model {name!r}: {key} was replaced by {_RENAMED[key]} ({where})")
            if key not in ("source", "task", "min_fidelity", "max_new_tokens"):
                raise ConfigError(f"model {name!r}: unknown key {key!r} ({where})")
        task = _check(f"models.{name}.task", str | None, value.get("task"), where, strict=True)
        floor = _check(f"models.{name}.min_fidelity", Fidelity | None, value.get("min_fidelity"), where, strict=True)
        cap = _check(f"models.{name}.max_new_tokens", _LIMITS | None, value.get("max_new_tokens"), where, strict=True)
        out.append(ModelSpec(name, value["source"], task, floor, cap))
    return out


def _read_toml(config_file: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(config_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {config_file}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {config_file} is not valid TOML: {exc}") from None


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers and validate. ``overrides`` come from the command line."""
    values: dict[str, Any] = {}
    models: dict[str, ModelSpec] = {}
    limits: dict[str, int] = {}
    if config_file is not None:
        where = str(config_file)
        for key, value in _read_toml(config_file).items():
            if key in _FIELDS:
                values[key] = _check(key, _FIELDS[key], value, where, strict=True)
            elif key == "broker":
                values["broker"] = parse_broker(_check(key, str, value, where, strict=True))
            elif key == "models":
                models.update({m.name: m for m in _models_from_toml(value, where)})
            elif key == "limits" and isinstance(value, dict):
                for name, limit in value.items():
                    if name not in {f.name for f in dataclasses.fields(Limits)}:
                        raise ConfigError(f"unknown limit {name!r} in [limits] ({where})")
                    limits[name] = _check(f"limits.{name}", _LIMITS, limit, where, strict=True)
            elif key in _RENAMED:
                raise ConfigError(f"{key} was replaced by {_RENAMED[key]} ({where})")
            else:
                raise ConfigError(f"unknown setting {key!r} in {where}")
    for key, value in (env or {}).items():
        if not key.startswith("PRISM_"):
            continue
        name = key.removeprefix("PRISM_").lower()
        if name in _FIELDS:
            values[name] = _check(name, _FIELDS[name], value, f"${key}", strict=False)
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
        elif key in _FIELDS:
            values[key] = _check(key, _FIELDS[key], value, f"--{key.replace('_', '-')}", strict=False)
    values.setdefault("node_id", _check("node_id", _FIELDS["node_id"], socket.gethostname(), "hostname", strict=True))
    if "state_dir" not in values and (env or {}).get("STATE_DIRECTORY"):
        values["state_dir"] = (env or {})["STATE_DIRECTORY"].split(":")[0]  # systemd's StateDirectory=
    settings = Settings(models=tuple(models.values()), limits=Limits(**limits), **values)
    if settings.reconnect_min_s > settings.reconnect_max_s:
        raise ConfigError("reconnect_min_s must not be above reconnect_max_s")
    return settings
