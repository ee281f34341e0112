"""Silence one known line of a third-party logger without hiding anything else it says."""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

logger = logging.getLogger(__name__)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.WARNING and self.pattern.search(record.getMessage()):
            self.dropped += 1
            return False
        return True


@contextlib.contextmanager
def drop_log_records(logger_name: str, pattern: str, what: str) -> Iterator[None]:
    """Drop records of ``logger_name`` ("" = root) at WARNING or below whose message matches ``pattern``.

    Errors always pass. The count dropped is logged at debug level as ``what``.
    """
    target = logging.getLogger(logger_name)
    drop = _DropMatching(pattern)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)
        if drop.dropped:
            logger.debug("suppressed %d %s", drop.dropped, what)
