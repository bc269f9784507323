"""What a publisher watches while a step runs: one live markdown artifact per step (the step card),
a progress bar, a loss curve, steady log lines, and the CLI's listeners.

The step card (`step-<name>`) is made when the step starts and updated in place: step/total,
loss, tokens/s, MFU, elapsed and ETA, device and memory; at the end it says how long the step took,
or that its output was reused. Events may come from other threads (the upload's workers): every
artifact call runs in the task's own Prefect context (captured when the step starts), one at a
time, so artifacts belong to the task run and the counters never go backwards.
"""

from __future__ import annotations

import contextvars
import logging
import math
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.logging import get_run_logger

from loram_core.report import format_bytes

# The loss curve is redrawn at least this often (and every 10% of the run, and at the end); the
# step card at most every CARD_EVERY_S (and at every 1% and at the end).
CURVE_EVERY_S = 30.0
CARD_EVERY_S = 2.0

# The CLI registers a listener here to draw a rich progress bar: (step name, done, total, fields).
LISTENERS: list[Callable[[str, int, int, dict], None]] = []
# ... and one here to print the steps' notes (step name, sentence): computing where, reused, done.
NOTES: list[Callable[[str, str], None]] = []


def note(step: str, text: str) -> None:
    """Say something about a step in its run's log (the UI) and to the CLI's note listeners."""
    get_run_logger().info("%s: %s", step, text)
    for listener in NOTES:
        listener(step, text)


def throughput(event: dict) -> str:
    """`12,345 tokens/s, MFU 41.2%` from a training progress event ('' when it has neither)."""
    parts = []
    if "tokens_per_s" in event:
        parts.append(f"{event['tokens_per_s']:,.0f} tokens/s")
    if event.get("mfu") is not None:
        parts.append(f"MFU {100 * event['mfu']:.1f}%")
    return ", ".join(parts)


def duration(seconds: float) -> str:
    """`1h 02m`, `3m 05s` or `12.3 s`."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{seconds:.1f} s"


def loss_markdown(
    title: str,
    losses: list[tuple[int, float]],
    heldout: list[tuple[int, float]] | None = None,
    reference: float | None = None,
) -> str:
    """A loss-curve image (inline PNG, which the Prefect UI renders) and the loss table.

    Args:
        title: the curve's title.
        losses: (step, training loss over the log window).
        heldout: (step, held-out loss) points.
        reference: the original model's held-out loss on the same blocks (a horizontal line).
    """
    from loram_core.plots import loss_curve_png, png_data_uri  # matplotlib loads when a curve is drawn

    held = dict(heldout or [])
    rows = "\n".join(
        f"| {s} | {loss:.4f} | {held[s]:.4f} |" if s in held else f"| {s} | {loss:.4f} | |"
        for s, loss in losses
    )
    image = png_data_uri(loss_curve_png(losses, title=title, heldout=heldout, reference=reference))
    ref = (
        f"\n\nThe dashed line is the original model's held-out loss ({reference:.4f}) on the blocks the "
        "held-out points are scored on."
        if reference is not None
        else ""
    )
    return (
        f"## {title}\n\n![loss curve]({image}){ref}\n\n| step | training loss | held-out loss |\n"
        f"|---:|---:|---:|\n{rows}\n"
    )


def memory_line(device: str) -> str:
    """Peak memory of this process: the GPU's (allocated, of its total) on CUDA, else host RSS."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index or 0
            peak = torch.cuda.max_memory_allocated(index)
            total = torch.cuda.get_device_properties(index).total_memory
            return f"{format_bytes(peak)} peak allocated of {format_bytes(total)} (GPU {index})"
    return f"{format_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} peak RSS (host)"


def _cell(text: str) -> str:
    """A table cell the UI renders as text: no pipe, no line break, no leading `-` (a bullet)."""
    text = str(text).replace("|", "/").replace("\n", " ")
    return "−" + text[1:] if text.startswith("-") else text


