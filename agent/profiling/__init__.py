"""Measuring performance maps: loopback ranks on this box, or through running agents."""
