"""``prism-agent``: the command line, one module per command family."""

from agent.cli.main import main, run

__all__ = ["main", "run"]
