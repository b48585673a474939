"""The namespace test bed lives in :mod:`testbed.bed` (also ``prism-agent testbed``);
the tests import it from here."""

from __future__ import annotations

import pytest

from testbed.bed import Testbed, TestbedError, Watch, netns_unavailable, rss_kib, sh

__all__ = ["Testbed", "TestbedError", "Watch", "netns_unavailable", "require_netns", "rss_kib", "sh"]


def require_netns() -> None:
    """Skip the calling test (or fixture) with the reason when no namespace bed can run here."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"namespace test bed unavailable: {reason}")
