"""Progress of long steps: a Prefect progress artifact, steady log lines and any console listener."""

from __future__ import annotations

from collections.abc import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

# The CLI registers a listener here to draw a rich progress bar: (step name, done, total, fields).
LISTENERS: list[Callable[[str, int, int, dict], None]] = []


class StepProgress:
    """Callable handed to `loram_core` steps; receives dicts with at least `step` and `total`."""

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.logger = get_run_logger()
        self.artifact = create_progress_artifact(progress=0.0, description=description)
        self.last_pct = -1.0

    def __call__(self, event: dict) -> None:
        done, total = event["step"], event["total"]
        pct = 100.0 * done / total
        if pct - self.last_pct >= 1.0 or done == total:  # keep the API traffic bounded
            update_progress_artifact(self.artifact, pct)
            self.last_pct = pct
        details = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in event.items()
            if k not in ("step", "total")
        )
        self.logger.info("%s %d/%d %s", self.name, done, total, details)
        for listener in LISTENERS:
            listener(self.name, done, total, event)
