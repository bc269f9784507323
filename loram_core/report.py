"""How measured numbers are worded for people: memory sizes and the alignment's recovery.

Used by the model card, the CLI's summary and the run's summary artifact, so that they agree.
"""

from __future__ import annotations

_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(n_bytes: float) -> str:
    """A byte count in the largest binary unit that keeps it at least 1, with 2 decimals.

    `format_bytes(1.4e6)` is `"1.34 MiB"`; a demo-sized model never prints as "0.00 GiB".
    """
    for unit, size in _UNITS:
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:,.2f} {unit}"
    return f"{n_bytes:,.0f} B"


def format_gib(gib: float) -> str:
    """A size given in GiB (as the manifest's `hbm_gb*` fields hold it), worded by `format_bytes`."""
    return format_bytes(gib * 2**30)


def recovery_sentence(metrics: dict) -> str:
    """What alignment did to the damage pruning caused, in held-out perplexity.

    `recovered` is `(pruned - aligned) / (pruned - original)`: 100% means alignment brought the
    pruned model back to the original's perplexity; above 100% the aligned model beats the original
    (alignment trained it further on this corpus); when pruning did no damage there is
    nothing to recover and no percentage is given.
    """
    original, pruned, aligned = (metrics.get(k) for k in ("original_ppl", "pruned_ppl", "aligned_ppl"))
    if None in (original, pruned, aligned):
        return "alignment recovery: n/a (perplexities not measured)"
    if pruned <= original:
        return (
            f"pruning did no measurable damage (perplexity {original:.2f} -> {pruned:.2f}), so there was "
            f"nothing for alignment to recover; aligned: {aligned:.2f}"
        )
    share = (pruned - aligned) / (pruned - original)
    text = (
        f"alignment recovered {100 * share:.0f}% of the pruning damage (held-out perplexity: original "
        f"{original:.2f}, pruned {pruned:.2f}, aligned {aligned:.2f})"
    )
    if share > 1:
        text += (
            "; above 100% means the aligned model beats the original on this held-out text (alignment "
            "trained it further on this corpus)"
        )
    elif share < 0:
        text += "; below 0%: alignment made the pruned model worse"
    return text
