"""What `loram` shows on the terminal: only its own lines; everything else goes to the run's log file.

The terminal gets what the CLI prints (progress bars, the steps' notes, the summary, one paragraph
per error) and nothing else. Prefect's own log lines (its temporary server, each task's "Finished
in state Completed()"), the tracebacks Prefect logs for errors the code handles (`LoramError`,
whose message names the bad value and the fix), Python warnings and third-party libraries' log
records go to `<workdir>/logs/run-<time>.log` (`route_console`); the Prefect server (UI) still
receives every run's log lines. What still reaches the terminal: errors that are not handled (a
bug's traceback) and warnings of our own loggers. `--debug` leaves every handler as it was.

Libraries' notices about optional kernels they could not load (bitsandbytes on an AVX512-BF16 CPU
without the `kernels` package) are emitted at import time, before a log file exists: they are held
(`hold_library_notices`) and written to the log file once it is named.
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


class _RunName(logging.Filter):
    """Give each record the task or flow run it belongs to (`run`), as Prefect's console shows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.run = f" | {run}" if run else ""
        return True


class _OursOnly(logging.Filter):
    """What a terminal handler still prints: bugs (errors not handled) and our own loggers' warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_handled(record):
            return False
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and "loram" in record.name


def _terminal_handlers() -> list[logging.Handler]:
    """Every handler of every logger that writes to the terminal (Prefect's console and debug ones)."""
    import sys

    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    found: list[logging.Handler] = []
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            terminal = stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
            if (terminal or type(handler).__name__ == "PrefectConsoleHandler") and handler not in found:
                found.append(handler)
    return found


def route_console(log_file: Path, prefect: bool = True) -> Path:
    """Send every log record and warning to `log_file`; leave on the terminal only `_OursOnly`.

    Args:
        log_file: the run's log file.
        prefect: configure Prefect's logging first (its handlers exist then, and get the filter);
            False for the consumer's commands, which run no flow.

    transformers' own stderr handler is replaced by propagation to the root logger when
    transformers is loaded.

    Returns:
        `log_file` (created when the first record arrives).
    """
    if prefect:
        import prefect.main  # noqa: F401 - configures Prefect's logging (once): our handlers go on top

    for handler in _terminal_handlers():
        handler.addFilter(_OursOnly())
    if not prefect:  # no Prefect console handler: Python's last resort would print warnings to stderr
        logging.getLogger().addHandler(_terminal_fallback())
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file, delay=True)
    file_handler.addFilter(_RunName())
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s%(run)s - %(message)s")
    )
    logging.getLogger().addHandler(file_handler)  # every logger propagates here (Prefect's included)
    logging.captureWarnings(True)  # Python warnings become `py.warnings` records: the file, not the terminal
    _quiet_transformers()
    _HELD.send_to(file_handler)  # the libraries' held notices belong to this run's log too
    return log_file


def _terminal_fallback() -> logging.Handler:
    """A stderr handler that prints only `_OursOnly` records (where no Prefect handler does)."""
    handler = logging.StreamHandler()
    handler.addFilter(_OursOnly())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return handler


def route_tracebacks(log_file: Path) -> Path:
    """The earlier name of `route_console`."""
    return route_console(log_file)


def quiet_progress_bars() -> None:
    """Switch off the libraries' own progress bars (transformers, datasets, huggingface_hub): ours tell
    the story. Loads transformers (call where a command computes)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # a consumer's install may lack datasets
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def _quiet_transformers() -> None:
    """transformers logs through its own stderr handler; send its records to the root logger instead."""
    import sys

    if "transformers" not in sys.modules:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
