"""Python 3.10 fallbacks (JetPack 6): task groups and exception groups."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup
    from builtins import BaseExceptionGroup
else:  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup
    from taskgroup import TaskGroup

__all__ = ["BaseExceptionGroup", "TaskGroup"]
