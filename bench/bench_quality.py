"""Quality on the demo's pretrained base (and a larger one): how far apart settings are, how much they move.

Four tables, each its own section of bench/QUALITY.md (a run rewrites only its own):
- `spread` (default): held-out perplexity of each pruning setting (SparseGPT, Wanda and magnitude at
  50% and 2:4; Taylor and random structured at ratio 0.5) and of the demo's prune -> align recipe,
  each measured in a fresh process per torch thread count. The spread between thread counts (and
  the gaps between settings) is what sizes the margins of the slow quality tests
  (`tests/loram_core/prune/test_quality.py`, `tests/loram_core/test_steps.py`); the orderings with
  small gaps live here, not in the tests.
- `estimators`: structured 0.65 with each of LLM-Pruner's Taylor estimators and group reductions.
- `sequential`: SparseGPT with and without `prune.true_sequential`.
- `owl`: uniform vs OWL layer-wise sparsity at 50/60/70% unstructured, per model (`--models`).

    nice -n 10 .venv/bin/python bench/bench_quality.py                 # threads 1 2 4 -> bench/QUALITY.md
    .venv/bin/python bench/bench_quality.py --threads 1 2 --align-steps 100 --out /tmp/q.md
    nice -n 10 .venv/bin/python bench/bench_quality.py --table estimators
    nice -n 10 .venv/bin/python bench/bench_quality.py --table owl --models demo larger
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench._models`, `bench._quality_tables`

# name -> PruneConfig fields; calibration: the first 32 training blocks, as the tests use.
SETTINGS: dict[str, dict] = {
    "sparsegpt 50%": dict(strategy="unstructured", ratio=0.5, sparse_method="sparsegpt"),
    "wanda 50%": dict(strategy="unstructured", ratio=0.5, sparse_method="wanda"),
    "magnitude 50%": dict(strategy="unstructured", ratio=0.5, sparse_method="magnitude"),
    "sparsegpt 2:4": dict(strategy="semi", sparse_method="sparsegpt"),
    "wanda 2:4": dict(strategy="semi", sparse_method="wanda"),
    "magnitude 2:4": dict(strategy="semi", sparse_method="magnitude"),
    "taylor structured 0.5": dict(strategy="structured", ratio=0.5, keep_first=1, keep_last=1),
    "random structured 0.5": dict(strategy="random", ratio=0.5, keep_first=1, keep_last=1),
}
# (better, worse): the orderings the tests could claim; the report gives each one's gap.
ORDERINGS = [
    ("sparsegpt 50%", "magnitude 50%"),
    ("sparsegpt 50%", "wanda 50%"),
    ("sparsegpt 2:4", "magnitude 2:4"),
    ("sparsegpt 2:4", "wanda 2:4"),
    ("taylor structured 0.5", "random structured 0.5"),
    ("aligned", "pruned (demo recipe)"),
    ("original", "pruned (demo recipe)"),
]


def child(threads: int, align_steps: int, base_dir: str | None = None) -> dict[str, float]:
    """Every perplexity, in this process, with `threads` torch threads (on `base_dir` if given)."""
    import torch

    torch.set_num_threads(threads)
    from loram_core import steps
    from loram_core.config import PruneConfig, load_config
    from loram_core.data import load_blocks
    from loram_core.evaluate import perplexity
    from loram_core.models import load_model
    from loram_core.prune import prune_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    overrides = [f"workdir={work}", f"align.steps={max(1, align_steps)}"] + (
        [f"base.source={base_dir}"] if base_dir else []
    )
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    base = steps.prepare_base(cfg)
    blocks_file = steps.prepare_corpus(cfg, base)
    blocks = load_blocks(blocks_file)
    ppl = {"original": perplexity(load_model(base), blocks.heldout)}
    for name, fields in SETTINGS.items():
        out = work / name.replace(" ", "-").replace(":", "_").replace("%", "")
        prune_checkpoint(base, out, PruneConfig(calib_samples=32, **fields), blocks.train[:32])
        ppl[name] = perplexity(load_model(out), blocks.heldout)
    if align_steps:
        pruned = steps.prune(cfg.prune, cfg.context, base, steps.prepare_calibration(cfg, base, blocks_file))
        aligned = steps.align(cfg.align, cfg.context, pruned, blocks_file)
        ppl["pruned (demo recipe)"] = perplexity(load_model(pruned), blocks.heldout)
        ppl["aligned"] = perplexity(load_model(aligned), blocks.heldout)
    return ppl


def report(
    runs: dict[int, dict[str, float]], align_steps: int, seconds: float, base: str | None = None
) -> str:
    """A markdown report: perplexities per thread count, their spread, and the gap of each ordering."""
    threads = sorted(runs)
    names = list(runs[threads[0]])
    lines = [
        "## Perplexities of pruning settings, their spread over thread counts, gaps between settings",
        "",
        "```",
        " ".join(["nice -n 10 .venv/bin/python bench/bench_quality.py", *sys.argv[1:]]),
        "```",
        "",
        f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), one fresh process per thread count; "
        f"{seconds / 60:.1f} min in all.",
        f"- model: {f'`{base}` (demo shape and tokenizer)' if base else 'the demo pretrained base'} "
        "(`configs/demo.yaml`), held-out ppl over its 32 held-out blocks "
        "of 128 tokens; pruning settings calibrated on the first 32 training blocks; the demo recipe is "
        f"random structured 0.65 on layers 1-4, then {align_steps} alignment steps"
        + (" (not run)." if not align_steps else "."),
        "",
        "| setting | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads) + " | spread |",
        "|---|" + "---:|" * (len(threads) + 1),
    ]
    for name in names:
        vals = [runs[t][name] for t in threads]
        lines.append(
            f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {max(vals) - min(vals):.4f} |"
        )
    lines += [
        "",
        "Orderings: the smallest gap over the thread counts, as a ratio `worse / better - 1`, beside the "
        "largest spread of the two settings over thread counts (relative).",
        "",
        "| better | worse | smallest gap | largest relative spread |",
        "|---|---|---:|---:|",
    ]
    for better, worse in ORDERINGS:
        if worse not in runs[threads[0]]:
            continue
        gap = min(runs[t][worse] / runs[t][better] - 1 for t in threads)
        spread = max(
            (max(runs[t][n] for t in threads) - min(runs[t][n] for t in threads))
            / min(runs[t][n] for t in threads)
            for n in (better, worse)
        )
        lines.append(f"| {better} | {worse} | {100 * gap:+.2f}% | {100 * spread:.5f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--align-steps",
        type=int,
        default=200,
        help="the demo's (and the slow test's) alignment steps; 0: pruning only",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "QUALITY.md")
    parser.add_argument(
        "--base", help="another base checkpoint of the demo's shape and tokenizer (default: the demo's)"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: one thread count
    parser.add_argument(
        "--table",
        choices=["spread", "estimators", "sequential", "owl"],
        default="spread",
        help="spread: settings x thread counts (the default); the others run once, at --threads[0]",
    )
    parser.add_argument("--models", nargs="+", default=["demo"], help="bench/_models.py names (demo, larger)")
    parser.add_argument("--calib", type=int, default=32, help="calibration blocks (training blocks)")
    parser.add_argument(
        "--calib-start", type=int, default=0, help="first calibration block; >0 writes a section of its own"
    )
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    args = parser.parse_args()
    if args.table != "spread":
        import torch

        from bench._quality_tables import run

        torch.set_num_threads(args.threads[0])
        run(args.table, args.models, args.calib, args.out, args.owl_m, args.owl_lambda, args.calib_start)
        return
    if args.child is not None:
        print(json.dumps(child(args.child, args.align_steps, args.base)))
        return
    start, runs = time.time(), {}
    for t in args.threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
        cmd = [sys.executable, __file__, "--child", str(t), "--align-steps", str(args.align_steps)]
        cmd += ["--base", args.base] if args.base else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"threads={t} failed:\n{proc.stderr}")
        out = proc.stdout
        runs[t] = json.loads(out.strip().splitlines()[-1])
        print(f"threads={t}: {runs[t]}", flush=True)
    text = report(runs, args.align_steps, time.time() - start, args.base)
    from bench._quality_tables import write_section

    write_section(args.out, "spread", text)
    print(text)


if __name__ == "__main__":
    main()
