"""Progress of long steps: a Prefect progress artifact, steady log lines, a live loss curve and any
console listener."""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.logging import get_run_logger

# The loss curve is redrawn at least this often (and every 10% of the run, and at the end).
CURVE_EVERY_S = 30.0

# The CLI registers a listener here to draw a rich progress bar: (step name, done, total, fields).
LISTENERS: list[Callable[[str, int, int, dict], None]] = []


def throughput(event: dict) -> str:
    """`12,345 tokens/s, MFU 41.2%` from a training progress event ('' when it has neither)."""
    parts = []
    if "tokens_per_s" in event:
        parts.append(f"{event['tokens_per_s']:,.0f} tokens/s")
    if event.get("mfu") is not None:
        parts.append(f"MFU {100 * event['mfu']:.1f}%")
    return ", ".join(parts)


def loss_markdown(title: str, losses: list[tuple[int, float]]) -> str:
    """A loss-curve image (inline PNG, which the Prefect UI renders) and the loss table."""
    table = "\n".join(f"| {s} | {loss:.4f} |" for s, loss in losses)
    from loram_core.plots import loss_curve_png, png_data_uri  # matplotlib loads when a curve is drawn

    image = png_data_uri(loss_curve_png(losses, title=title))
    return f"## {title}\n\n![loss curve]({image})\n\n| step | loss |\n|---|---|\n{table}\n"


class StepProgress:
    """Callable handed to `loram_core` steps; receives dicts with at least `step` and `total`.

    The progress artifact is made on the first event, so a step that finds its work done (and
    reports nothing) leaves no progress bar stuck at 0%. With `curve_key`, events carrying a
    `loss` are collected into one markdown artifact under that key, made at the first loss and
    then updated in place (every 10% of the run or `CURVE_EVERY_S`, and at the end): the UI shows
    the curve while training goes, as one artifact per run rather than a version per redraw.
    """

    def __init__(self, name: str, description: str, curve_key: str | None = None) -> None:
        self.name = name
        self.description = description
        self.logger = get_run_logger()
        self.artifact: UUID | None = None
        self.last_pct = -1.0
        self.curve_key = curve_key
        self.curve: UUID | None = None
        self.losses: list[tuple[int, float]] = []
        self.last_curve_pct = 0.0
        self.last_curve_t = 0.0

    def __call__(self, event: dict) -> None:
        done, total = event["step"], event["total"]
        pct = 100.0 * done / total
        if self.artifact is None:
            self.artifact = create_progress_artifact(progress=pct, description=self.description)
            self.last_pct = pct
        elif pct - self.last_pct >= 1.0 or done == total:  # keep the API traffic bounded
            update_progress_artifact(self.artifact, pct)
            self.last_pct = pct
        if self.curve_key is not None and "loss" in event:
            self.losses.append((done, event["loss"]))
            due = pct - self.last_curve_pct >= 10.0 or time.monotonic() - self.last_curve_t >= CURVE_EVERY_S
            if self.curve is None or due or done == total:
                self._publish_curve(f"{self.description}: loss, step {done}/{total}", throughput(event))
                self.last_curve_pct, self.last_curve_t = pct, time.monotonic()
        details = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in event.items()
            if k not in ("step", "total")
        )
        self.logger.info("%s %d/%d %s", self.name, done, total, details)
        for listener in LISTENERS:
            listener(self.name, done, total, event)

    def _publish_curve(self, title: str, note: str = "") -> None:
        markdown = loss_markdown(title, self.losses) + (f"\n{note}\n" if note else "")
        if self.curve is None:
            self.curve = create_markdown_artifact(
                key=self.curve_key, markdown=markdown, description=f"Loss curve of {self.name}"
            )
        else:  # the key's latest version is this artifact, so the key's page follows too
            get_client(sync_client=True).update_artifact(self.curve, ArtifactUpdate(data=markdown))
