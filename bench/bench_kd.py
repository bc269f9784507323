"""Tokens to target: alignment by next-token loss (`cpt`) vs distillation from the original (`kd`, `cpt+kd`).

For each bench base (`bench/_models.py`: the demo's, the larger one) and pruning (random structured
0.65, SparseGPT 2:4), the pruned model is aligned by each objective for `--steps` optimizer steps
(the demo preset's batch, lr and schedule, warmup scaled to the budget), and its held-out perplexity
is measured after each token budget of that run (`--budgets`, in steps; one run per objective,
evaluated as it goes: the evaluation reads the model between steps and changes nothing of its
training). The model is also saved at a quarter of the budget (mid-schedule: its learning rate
has not decayed, so this is the harder test of "a quarter of the tokens").

Verification (LoRAM's ablation, the `verify` preset's LoRA, no reference row): for `cpt` at the
full budget, `loram_core.verify.run_ablation` (rows original, loram, unaligned); for every other
model, the same ablation's `loram` row alone (a LoRA trained on the aligned base, recovered onto the
original, its task loss there), computed by the ablation's own functions.

Each alignment runs in its own process (one torch thread by default: the box is shared; `--jobs`
at a time), so its peak RSS is its own; wall time per step excludes the evaluations. Results are
kept per run under `--workdir` (a rerun only computes what is missing; pruning and the teacher's
top-k cache are the pipeline's cached steps there too).

    nice -n 10 .venv/bin/python bench/bench_kd.py --models demo --write bench/ALIGN.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRUNINGS = {
    "random 0.65": ["prune.strategy=random", "prune.ratio=0.65"],
    "sparsegpt 2:4": ["prune.strategy=semi", "prune.sparse_method=sparsegpt"],
}
# name -> align overrides
OBJECTIVES = {
    "cpt": {"objective": "cpt"},
    "kd online": {"objective": "kd", "kd_mode": "online"},
    "kd topk": {"objective": "kd", "kd_mode": "topk"},
    "cpt+kd online": {"objective": "cpt+kd", "kd_mode": "online"},
}
BEGIN, END = "<!-- bench_kd:begin -->", "<!-- bench_kd:end -->"


def _slug(*parts: str) -> str:
    return "-".join(p.replace(" ", "_").replace(":", "_").replace("+", "p") for p in parts)


# ------------------------------------------------------------------------------ child process


def child(spec: dict) -> None:
    """Align one pruned model by one objective; print its curve, wall time and peak RSS as JSON."""
    import torch

    torch.set_num_threads(spec["threads"])
    from bench import _models
    from loram_core.align import train_causal_lm
    from loram_core.data import load_blocks
    from loram_core.dtypes import published_dtype
    from loram_core.evaluate import perplexity
    from loram_core.models import load_config, load_model
    from loram_core.steps.pruning import sparse_masks
    from loram_core.steps.teacher import announce_plan, distiller_for

    cfg = _models.config(spec["model"], spec["workdir"])
    align = cfg.align.model_copy(update={**spec["align"], "log_every": 1, "checkpoint_every": 10**9})
    device = torch.device("cpu")
    blocks = load_blocks(spec["blocks"])
    heldout = blocks.heldout
    plan = announce_plan(align, spec["pruned"], spec["base"], spec["cache"], blocks.train.shape[1], device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = load_model(spec["pruned"]).to(device)
    distiller = distiller_for(align, spec["base"], spec["cache"], blocks.train, device)
    curve = {0: perplexity(model, heldout)}
    eval_s = 0.0

    dtype = published_dtype(load_config(spec["pruned"]), cfg.context.dtype)

    def progress(event: dict) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        if event["step"] in spec["budgets"]:
            curve[event["step"]] = perplexity(model, heldout)
        if event["step"] == spec["quarter"]:  # a copy: the live model keeps its float32 weights
            _save(copy.deepcopy(model), spec["pruned"], spec["out"] + "-quarter", dtype)
        eval_s += time.perf_counter() - t

    t0 = time.perf_counter()
    result = train_causal_lm(model, blocks.train, align, masks=sparse_masks(spec["pruned"]), progress=progress,
                             distiller=distiller)  # fmt: skip
    wall = time.perf_counter() - t0 - eval_s
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _save(model, spec["pruned"], spec["out"], dtype)
    quarter = perplexity(load_model(spec["out"] + "-quarter"), heldout)
    print("RESULT " + json.dumps({
        "curve": curve, "final_ppl": perplexity(load_model(spec["out"]), heldout), "quarter_ppl": quarter,
        "tokens": result.tokens,
        "step_s": wall / align.steps, "wall_s": wall, "peak_rss": peak, "rss_before_model": rss0,
        "plan_total": plan["device_total"], "final_loss": result.losses[-1][1],
    }), flush=True)  # fmt: skip


def _save(model, pruned: str, out: str, dtype) -> None:
    """An aligned dir as the align step writes it: weights in the published dtype, tokenizer, masks."""
    from transformers import AutoTokenizer

    from loram_core.dtypes import save_pretrained_as

    save_pretrained_as(model, out, dtype)
    AutoTokenizer.from_pretrained(pruned).save_pretrained(out)
    shutil.copytree(Path(pruned) / "masks", Path(out) / "masks", dirs_exist_ok=True)


def run_child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(spec["threads"])),
    )  # fmt: skip
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        sys.exit(f"{spec['name']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(found[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------- parent


def _task(cfg, base: str):
    """The `verify` preset's task sets, encoded with the base's tokenizer (as the verify step makes them)."""
    from transformers import AutoTokenizer

    from loram_core.data import read_documents, resolve_files
    from loram_core.verify.task import encode, make_task

    v, c = cfg.verify, cfg.corpus
    docs = read_documents(resolve_files(c, cfg.base.cache_dir), c.format, c.text_field)
    train, heldout = make_task(
        docs, v.words, v.train_examples, v.heldout_examples, c.heldout_fraction, v.seed
    )
    tok = AutoTokenizer.from_pretrained(base)
    return encode(train, tok), encode(heldout, tok)


def verify_rows(cfg, base: str, pruned: str, aligned: str, work: Path, full: bool) -> dict[str, float]:
    """Task losses: the whole ablation (`full`: original, loram, unaligned) or its `loram` row alone."""
    import torch

    from loram_core.models import load_model
    from loram_core.verify.ablation import _recovered_on_original, run_ablation
    from loram_core.verify.lora import train_lora

    v = cfg.verify.model_copy(update={"reference": False})
    train, heldout = _task(cfg, base)
    cpu = torch.device("cpu")
    if full:
        rows = run_ablation(v, base, pruned, aligned, train, heldout, work, cpu)["rows"]
        return {r["key"]: r["loss"] for r in rows}
    peft_model, _ = train_lora(load_model(aligned), train, v, work / "loram", cpu)
    del peft_model
    score, _ = _recovered_on_original(
        base, aligned, work / "loram", work / "loram-recovered", v, heldout, cpu
    )
    return {"loram": round(score.loss, 4)}


def _one(job: dict) -> dict:
    """Align (child process), then verify the full-budget and quarter-budget models; the run's record."""
    spec, cfg, record = job["spec"], job["cfg"], Path(job["record"])
    t = time.perf_counter()
    row = run_child(spec)
    cpt = spec["align"]["objective"] == "cpt"
    row["verify"] = verify_rows(
        cfg, spec["base"], spec["pruned"], spec["out"], Path(spec["out"] + "-verify"), cpt
    )
    if not cpt:  # kd at a quarter of the tokens against cpt at all of them
        row["verify_quarter"] = verify_rows(cfg, spec["base"], spec["pruned"], spec["out"] + "-quarter",
                                            Path(spec["out"] + "-quarter-verify"), False)  # fmt: skip
    row.update(job["facts"], seconds=time.perf_counter() - t, load=os.getloadavg()[0])
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(row, indent=1))
    print(f"  {spec['name']}: ppl {row['final_ppl']:.2f} (quarter {row['quarter_ppl']:.2f}), task "
          f"{row['verify']['loram']:.3f}, {row['step_s']:.2f} s/step, {row['seconds']:.0f} s, load {row['load']:.1f}",
          file=sys.stderr, flush=True)  # fmt: skip
    return row


