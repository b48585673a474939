"""The other nodes: peers, discovery, admission, health, GLOO groups and link probes."""