class StepProgress:
    """Callable handed to `loram_core` steps; receives dicts with at least `step` and `total`.

    `start` makes the step card; every event updates it (throttled) and, from the first event on, a
    progress bar. With `curve_key`, events carrying a `loss` (and `heldout_loss`) are collected into
    one markdown artifact under that key, made at the first loss and then updated in place (every
    10% of the run or `CURVE_EVERY_S`, and at the end). `finish` closes the card.
    """

    def __init__(
        self,
        name: str,
        description: str,
        curve_key: str | None = None,
        device: str = "",
        reference: float | None = None,
        counting: str = "step",
    ) -> None:
        self.name = name
        self.counting = counting  # what `step` counts, for the card: optimizer steps, layers, MiB sent
        self.description = description
        self.device = device
        self.reference = reference
        self.logger = get_run_logger()
        self.context = contextvars.copy_context()  # the task's run context, for calls from other threads
        self.lock = threading.Lock()
        self.artifact: UUID | None = None
        self.card: UUID | None = None
        self.last_pct = -1.0
        self.curve_key = curve_key
        self.curve: UUID | None = None
        self.losses: list[tuple[int, float]] = []
        self.heldout: list[tuple[int, float]] = []
        self.last_curve_pct = 0.0
        self.last_curve_t = 0.0
        self.last_card_t = 0.0
        self.last_card_pct = -1.0
        self.t0 = time.monotonic()
        self.done = 0
        self.total = 0
        self.last: dict = {}

    def start(self) -> None:
        """Make the step card (the step is running on `device`)."""
        with self.lock:
            self.t0 = time.monotonic()
            self.context.run(self._card, "running")

    def finish(self, reused: str | None = None) -> None:
        """Close the step card: how long it took, or that its output (`reused`) was reused."""
        with self.lock:
            if not reused and self.total and self.done < self.total:
                self.done = self.total  # a finished step did all of it (a byte count may round below)
                for listener in LISTENERS:
                    listener(self.name, self.total, self.total, {**self.last, "step": self.total})
            self.context.run(self._card, "reused" if reused else "done", reused)

    def __call__(self, event: dict) -> None:
        with self.lock:
            self.context.run(self._event, event)

    def _event(self, event: dict) -> None:
        done, total = event["step"], event["total"]
        if total == self.total and done < self.done:  # threads report out of order: never backwards
            return
        self.done, self.total, self.last = done, total, event
        pct = 100.0 * done / total if total else 100.0
        if self.artifact is None:
            self.artifact = create_progress_artifact(progress=pct, description=self.description)
            self.last_pct = pct
        elif pct - self.last_pct >= 1.0 or done == total:  # keep the API traffic bounded
            update_progress_artifact(self.artifact, pct)
            self.last_pct = pct
        if "heldout_loss" in event:
            self.heldout.append((done, event["heldout_loss"]))
        if self.curve_key is not None and "loss" in event:
            self.losses.append((done, event["loss"]))
            due = pct - self.last_curve_pct >= 10.0 or time.monotonic() - self.last_curve_t >= CURVE_EVERY_S
            if self.curve is None or due or done == total or "heldout_loss" in event:
                self._publish_curve(f"{self.description}: loss, step {done}/{total}", throughput(event))
                self.last_curve_pct, self.last_curve_t = pct, time.monotonic()
        now = time.monotonic()
        if pct - self.last_card_pct >= 1.0 and now - self.last_card_t >= CARD_EVERY_S or done == total:
            self._card("running")
        details = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in event.items()
            if k not in ("step", "total")
        )
        self.logger.info("%s %d/%d %s", self.name, done, total, details)
        for listener in LISTENERS:
            listener(self.name, done, total, event)

    def card_markdown(self, state: str, reused: str | None = None) -> str:
        """The step card: what the step is doing now (or what it did), as a two-column table."""
        elapsed = time.monotonic() - self.t0
        e = self.last
        rows: list[tuple[str, str]] = [("state", state)]
        if state == "reused":
            rows.append(("output", f"`{reused}` (finished earlier with the same inputs and settings)"))
        if self.total:
            rows.append(
                (self.counting, f"{self.done:,} / {self.total:,} ({100 * self.done / self.total:.0f}%)")
            )
        if e.get("what") and e["what"] != self.name:
            rows.append(("phase", str(e["what"])))
        if "loss" in e:
            rows.append(("training loss", f"{e['loss']:.4f}"))
        if self.heldout:
            step, loss = self.heldout[-1]
            rows.append(("held-out loss", f"{loss:.4f} at step {step:,}"))
        if self.reference is not None:
            rows.append(("original's held-out loss", f"{self.reference:.4f}"))
        if "tokens_per_s" in e:
            rows.append(("tokens/s", f"{e['tokens_per_s']:,.0f}"))
        if "mfu" in e:
            rows.append(("MFU", f"{100 * e['mfu']:.1f}%"))
        elif "tokens_per_s" in e:  # MFU needs the device's peak FLOP/s (known for CUDA GPUs only)
            where = self.device.split(" ")[0] or "this device"
            rows.append(("MFU", f"not measured on {where} (no known peak FLOP/s)"))
        if state != "reused":
            rows.append(("elapsed", duration(elapsed)))
        if state == "running" and 0 < self.done < self.total:
            left = elapsed / self.done * (self.total - self.done)
            at = datetime.fromtimestamp(time.time() + left, timezone.utc).strftime("%H:%M UTC")
            rows.append(("ETA", f"{duration(left)} (about {at})"))
        if self.device:
            rows.append(("device", self.device))
            rows.append(("memory", memory_line(self.device.split(" ")[0])))
        rows.append(("updated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")))
        body = "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows)
        return f"## {self.description}\n\n| quantity | value |\n|---|---|\n{body}\n"

    def _card(self, state: str, reused: str | None = None) -> None:
        markdown = self.card_markdown(state, reused)
        self.last_card_t, self.last_card_pct = time.monotonic(), 100.0 * self.done / max(self.total, 1)
        if self.card is None:
            self.card = create_markdown_artifact(
                key=f"step-{self.name}", markdown=markdown, description=f"{self.description}: live"
            )
        else:
            with get_client(sync_client=True) as client:
                client.update_artifact(self.card, ArtifactUpdate(data=markdown))

    def _publish_curve(self, title: str, note_text: str = "") -> None:
        markdown = loss_markdown(title, self.losses, self.heldout, self.reference)
        if note_text:
            markdown += f"\n{note_text}\n"
        if self.curve is None:
            self.curve = create_markdown_artifact(
                key=self.curve_key, markdown=markdown, description=f"Loss curve of {self.name}"
            )
        else:  # the key's latest version is this artifact, so the key's page follows too
            with get_client(sync_client=True) as client:
                client.update_artifact(self.curve, ArtifactUpdate(data=markdown))


class _ToRunLog(logging.Handler):
    """Hands `loram_core`'s records to the task run's logger, at their own level."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.run_logger = get_run_logger()

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, "%s", record.getMessage())


@contextmanager
def core_logs_to_run_log() -> Iterator[None]:
    """Within the body, `loram_core`'s INFO lines and above (the alignment memory plan, the top-k
    cache's progress, its warnings) go to the task's log (the UI, the console, the run's log file)
    instead of the root logger, which shows warnings only and without the task's name."""
    core = logging.getLogger("loram_core")
    handler, level, propagate = _ToRunLog(), core.level, core.propagate
    core.addHandler(handler)
    core.propagate = False
    if core.getEffectiveLevel() > logging.INFO:
        core.setLevel(logging.INFO)
    try:
        yield
    finally:
        core.removeHandler(handler)
        core.setLevel(level)
        core.propagate = propagate


def is_finite(value: float | None) -> bool:
    """A held-out loss worth drawing (not None, inf or nan)."""
    return value is not None and math.isfinite(value)
