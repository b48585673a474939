"""Transport: GLOO process groups for tensors (MQTT control and link probes come later)."""
