"""The terminal every `loram` command writes to: two consoles, the one-paragraph error, the steps'
progress bars and notes, and quieting the libraries where a command computes.

Light (typer and rich only): the heavy libraries load inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)
DTYPES = ("bfloat16", "float16", "float32")


def fail(err: Exception) -> None:
    """Print `err` as one paragraph on stderr and exit with status 2."""
    err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def quiet(debug: bool, command: str) -> None:
    """Libraries' progress bars off; their warnings to a log file unless `--debug` (commands without a run)."""
    if debug:
        return
    from datetime import datetime, timezone

    from loram_core.config import BaseConfig
    from loram_provider.flows._console import quiet_progress_bars, route_console

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    quiet_progress_bars()
    route_console(
        Path(BaseConfig().cache_dir).expanduser() / "logs" / f"{command}-{stamp}.log", prefect=False
    )


@contextmanager
def step_bars(on: Console | None = None) -> Iterator[Any]:
    """A rich progress bar per step that reports progress, and the steps' notes printed above them.

    Args:
        on: the console to draw on (default: stdout's; stderr's where stdout is a command's result).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from loram_provider.tasks import _progress

    bars: dict[str, int] = {}
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=on or console,
    )

    def listen(name: str, done: int, total: int, event: dict) -> None:
        if name not in bars:
            bars[name] = bar.add_task(name, total=total, info="")
        what = event.get("what", name)  # the phase within a step (e.g. taylor, then prune)
        info = f"loss {event['loss']:.3f}" if "loss" in event else ("" if what == name else what)
        if "heldout_loss" in event:
            info += f" (held-out {event['heldout_loss']:.3f})"
        if "tokens_per_s" in event:
            info += f" {_progress.throughput(event)}"
        bar.update(bars[name], completed=done, total=total, info=info)

    def tell(name: str, text: str) -> None:
        bar.console.print(f"{name}: {text}", highlight=False, markup=False, soft_wrap=True)

    _progress.LISTENERS.append(listen)
    _progress.NOTES.append(tell)
    try:
        with bar:
            yield bar
    finally:
        _progress.LISTENERS.remove(listen)
        _progress.NOTES.remove(tell)