def bench(args: argparse.Namespace) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    torch.set_num_threads(args.threads)
    from bench import _models
    from loram_core import steps
    from loram_core.steps.teacher import topk_cache

    results: dict = {}
    jobs: list[dict] = []
    for name in args.models:
        work = Path(args.workdir) / name
        if args.report_only:  # nothing computed, not even the cached steps (whose keys may have moved)
            cache = next(work.glob("kd-topk-*/topk.safetensors"))
            runs = {p.stem: json.loads(p.read_text()) for p in sorted((work / "runs").glob("*.json"))}
            results[name] = {"topk_cache_bytes": cache.stat().st_size, "runs": runs,
                             "topk_cache_s": json.loads((work / "topk-seconds.json").read_text())}  # fmt: skip
            continue
        base, blocks_file = _models.prepare(name, work)
        cfg = _models.config(name, work)
        calib = steps.prepare_calibration(cfg, base, blocks_file)
        kd_topk = cfg.align.model_copy(update={"objective": "kd", "kd_mode": "topk"})
        t = time.perf_counter()
        cache = topk_cache(kd_topk, cfg.context, base, blocks_file, torch.device("cpu"))
        stamp = work / "topk-seconds.json"  # the cache is computed once; its time is kept beside it
        if not stamp.is_file():
            stamp.write_text(json.dumps(time.perf_counter() - t))
        results[name] = {"topk_cache_bytes": Path(cache).stat().st_size,
                         "topk_cache_s": json.loads(stamp.read_text()), "runs": {}}  # fmt: skip
        warmup = max(1, round(cfg.align.warmup_steps * args.steps / cfg.align.steps))
        for pruning in args.prunings:
            pcfg = _models.config(name, work, PRUNINGS[pruning])
            pruned = steps.prune(pcfg.prune, pcfg.context, base, calib)
            for objective in args.objectives:
                run = _slug(name, pruning, objective, str(args.steps))
                record = work / "runs" / f"{run}.json"
                if record.is_file():
                    results[name]["runs"][run] = json.loads(record.read_text())
                    continue
                spec = {"name": run, "model": name, "workdir": str(work), "base": base, "pruned": pruned,
                        "blocks": blocks_file, "cache": cache if "topk" in objective else None,
                        "align": {**OBJECTIVES[objective], "steps": args.steps, "warmup_steps": warmup},
                        "budgets": sorted({*args.budgets, args.steps}), "quarter": args.steps // 4,
                        "threads": args.threads, "out": str(work / "aligned" / run)}  # fmt: skip
                facts = {"model": name, "pruning": pruning, "objective": objective, "steps": args.steps}
                jobs.append({"spec": spec, "cfg": cfg, "record": str(record), "facts": facts, "run": run})
    with ThreadPoolExecutor(args.jobs) as pool:
        for job, row in zip(jobs, pool.map(_one, jobs), strict=True):
            results[job["facts"]["model"]]["runs"][job["run"]] = row
    return results


