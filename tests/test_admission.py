"""HMAC admission proofs: valid, tampered, stale, wrong secret, open mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.base.config import ConfigError
from agent.cluster.admission import Admission, read_secret

SECRET = b"0123456789abcdef-cluster-secret"


def test_a_signed_advert_verifies_and_any_change_breaks_it() -> None:
    adm = Admission(SECRET, "lab")
    signed = adm.sign({"node": "a", "address": "10.0.0.5", "models": '{"bert": 1.5}'}, now_s=1000.0)
    assert adm.verify(signed, now_s=1010.0)
    assert not adm.verify({**signed, "address": "10.0.0.6"}, now_s=1010.0)
    assert not adm.verify({**signed, "models": '{"bert": 2.5}'}, now_s=1010.0)
    assert not adm.verify({k: v for k, v in signed.items() if k != "proof"}, now_s=1010.0)
    assert adm.verify(signed, now_s=1000.0 + 150.0)  # 120 s old, 30 s of clock skew allowed
    assert not adm.verify(signed, now_s=1000.0 + 151.0)  # stale
    assert adm.verify(signed, now_s=1000.0 - 30.0)  # our clock 30 s behind the signer's
    assert not adm.verify(signed, now_s=1000.0 - 31.0)
    assert not Admission(SECRET, "lab", max_skew_s=5.0).verify(signed, now_s=1000.0 - 6.0)
    assert adm.verify(signed, now_s=1000.0 + 500.0, max_age_s=600.0)


def test_a_value_cannot_pass_for_other_fields_and_a_non_ascii_proof_is_refused() -> None:
    adm = Admission(SECRET, "lab")
    signed = adm.sign({"node": "a\nnodf=x"}, now_s=1000.0)
    assert adm.verify(signed, now_s=1001.0)
    # Under sorted "k=v" lines this value signed the same as two fields, node and nodf.
    assert not adm.verify({**signed, "node": "a", "nodf": "x"}, now_s=1001.0)
    assert not adm.verify({**signed, "proof": "é" * 64}, now_s=1001.0)  # False, not a TypeError


def test_other_secrets_and_other_clusters_are_refused() -> None:
    signed = Admission(SECRET, "lab").sign({"node": "a"}, now_s=0.0)
    assert not Admission(b"another-secret-of-16-bytes", "lab").verify(signed, now_s=1.0)
    assert not Admission(SECRET, "other-lab").verify(signed, now_s=1.0)


def test_open_mode_admits_everyone_and_signs_nothing() -> None:
    adm = Admission(None, "lab")
    assert adm.open
    assert adm.sign({"node": "a"}, now_s=0.0) == {"node": "a"}
    assert adm.verify({"node": "rogue"}, now_s=0.0)


def test_secret_file_rules(tmp_path: Path) -> None:
    good = tmp_path / "secret"
    good.write_bytes(SECRET + b"\n")
    assert read_secret(str(good)) == SECRET
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(ConfigError, match="too short"):
        read_secret(str(short))
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret(str(tmp_path / "missing"))
    assert read_secret(None) is None
