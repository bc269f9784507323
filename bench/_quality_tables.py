"""The `estimators`, `sequential` and `owl` tables of bench/bench_quality.py (one process, one thread count).

Every setting prunes a bench model (`bench/_models.py`) with `prune_checkpoint`, calibrated on the
first `calib` training blocks, and is scored by held-out perplexity (`loram_core.evaluate`) on the
model's held-out blocks, as `make demo` scores it.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ESTIMATORS = ["param_first", "vector", "param_second", "param_mix"]
REDUCTIONS = ["sum", "mean", "max", "prod", "first"]
OWL_RATIOS = [0.5, 0.6, 0.7]


class Bench:
    """One bench model, its blocks, and a perplexity for each pruning setting (cached per run)."""

    def __init__(self, model: str, calib: int, calib_start: int = 0) -> None:
        from bench._models import prepare
        from loram_core.data import load_blocks
        from loram_core.evaluate import perplexity
        from loram_core.models import load_model

        self.work = Path(tempfile.mkdtemp(prefix=f"bench-quality-{model}-"))
        self.model, self.calib, self.calib_start = model, calib, calib_start
        self.base, blocks_file = prepare(model, self.work)
        self.blocks = load_blocks(blocks_file)
        self.original = perplexity(load_model(self.base), self.blocks.heldout)
        self.loram: dict[str, dict] = {}

    def ppl(self, name: str, **fields) -> float:
        """Prune with `PruneConfig(**fields)`, score the result; its config's `loram` section is kept."""
        import shutil

        from loram_core.config import PruneConfig
        from loram_core.evaluate import perplexity
        from loram_core.models import load_model
        from loram_core.prune import prune_checkpoint

        out = self.work / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
        cfg = PruneConfig(calib_samples=self.calib, **fields)
        prune_checkpoint(self.base, out, cfg, self.calib_blocks())
        model = load_model(out)
        self.loram[name] = dict(model.config.loram)
        value = perplexity(model, self.blocks.heldout)
        shutil.rmtree(out)
        print(f"{self.model} {name}: {value:.4f}", flush=True)
        return value

    def calib_blocks(self):
        """The calibration blocks: `calib` training blocks from `calib_start`."""
        return self.blocks.train[self.calib_start : self.calib_start + self.calib]

    def describe(self) -> str:
        blocks = self.blocks.heldout
        return (
            f"`{self.model}` base (`bench/_models.py`), dense held-out ppl {self.original:.4f} over "
            f"{blocks.shape[0]} held-out blocks of {blocks.shape[1]} tokens; calibration: training blocks "
            f"{self.calib_start}..{self.calib_start + self.calib - 1}"
        )


def _header(title: str, argv: list[str], seconds: float, lines: list[str]) -> list[str]:
    import torch

    return [
        f"## {title}",
        "",
        "```",
        " ".join(["nice -n 10 .venv/bin/python bench/bench_quality.py", *argv]),
        "```",
        "",
        f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}, {platform.processor() or 'cpu'}), "
        f"{torch.get_num_threads()} torch threads, shared with other jobs; {seconds / 60:.1f} min in all.",
        *lines,
        "",
    ]


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}"


def _second_order_share(bench: Bench, layers: range) -> float:
    """Sum of LLM-Pruner's second-order term `|W acc W| / 2` over the first `|W g|`, over `layers` (MLP groups)."""
    from loram_core.models import load_model
    from loram_core.prune.taylor import taylor_group_scores

    calib = bench.calib_blocks()
    first = taylor_group_scores(load_model(bench.base), layers, calib, "param_first")
    second = taylor_group_scores(load_model(bench.base), layers, calib, "param_second")
    return sum(second[i][0].sum().item() / 2 for i in layers) / sum(first[i][0].sum().item() for i in layers)


def estimators_table(bench: Bench, argv: list[str]) -> str:
    """Structured 0.65 on layers 1..L-2: a row per Taylor estimator, a column per group reduction."""
    start = time.time()
    common = dict(strategy="structured", ratio=0.65, keep_first=1, keep_last=1)
    grid = {
        (e, r): bench.ppl(f"{e} {r}", importance=e, group_reduction=r, **common)
        for e in ESTIMATORS
        for r in REDUCTIONS
    }
    random_ppl = bench.ppl("random", strategy="random", ratio=0.65, keep_first=1, keep_last=1)
    best = min(grid, key=grid.get)
    pruned = bench.loram["random"]["pruned_layers"]
    share = _second_order_share(bench, range(pruned[0], pruned[-1] + 1))
    lines = _header(
        "LLM-Pruner's estimators and group reductions (structured 0.65)",
        argv,
        time.time() - start,
        [
            f"- model: {bench.describe()}; structured 0.65 on layers {_span(bench.loram['random']['pruned_layers'])}"
            " (keep_first 1, keep_last 1, as `configs/demo.yaml`), no alignment.",
            f"- references: dense {bench.original:.4f}, random structured 0.65 (seed 0) {random_ppl:.4f}. "
            f"Best: `{best[0]}` with `{best[1]}`, {grid[best]:.4f}.",
            "- `sum` and `mean` rank alike (every group has the same members). On this base the second-order "
            f"term is {share:.1e} of the first (sum over the pruned layers of `|W acc W| / 2` over `|W g|`), "
            "so `param_mix` keeps what `param_first` keeps.",
        ],
    )
    lines += ["| estimator | " + " | ".join(REDUCTIONS) + " |", "|---|" + "---:|" * len(REDUCTIONS)]
    for e in ESTIMATORS:
        lines.append(f"| `{e}` | " + " | ".join(f"{grid[e, r]:.4f}" for r in REDUCTIONS) + " |")
    return "\n".join(lines) + "\n"


