"""What a published base really weighs: stored parameters and bytes, non-zero weights, reductions.

A structurally pruned checkpoint is smaller as stored. A sparse one (semi, unstructured) keeps the
original shapes and stores its zeros: it is as large as the original on disk and in memory, and
its fewer non-zero weights pay off only where a sparse kernel skips them. The summary keeps those
two reductions apart and names them so.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from loram_core.report import format_gib

GIB = 2**30


def stored_sizes(model_dir: str | Path, count_nonzero: bool) -> dict[str, int]:
    """Parameters and bytes of a checkpoint's safetensors files; non-zero weights when asked.

    Args:
        model_dir: a directory of `*.safetensors` files (one or sharded).
        count_nonzero: read every tensor (one at a time) and count its non-zero values; else the
            non-zero count is the stored count (a dense checkpoint).

    Returns:
        `stored_params`, `stored_bytes` (the files' sizes on disk) and `nonzero_params`.
    """
    stored = nonzero = size = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        size += file.stat().st_size
        with safe_open(str(file), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                shape = fh.get_slice(name).get_shape()
                numel = 1
                for dim in shape:
                    numel *= dim
                stored += numel
                if count_nonzero:
                    nonzero += int(fh.get_tensor(name).count_nonzero())
    return {
        "stored_params": stored,
        "stored_bytes": size,
        "nonzero_params": nonzero if count_nonzero else stored,
    }


def size_summary(plan: dict, model_dir: str | Path, sparse: bool) -> dict:
    """The size figures a run reports for its pruned (or aligned) checkpoint.

    Args:
        plan: `loram_core.prune.plan(...).to_dict()` for the run's config (original count, HBM).
        model_dir: the checkpoint that is published.
        sparse: a semi/unstructured base (original shapes, zeros stored).

    Returns:
        `original_params`, `stored_params`, `stored_bytes`, `nonzero_params`, `reduction`
        (original / stored: what the checkpoint gives as stored), `hbm_gb` (stored parameters at 16
        bits), `hbm_gb_4bit` (the paper's QLoRAM accounting, a quarter of that),
        `hbm_gb_4bit_actual`, `pruned_params` and `pruned_layers` from the plan; for sparse bases
        also `sparse_kernel_reduction` (original / non-zero): only a sparse kernel realises it.
    """
    sizes = stored_sizes(model_dir, count_nonzero=sparse)
    stored = sizes["stored_params"]
    out = {
        "original_params": plan["original_params"],
        "pruned_params": plan["pruned_params"],
        **sizes,
        "reduction": plan["original_params"] / stored,
        "hbm_gb": stored * 2 / GIB,
        "hbm_gb_4bit": stored / 4 * 2 / GIB,
        "hbm_gb_4bit_actual": plan["hbm_gb_4bit_actual"],
        "pruned_layers": plan["pruned_layers"],
    }
    if sparse:
        out["sparse_kernel_reduction"] = plan["original_params"] / sizes["nonzero_params"]
    return out


def _x(value: float) -> str:
    return f"{value:.2f}x"


def size_rows(params: dict) -> list[tuple[str, int | float | str]]:
    """Labelled size rows for the run summary, the CLI and the model card (sparse bases said as such)."""
    sparse = "sparse_kernel_reduction" in params
    rows: list[tuple[str, int | float | str]] = [("original parameters", params["original_params"])]
    if "stored_params" not in params:  # a manifest written before stored sizes were recorded
        return rows + [("pruned parameters", params["pruned_params"]), ("reduction", _x(params["reduction"]))]
    rows.append(
        (
            "stored parameters" + (" (original shapes, zeros stored)" if sparse else ""),
            params["stored_params"],
        )
    )
    if "stored_bytes" in params:
        rows.append(("stored bytes", params["stored_bytes"]))
    if sparse:
        rows.append(("non-zero weights", params["nonzero_params"]))
    rows.append(("reduction as stored", _x(params["reduction"])))
    if sparse:
        rows.append(
            (
                "reduction with a sparse kernel only",
                f"{_x(params['sparse_kernel_reduction'])} (non-zero weights)",
            )
        )
    rows += [  # the manifest's hbm_gb* hold GiB; worded in the unit that keeps them readable
        ("memory, 16-bit as stored", format_gib(params["hbm_gb"])),
        ("memory, 4-bit (QLoRAM accounting: a quarter of 16-bit)", format_gib(params["hbm_gb_4bit"])),
        ("memory, 4-bit as NF4 stores it", format_gib(params["hbm_gb_4bit_actual"])),
    ]
    return rows
