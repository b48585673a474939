"""Cluster admission: an HMAC proof, with timestamp and nonce, on everything that admits a peer.

A cluster secret (a file only the agent can read) keys HMAC-SHA256 over a canonical form
of the fields. mDNS adverts, the retained health (which carries model fingerprints) and
every GLOO-group control message are signed; anything without a valid, fresh proof is
ignored and logged, never admitted. Without a secret the agent runs open and says so.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from pathlib import Path

from agent.node.config import ConfigError

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


class Admission:
    """Signs and verifies field sets for one cluster."""

    def __init__(self, secret: bytes | None, cluster: str, max_age_s: float = 120.0) -> None:
        self._secret = secret
        self.cluster = cluster
        self.max_age_s = max_age_s

    @property
    def open(self) -> bool:
        """True when no secret is set: everyone is admitted."""
        return self._secret is None

    def _mac(self, fields: Mapping[str, str]) -> str:
        assert self._secret is not None
        body = "\n".join(f"{k}={fields[k]}" for k in sorted(fields) if k != "proof")
        return hmac.new(self._secret, f"{self.cluster}\n{body}".encode(), hashlib.sha256).hexdigest()

    def sign(self, fields: Mapping[str, str], now_s: float) -> dict[str, str]:
        """``fields`` plus ts, nonce and proof (unchanged when open)."""
        out = {k: str(v) for k, v in fields.items()}
        if self.open:
            return out
        out["ts"] = f"{now_s:.3f}"
        out["nonce"] = secrets.token_hex(8)
        out["proof"] = self._mac(out)
        return out

    def verify(self, fields: Mapping[str, str], now_s: float, max_age_s: float | None = None) -> bool:
        """True for a valid proof no older than ``max_age_s`` (always True when open)."""
        if self.open:
            return True
        proof = fields.get("proof")
        try:
            age = now_s - float(fields.get("ts", "nan"))
        except ValueError:
            return False
        limit = self.max_age_s if max_age_s is None else max_age_s
        if not isinstance(proof, str) or not -5.0 <= age <= limit:
            return False
        return hmac.compare_digest(proof, self._mac({k: str(v) for k, v in fields.items()}))
