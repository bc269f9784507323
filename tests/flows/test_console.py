"""What `loram run` keeps off the console: tracebacks of handled errors (they go to the log file)."""

from __future__ import annotations

import logging
import sys

from loram_core.errors import LoramError
from loram_provider.flows._console import _DropHandled


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


def test_run_summary_sizes_and_recovery_read_right(monkeypatch, tmp_path) -> None:
    """The demo's NF4 footprint (0.0013 GiB) once printed as "0.00 GB"; a >100% recovery went unexplained."""
    import io

    from rich.console import Console

    import loram_provider.flows.cli as cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=200))
    metrics = {"original_ppl": 60.2, "pruned_ppl": 68.74, "aligned_ppl": 57.0, "aligned_nf4_ppl": 57.5}
    params = {
        "original_params": 1_705_600,
        "pruned_params": 1_223_296,
        "reduction": 1.39,
        "hbm_gb_4bit_actual": 0.0013,
    }
    monkeypatch.chdir(tmp_path)
    cli._print_summary({"uri": "file://./bucket/demo-llama/v1", "metrics": metrics, "params": params})
    text = out.getvalue()
    assert f"publishedfile://{tmp_path.resolve()}/bucket/demo-llama/v1" in "".join(
        text.split()
    )  # title wraps
    assert "1.33 MiB" in text and "GB" not in text and "0.00" not in text
    assert "alignment recovered 137% of the pruning damage" in text and "beats the original" in text
