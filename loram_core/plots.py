"""Pictures a person compares: loss curves and perplexity bars, rendered to PNG bytes."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve_png(
    losses: list[tuple[int, float]],
    title: str = "alignment loss",
    heldout: list[tuple[int, float]] | None = None,
    reference: float | None = None,
) -> bytes:
    """A line plot of (step, loss) pairs as PNG bytes.

    Args:
        losses: (step, training loss) pairs.
        title: the plot's title.
        heldout: (step, held-out loss) points, drawn as markers.
        reference: a loss to compare with (the original model's held-out loss): a dashed line, and
            the y-axis spans it, so a small move of the curve does not fill the plot.
    """
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    steps, values = zip(*losses, strict=True) if losses else ((), ())
    ax.plot(steps, values, marker=".", linewidth=1.2, label="training loss (log window mean)")
    if heldout:
        hs, hv = zip(*heldout, strict=True)
        ax.plot(hs, hv, "o", color="tab:orange", label="held-out loss")
    if reference is not None:
        ax.axhline(reference, color="tab:green", linestyle="--", linewidth=1.2, label="original, held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if heldout or reference is not None:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """Inline a PNG in markdown (the Prefect UI renders data: images in markdown artifacts)."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
