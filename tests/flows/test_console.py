"""What `loram run` keeps off the console: tracebacks of handled errors (they go to the log file)."""

from __future__ import annotations

import logging
import sys

from flows._console import _DropHandled
from loram_core.errors import LoramError


def _record(
    exc: BaseException | None, msg: str = "Task run failed", level: int = logging.ERROR
) -> logging.LogRecord:
    info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
    return logging.LogRecord("prefect.task_runs", level, __file__, 1, msg, None, info)


def test_console_drops_handled_errors_and_keeps_bugs() -> None:
    keep = _DropHandled().filter
    assert not keep(_record(LoramError("bad value; the fix")))
    assert not keep(
        _record(
            None, "Finished in state Failed('Flow run encountered an exception: LoramError: x')", logging.INFO
        )
    )
    assert keep(_record(ValueError("a bug")))  # an unhandled error keeps its traceback on the console
    assert keep(_record(None, "Finished in state Completed()", logging.INFO))
