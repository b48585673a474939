"""Fidelity of PRISM on real weights: scripts that measure it (see docs/fidelity.md)."""
