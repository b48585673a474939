"""The node itself: settings, lifecycle, supervision, logs, systemd, energy and load."""
