"""The sa_compile logger, logging a message only the first time it comes up, and the skip counters."""

import logging

log = logging.getLogger("sa_compile")
_seen: set[str] = set()


def log_once(level: int, message: str, *args) -> None:
    """Log ``message % args`` at ``level``, the first time that text comes up in the process."""
    text = message % args
    if text not in _seen:
        _seen.add(text)
        log.log(level, text)


def count_skip(reason: str) -> None:
    """Count one attention call left dense in ``counters["sa_compile"]``, and log its reason once."""
    from torch._dynamo.utils import counters

    counters["sa_compile"]["skipped"] += 1
    counters["sa_compile"][f"skipped: {reason}"] += 1
    log_once(logging.WARNING, "sa_compile: SDPA left dense: %s", reason)
