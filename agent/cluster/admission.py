"""Cluster admission: what the cluster secret protects, and the keys derived from it.

A cluster secret (a file only the agent can read) keys:

- an HMAC-SHA256 proof (under a key derived for it: the raw secret keys nothing itself) over
  a canonical form of the fields (sorted-key JSON: no value can pass for other fields) of
  everything that admits a peer or speaks for a node — mDNS adverts, the retained health (model fingerprints, address,
  probe port) and ``online``/``offline`` status. Every proof carries a timestamp, the
  sender's *boot* (a random id drawn at start, with its boot number, agent/cluster/boots.py)
  and a sequence number counted up over the boot, so receivers refuse replays
  (agent/cluster/freshness.py);
- a key that encrypts and authenticates the body of every group control message
  (AES-GCM; agent/cluster/channel.py), so rendezvous details never travel in clear text;
- a key from which every GLOO run derives its own (transport/sealed.py): what crosses a
  group is encrypted and authenticated end to end.

Without a secret the agent runs open (nothing is signed or encrypted) and says so.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.base.config import ConfigError
from agent.cluster.clock import wall_s
from agent.cluster.skew import ClockSkew

PROOF_FIELDS = ("ts", "nonce", "proof")


def read_secret(path: str | None) -> bytes | None:
    """The secret's bytes (surrounding whitespace dropped), or None when no file is configured."""
    if not path:
        return None
    try:
        data = Path(path).expanduser().read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster secret {path}: {exc.strerror}") from None
    if len(data) < 16:
        raise ConfigError(f"the cluster secret in {path} is too short (use >= 16 random bytes)")
    return data


def derive(secret: bytes, cluster: str, purpose: str) -> bytes:
    """A 32-byte key for one ``purpose`` (HKDF-style: one HMAC of the secret per purpose)."""
    return hmac.new(secret, f"prism-v1\n{cluster}\n{purpose}".encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Signed:
    """Who signed a message, when, and where it falls in their count (from its fields)."""

    node: str
    boot: str
    boot_n: float  # the boot number (older agents: the boot's start time in seconds)
    seq: int
    ts: float  # when it was signed, by the sender's clock


class Admission:
    """Signs and verifies field sets for one node of one cluster."""

    def __init__(
        self,
        secret: bytes | None,
        cluster: str,
        max_age_s: float = 120.0,
        *,
        boot_n: int | None = None,
        max_skew_s: float = 30.0,
    ) -> None:
        self._secret = secret
        self.cluster = cluster
        self._mac_key = derive(secret, cluster, "proof") if secret is not None else b""
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self.boot = secrets.token_hex(8)
        # Counted in the state directory by main() (agent/cluster/boots.py); else the clock in ms.
        self.boot_n = int(wall_s() * 1000) if boot_n is None else boot_n
        self._seq = itertools.count(1)

    @property
    def open(self) -> bool:
        """True when no secret is set: everyone is admitted."""
        return self._secret is None

    def key(self, purpose: str) -> bytes:
        """A key derived from the secret for ``purpose`` (``control``, ``gloo``)."""
        assert self._secret is not None, "open clusters have no keys"
        return derive(self._secret, self.cluster, purpose)

    def next_seq(self) -> int:
        """The next number of this boot's count."""
        return next(self._seq)

    def _mac(self, fields: Mapping[str, str]) -> str:
        assert self._secret is not None
        body = json.dumps({k: v for k, v in fields.items() if k != "proof"}, sort_keys=True, separators=(",", ":"))
        return hmac.new(self._mac_key, body.encode(), hashlib.sha256).hexdigest()

    def sign(self, fields: Mapping[str, str], now_s: float, seq: int | None = None) -> dict[str, str]:
        """``fields`` plus ts, nonce, boot, boot time, sequence and proof (unchanged when open)."""
        out = {k: str(v) for k, v in fields.items()}
        if self.open:
            return out
        out["ts"] = f"{now_s:.3f}"
        out["nonce"] = secrets.token_hex(8)
        out["boot"] = self.boot
        out["bt"] = str(self.boot_n)
        out["seq"] = str(self.next_seq() if seq is None else seq)
        out["proof"] = self._mac(out)
        return out

    def verify(self, fields: Mapping[str, str], now_s: float, max_age_s: float | None = None) -> bool:
        """True for a valid proof no older than ``max_age_s`` (always True when open), clocks
        apart by up to ``max_skew_s`` either way (agent/cluster/skew.py). ``max_age_s`` < 0 skips
        the age check (a Last Will is signed when its connection opens)."""
        if self.open:
            return True
        proof = fields.get("proof")
        try:
            ts = float(fields.get("ts", "nan"))
        except ValueError:
            return False
        limit = self.max_age_s if max_age_s is None else max_age_s
        if ts != ts or not isinstance(proof, str):  # NaN: no time
            return False
        if limit >= 0 and ClockSkew(self.max_skew_s).why_not(ts, now_s, limit) is not None:
            return False
        mac = self._mac({k: str(v) for k, v in fields.items()})
        return hmac.compare_digest(proof.encode("utf-8", "replace"), mac.encode())  # a non-ASCII proof: False

    @staticmethod
    def signer(fields: Mapping[str, str], node: str) -> Signed | None:
        """Boot and sequence of a verified message (None when they are missing or malformed)."""
        try:
            signed = Signed(node, str(fields["boot"]), float(fields["bt"]), int(fields["seq"]), float(fields["ts"]))
        except (KeyError, ValueError):
            return None
        return signed if math.isfinite(signed.boot_n) and math.isfinite(signed.ts) else None
