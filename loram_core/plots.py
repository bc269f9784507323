"""Pictures a person compares: loss curves and perplexity bars, rendered to PNG bytes."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve_png(losses: list[tuple[int, float]], title: str = "alignment loss") -> bytes:
    """A line plot of (step, loss) pairs as PNG bytes."""
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps, values = zip(*losses, strict=True) if losses else ((), ())
    ax.plot(steps, values, marker=".", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """Inline a PNG in markdown (the Prefect UI renders data: images in markdown artifacts)."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
