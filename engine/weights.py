"""Weight fingerprints compared (torch-free, so the policy's commands start fast).

``engine.models.fingerprint`` sums a model's parameters into one float; two processes that
loaded the same weights get the same number up to the order floats were summed in.
"""

from __future__ import annotations


def same_weights(a: float, b: float) -> bool:
    """Whether two weight fingerprints name the same weights."""
    return abs(a - b) <= 1e-6 * max(1.0, abs(a))
