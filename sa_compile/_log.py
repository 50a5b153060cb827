"""The sa_compile logger, and logging a message only the first time it comes up."""

import logging

log = logging.getLogger("sa_compile")
_seen: set[str] = set()


def log_once(level: int, message: str, *args) -> None:
    """Log ``message % args`` at ``level``, the first time that text comes up in the process."""
    text = message % args
    if text not in _seen:
        _seen.add(text)
        log.log(level, text)