def tables(results: dict, args: argparse.Namespace) -> str:
    out = []
    for name, res in results.items():
        order = {k: i for i, k in enumerate([*PRUNINGS, *OBJECTIVES])}
        every = sorted(res["runs"].values(), key=lambda r: (order[r["pruning"]], order[r["objective"]]))
        runs = [r for r in every if r["steps"] == args.steps]
        own = [r for r in every if r["steps"] == args.steps // 4]  # a quarter of the budget, its own schedule
        if not runs:
            continue
        per_step = runs[0]["tokens"] // runs[0]["steps"]
        budgets = sorted({int(b) for r in runs for b in r["curve"]})
        out.append(f"### {name} base\n")
        out.append(f"Teacher top-k cache: k=64 of the 2,048-token vocabulary, {res['topk_cache_bytes'] / 2**20:,.0f} MiB, "
                   f"computed in {res['topk_cache_s']:.0f} s, once per base and corpus (reused by every topk run).\n")  # fmt: skip
        out.append(f"Held-out perplexity after each token budget (thousands of tokens; one {args.steps}-step run "
                   "per objective), wall time per step and peak RSS of the run's process, and the memory plan's total:\n")  # fmt: skip
        head = " | ".join(f"{b * per_step / 1e3:,.0f}k" for b in budgets)
        out.append(f"| pruning | objective | {head} | s/step | peak RSS MiB | plan MiB |")
        out.append("|---|---|" + "---:|" * (len(budgets) + 3))
        for r in runs:
            cells = " | ".join(f"{r['curve'][str(b)]:.2f}" if str(b) in r["curve"] else "" for b in budgets)
            out.append(f"| {r['pruning']} | {r['objective']} | {cells} | {r['step_s']:.2f} | "
                       f"{r['peak_rss'] / 2**20:,.0f} | {r['plan_total'] / 2**20:,.0f} |")  # fmt: skip
        out.append("")
        out.append("Verification (task loss, lower is better, of a LoRA trained on the aligned base and recovered "
                   "onto the original; `quarter`: the model saved after a quarter of the tokens), and whether a "
                   "quarter of the tokens reaches `cpt`'s full-budget perplexity:\n")  # fmt: skip
        out.append("| pruning | objective | ppl, full | task loss, full | ppl, quarter | task loss, quarter | "
                   "quarter reaches cpt's full ppl | quarter's task loss <= cpt's full |")  # fmt: skip
        out.append("|---|---|---:|---:|---:|---:|---|---|")
        for pruning in dict.fromkeys(r["pruning"] for r in runs):
            cpt = next((r for r in runs if r["pruning"] == pruning and r["objective"] == "cpt"), None)
            for r in (r for r in runs if r["pruning"] == pruning):
                q = r.get("verify_quarter", {}).get("loram")
                reach = task = ""
                if cpt is not None and r is not cpt:
                    reach = "yes" if r["quarter_ppl"] <= cpt["final_ppl"] else "no"
                    task = "yes" if q is not None and q <= cpt["verify"]["loram"] else "no"
                qs = "" if q is None else f"{q:.4f}"
                out.append(f"| {pruning} | {r['objective']} | {r['final_ppl']:.2f} | {r['verify']['loram']:.4f} | "
                           f"{r['quarter_ppl']:.2f} | {qs} | {reach} | {task} |")  # fmt: skip
            if cpt is not None:
                v = cpt["verify"]
                out.append(f"| {pruning} | (original, no LoRA: {v['original']:.4f}; LoRA on the unaligned "
                           f"base, recovered: {v['unaligned']:.4f}) | | | | | | |")  # fmt: skip
        out.append("")
        if own:
            out.append(f"A quarter of the budget with its own schedule (`align.steps={args.steps // 4}`, warmup and "
                       f"cosine over those steps; `--steps {args.steps // 4}` into the same work dir), against "
                       f"`cpt` at the full {args.steps} steps:\n")  # fmt: skip
            out.append("| pruning | objective | tokens | held-out ppl | task loss | reaches cpt's full ppl | "
                       "task loss <= cpt's full |")  # fmt: skip
            out.append("|---|---|---:|---:|---:|---|---|")
            for r in own:
                cpt = next(
                    (c for c in runs if c["pruning"] == r["pruning"] and c["objective"] == "cpt"), None
                )
                reach = task = ""
                if cpt is not None:
                    reach = "yes" if r["final_ppl"] <= cpt["final_ppl"] else "no"
                    task = "yes" if r["verify"]["loram"] <= cpt["verify"]["loram"] else "no"
                out.append(f"| {r['pruning']} | {r['objective']} | {r['tokens']:,} | {r['final_ppl']:.2f} | "
                           f"{r['verify']['loram']:.4f} | {reach} | {task} |")  # fmt: skip
            out.append("")
        secs = sum(r["seconds"] for r in runs + own)
        loads = [r["load"] for r in runs + own]
        out.append(f"{len(runs) + len(own)} runs, {secs / 60:.0f} min of run time (alignment + verification, "
                   f"{args.jobs} at a time), load average {min(loads):.1f}-{max(loads):.1f} at the runs' ends.\n")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "larger"])
    parser.add_argument("--prunings", nargs="+", default=list(PRUNINGS), choices=list(PRUNINGS))
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--steps", type=int, default=96, help="the full budget, in optimizer steps")
    parser.add_argument("--budgets", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/loram-bench-kd")
    parser.add_argument("--write", type=Path, help="replace the bench_kd section of this markdown file")
    parser.add_argument("--report-only", action="store_true", help="tables from the runs already recorded")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    t0 = time.perf_counter()
    results = bench(args)
    body = tables(results, args)
    cmd = "nice -n 10 .venv/bin/python bench/bench_kd.py " + " ".join(
        a for a in sys.argv[1:] if a != "--report-only"
    )
    wall = "" if args.report_only else f"bench wall time {(time.perf_counter() - t0) / 60:.0f} min\n"
    section = (f"{BEGIN}\n## Tokens to target: cpt vs distillation from the original (issue 26)\n\n"
               f"```\n{cmd}\n```\n\n{body}\n{wall}{END}")  # fmt: skip
    print(section)
    if args.write:
        text = args.write.read_text()
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        args.write.write_text(text)


if __name__ == "__main__":
    main()