def sequential_table(benches: list[Bench], argv: list[str]) -> str:
    """SparseGPT per setting with and without true-sequential, per model."""
    start = time.time()
    settings = {
        "unstructured 50%": dict(strategy="unstructured", ratio=0.5),
        "unstructured 70%": dict(strategy="unstructured", ratio=0.7),
        "2:4": dict(strategy="semi"),
    }
    rows = []
    for bench in benches:
        for name, fields in settings.items():
            plain = bench.ppl(f"sparsegpt {name}", **fields)
            seq = bench.ppl(f"sparsegpt {name} true-sequential", true_sequential=True, **fields)
            rows.append(
                f"| {bench.model} | {name} | {plain:.4f} | {seq:.4f} | {100 * (seq / plain - 1):+.2f}% |"
            )
    lines = _header(
        "SparseGPT: true-sequential vs the default (all linears of a layer on its dense inputs)",
        argv,
        time.time() - start,
        [f"- model: {b.describe()}; every decoder layer pruned." for b in benches],
    )
    lines += ["| model | setting | default | true-sequential | change |", "|---|---|---:|---:|---:|", *rows]
    return "\n".join(lines) + "\n"


def owl_table(benches: list[Bench], argv: list[str], m: float, lam: float) -> str:
    """Uniform vs OWL at 50/60/70% unstructured, SparseGPT and Wanda, per model; OWL's 70% ratios."""
    start = time.time()
    rows, notes = [], []
    for bench in benches:
        for ratio in OWL_RATIOS:
            cells = []
            for method in ("sparsegpt", "wanda"):
                fields = dict(strategy="unstructured", ratio=ratio, sparse_method=method)
                uniform = bench.ppl(f"{method} {ratio} uniform", **fields)
                owl = bench.ppl(f"{method} {ratio} owl", layerwise="owl", owl_m=m, owl_lambda=lam, **fields)
                cells += [f"{uniform:.4f}", f"{owl:.4f}", f"{100 * (owl / uniform - 1):+.2f}%"]
            rows.append(f"| {bench.model} | {100 * ratio:.0f}% | " + " | ".join(cells) + " |")
        loram = bench.loram[f"sparsegpt {OWL_RATIOS[-1]} owl"]
        notes.append(
            f"- `{bench.model}` at {100 * OWL_RATIOS[-1]:.0f}%: outlier ratios (%) "
            + ", ".join(f"{o:.3f}" for o in loram["owl_outlier_ratios"])
            + "; layer ratios "
            + ", ".join(f"{r:.3f}" for r in loram["layer_ratios"])
        )
    lines = _header(
        f"Uniform vs OWL layer-wise sparsity (OWL M={m:g}, lambda={lam:g})",
        argv,
        time.time() - start,
        [f"- model: {b.describe()}; every decoder layer pruned." for b in benches]
        + ["- OWL's per-layer ratios (layer 0 first), from the dense model's Wanda scores:", *notes],
    )
    lines += [
        "| model | sparsity | SparseGPT uniform | SparseGPT OWL | change | Wanda uniform | Wanda OWL | change |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, key: str, text: str) -> None:
    """Replace the `key` section of `path` (between its markers), or append it."""
    begin, end = f"<!-- section:{key} -->", f"<!-- /section:{key} -->"
    body = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + body + old[old.index(end) + len(end) + 1 :]
    else:
        new = old.rstrip() + "\n\n" + body if old else body
    path.write_text(new)


def run(
    table: str,
    models: list[str],
    calib: int,
    out: Path,
    owl_m: float,
    owl_lambda: float,
    calib_start: int = 0,
) -> None:
    """Make one table and write it into its section of `out` (one per calibration slice)."""
    argv = sys.argv[1:]
    benches = [Bench(m, calib, calib_start) for m in models]
    if table == "estimators":
        text = estimators_table(benches[0], argv)
    elif table == "sequential":
        text = sequential_table(benches, argv)
    else:
        text = owl_table(benches, argv, owl_m, owl_lambda)
    write_section(out, table + (f"-calib{calib_start}" if calib_start else ""), text)
    print(text)
