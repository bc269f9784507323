"""What `loram run` shows on the terminal around Prefect: a reachable API, one paragraph per handled error.

Prefect logs a failing task's exception with its traceback twice (the task run, then the flow
run) before the CLI gets to print the error. For errors the code handles (`LoramError`, whose
message names the bad value and the fix) those tracebacks only bury the message, so the console
drops them and a log file keeps every record in full; `--debug` shows them on the console again.
The Prefect server (UI) still receives every log line.

Libraries' notices about optional kernels they could not load (bitsandbytes on an AVX512-BF16 CPU
without the `kernels` package) alarm users about packages they never asked for, and change nothing:
the generic path computes the same results. They are held off the terminal and written to the run's
log file (`hold_library_notices`); `--debug` shows them.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from loram_core.errors import LoramError


def api_url() -> str | None:
    """The Prefect API the run would report to (`PREFECT_API_URL` or the active profile), or None."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def check_api_reachable(timeout: float = 5.0) -> None:
    """Refuse a configured Prefect API that does not answer, before any compute.

    Raises:
        LoramError: naming the URL and the two ways out (start the server, or unset the variable).
    """
    import httpx

    url = api_url()
    if not url:
        return  # ephemeral mode: Prefect starts its own temporary server
    try:
        # Any HTTP answer means a server is there (Prefect Cloud answers 401 without the key header);
        # only a transport failure (refused, unresolvable, timed out) is refused here.
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except httpx.TransportError as err:
        raise LoramError(
            f"the Prefect API at PREFECT_API_URL={url} does not answer ({type(err).__name__}: {err}). "
            "Start it (`prefect server start`, or `docker compose up` in docker/) and check the URL, or "
            "unset PREFECT_API_URL to run in Prefect's ephemeral mode (no server needed)."
        ) from None


def _is_handled(record: logging.LogRecord) -> bool:
    """A log record about a `LoramError`: its traceback, or a run's one-line 'Failed' state."""
    if record.exc_info and isinstance(record.exc_info[1], LoramError):
        return True
    message = record.getMessage()
    return "LoramError" in message and "Failed(" in message


class _DropHandled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_handled(record)


# Loggers whose records only say that an optional accelerated kernel is unavailable.
OPTIONAL_KERNEL_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


class _HeldRecords(logging.Handler):
    """Holds records until a log file is named (`route_tracebacks`), then writes them there."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.target: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.target is None:
            self.records.append(record)
        else:
            self.target.handle(record)

    def send_to(self, target: logging.Handler) -> None:
        self.target = target
        for record in self.records:
            target.handle(record)
        self.records.clear()


_HELD = _HeldRecords()


def hold_library_notices(show: bool = False) -> None:
    """Keep optional-kernel notices off the terminal; the run's log file gets them (`show`: leave them be).

    Call before the libraries are imported (they log at import time).
    """
    if show:
        return
    for name in OPTIONAL_KERNEL_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(_HELD)
        logger.propagate = False  # no root handler, nor Python's last-resort stderr printer


def held_library_records() -> list[logging.LogRecord]:
    """The notices held so far and not yet written to a log file."""
    return list(_HELD.records)


def log_file_for(workdir: str | Path) -> Path:
    """Where this run's full log goes: `<workdir>/logs/run-<UTC time>.log`."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(workdir).expanduser() / "logs" / f"run-{stamp}.log"


def route_tracebacks(log_file: Path) -> None:
    """Keep handled errors' tracebacks off the console and write every Prefect record to `log_file`."""
    import prefect.main  # noqa: F401 - configures Prefect's logging (once): our handlers go on top

    console = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    for handler in console:
        handler.addFilter(_DropHandled())
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file, delay=True)
    file_handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    logging.getLogger("prefect").addHandler(file_handler)
    _HELD.send_to(file_handler)  # the libraries' held notices belong to this run's log too
