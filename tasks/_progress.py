"""Progress of long steps: a Prefect progress artifact, steady log lines, a live loss curve and any
console listener."""

from __future__ import annotations

from collections.abc import Callable

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from loram_core.plots import loss_curve_png, png_data_uri

# The CLI registers a listener here to draw a rich progress bar: (step name, done, total, fields).
LISTENERS: list[Callable[[str, int, int, dict], None]] = []


def loss_markdown(title: str, losses: list[tuple[int, float]]) -> str:
    """A loss-curve image (inline PNG, which the Prefect UI renders) and the loss table."""
    table = "\n".join(f"| {s} | {loss:.4f} |" for s, loss in losses)
    image = png_data_uri(loss_curve_png(losses, title=title))
    return f"## {title}\n\n![loss curve]({image})\n\n| step | loss |\n|---|---|\n{table}\n"


class StepProgress:
    """Callable handed to `loram_core` steps; receives dicts with at least `step` and `total`.

    With `curve_key`, events carrying a `loss` are collected and the markdown artifact under that
    key is re-created about ten times per run (Prefect keeps every version and shows the latest),
    so the UI shows the loss curve while training is still going.
    """

    def __init__(self, name: str, description: str, curve_key: str | None = None) -> None:
        self.name = name
        self.description = description
        self.logger = get_run_logger()
        self.artifact = create_progress_artifact(progress=0.0, description=description)
        self.last_pct = -1.0
        self.curve_key = curve_key
        self.losses: list[tuple[int, float]] = []
        self.last_curve_pct = 0.0

    def __call__(self, event: dict) -> None:
        done, total = event["step"], event["total"]
        pct = 100.0 * done / total
        if pct - self.last_pct >= 1.0 or done == total:  # keep the API traffic bounded
            update_progress_artifact(self.artifact, pct)
            self.last_pct = pct
        if self.curve_key is not None and "loss" in event:
            self.losses.append((done, event["loss"]))
            if pct - self.last_curve_pct >= 10.0 or done == total:
                create_markdown_artifact(
                    key=self.curve_key,
                    markdown=loss_markdown(f"{self.description}: loss, step {done}/{total}", self.losses),
                    description=f"Loss curve of {self.name}",
                )
                self.last_curve_pct = pct
        details = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in event.items()
            if k not in ("step", "total")
        )
        self.logger.info("%s %d/%d %s", self.name, done, total, details)
        for listener in LISTENERS:
            listener(self.name, done, total, event)
