"""The package's logger and its once-per-reason warnings (a fallback or a choice is said once, not per call)."""

from __future__ import annotations

import logging

logger = logging.getLogger("vivit_kernels")
_said: set[str] = set()


def log_once(key: str, message: str, *args) -> None:
    """``logger.warning(message, *args)`` the first time ``key`` is seen in this process."""
    if key not in _said:
        _said.add(key)
        logger.warning(message, *args)


def forget_said() -> None:
    """Let every message be said again (tests)."""
    _said.clear()
