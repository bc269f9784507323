"""What a published base really weighs: stored parameters and bytes, non-zero weights, reductions.

A structurally pruned checkpoint is smaller as stored. A sparse one (semi, unstructured) keeps the
original shapes and stores its zeros: it is as large as the original on disk and in memory, and
its fewer non-zero weights pay off only where a sparse kernel skips them. The summary keeps those
two reductions apart and names them so. Every byte count is read from the files written (their
sizes, and the tensors' dtypes and shapes in the safetensors headers), never assumed.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from loram_core.report import format_gib

GIB = 2**30


def stored_sizes(model_dir: str | Path, count_nonzero: bool) -> dict[str, int | str]:
    """Parameters and bytes of a checkpoint's safetensors files; non-zero weights when asked.

    Args:
        model_dir: a directory of `*.safetensors` files (one or sharded).
        count_nonzero: read every tensor (one at a time) and count its non-zero values; else the
            non-zero count is the stored count (a dense checkpoint).

    Returns:
        `stored_params`, `stored_bytes` (the files' sizes on disk), `tensor_bytes` (the tensors' data,
        what loading them takes), `stored_dtype` (the floating-point dtypes stored, e.g. `bfloat16`)
        and `nonzero_params`.
    """
    stored = nonzero = size = data = 0
    dtypes: set[str] = set()
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        size += file.stat().st_size
        for entry in _header(file).values():
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
            stored += numel
            begin, end = entry["data_offsets"]
            data += end - begin
            if entry["dtype"] in _FLOAT_NAMES:
                dtypes.add(_FLOAT_NAMES[entry["dtype"]])
        if count_nonzero:
            with safe_open(str(file), "pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    nonzero += int(fh.get_tensor(name).count_nonzero())
    return {
        "stored_params": stored,
        "stored_bytes": size,
        "tensor_bytes": data,
        "stored_dtype": ",".join(sorted(dtypes)),
        "nonzero_params": nonzero if count_nonzero else stored,
    }


_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _header(file: Path) -> dict[str, dict]:
    """A safetensors file's tensor entries (dtype, shape, data_offsets), read from its JSON header."""
    with open(file, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def size_summary(plan: dict, model_dir: str | Path, sparse: bool, nf4_dir: str | Path | None = None) -> dict:
    """The size figures a run reports for its pruned (or aligned) checkpoint.

    Args:
        plan: `loram_core.prune.plan(...).to_dict()` for the run's config (original count, HBM).
        model_dir: the checkpoint that is published.
        sparse: a semi/unstructured base (original shapes, zeros stored).
        nf4_dir: its published 4-bit variant, when one is made: its real footprint is read from it.

    Returns:
        `original_params`, `stored_params`, `stored_bytes`, `tensor_bytes`, `stored_dtype`,
        `nonzero_params`, `reduction` (original / stored: what the checkpoint gives as stored),
        `hbm_gb` (stored parameters at 16 bits, as the paper counts), `hbm_gb_4bit` (the paper's
        QLoRAM accounting, a quarter of that), `hbm_gb_4bit_actual` (the NF4 variant's tensors as
        stored, or the plan's estimate without one; with one, also `nf4_stored_bytes`),
        `pruned_params` and `pruned_layers` from the plan; for sparse bases also
        `sparse_kernel_reduction` (original / non-zero): only a sparse kernel realises it.
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
    if nf4_dir is not None:
        nf4 = stored_sizes(nf4_dir, count_nonzero=False)
        out["hbm_gb_4bit_actual"] = nf4["tensor_bytes"] / GIB
        out["nf4_stored_bytes"] = nf4["stored_bytes"]
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
    dtype = params.get("stored_dtype")
    if "stored_bytes" in params:
        rows.append(
            (f"stored bytes ({dtype} safetensors)" if dtype else "stored bytes", params["stored_bytes"])
        )
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
    sixteen = (
        "memory, 16-bit as stored"
        if dtype in (None, "bfloat16", "float16")
        else f"memory at 16 bits (stored as {dtype})"
    )
    rows += [  # the manifest's hbm_gb* hold GiB; worded in the unit that keeps them readable
        (sixteen, format_gib(params["hbm_gb"])),
        ("memory, 4-bit (QLoRAM accounting: a quarter of 16-bit)", format_gib(params["hbm_gb_4bit"])),
        ("memory, 4-bit as NF4 stores it", format_gib(params["hbm_gb_4bit_actual"])),
    ]
    return rows
