"""Pruning, side by side with the peers: our SparseGPT/Wanda/magnitude vs llmcompressor's one-shot,
our structured (random, Taylor) vs torch-pruning, and our streaming memory on a larger checkpoint.

Every contender runs as its own subprocess and is measured there: pruning wall time (best of
`--repeat`, and the first, cold one), CPU seconds, the process's peak RSS when pruning ends (its
`ru_maxrss` then) and over its whole life (`os.wait4` from here), and held-out perplexity. Ours run
in this venv; the peers in their own (`bench/.peers-venv`, made by `bench/setup_peers.sh` on first
use), since llmcompressor pins an older transformers. All get the same model (the demo's pretrained
base), the same calibration and held-out blocks (one safetensors file), the same layers, damping
0.01 and block size 128. Ratios are taken within the one run. Writes the tables to bench/PRUNE.md.

    .venv/bin/python bench/bench_prune.py [--quick] [--threads 1] [--repeat 3] [--no-peers]

About 8 minutes on 2 CPU cores (`--quick`: about 3), most of it the children importing torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MARK = "BENCH_RESULT "

# The modules every child of ours imports before it starts its clock; the `baseline` child imports
# exactly these and exits, so its peak RSS is what Python + torch + our code cost before any work.
OUR_IMPORTS = (
    "torch",
    "transformers",
    "safetensors.torch",
    "loram_core.config",
    "loram_core.prune",
    "loram_core.prune.sequential",
    "loram_core.prune.structured",
    "loram_core.models",
    "loram_core.evaluate",
)
PEER_IMPORTS = ("torch", "transformers", "llmcompressor", "torch_pruning")


# --------------------------------------------------------------------------------------------------
# Children (run as `python bench/bench_prune.py --child NAME ...` in our venv)
# --------------------------------------------------------------------------------------------------


def _emit(result: dict) -> None:
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _import_ours() -> None:
    import importlib

    for name in OUR_IMPORTS:
        importlib.import_module(name)


def child_baseline(_args) -> None:
    _import_ours()
    _emit({"rss_prune_mib": _maxrss_mib()})


def child_prepare(args) -> None:
    """Build (or reuse) the demo base and corpus; save the exact calib/held-out blocks; dense ppl."""
    _import_ours()
    from safetensors.torch import save_file

    from loram_core.config import load_config
    from loram_core.data import load_blocks
    from loram_core.demo import build_demo_base
    from loram_core.evaluate import perplexity
    from loram_core.models import count_parameters, load_model
    from loram_core.steps import prepare_corpus

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    base = build_demo_base(cfg.base, cfg.corpus)
    blocks = load_blocks(prepare_corpus(cfg, str(base)))
    calib = blocks.train[: args.calib].contiguous()
    save_file({"calib": calib, "heldout": blocks.heldout.contiguous()}, args.data)
    model = load_model(base)
    _emit(
        {
            "base": str(base),
            "ppl": perplexity(model, blocks.heldout),
            "params": count_parameters(model),
            "calib_shape": list(calib.shape),
            "heldout_shape": list(blocks.heldout.shape),
            "config": {
                k: getattr(model.config, k)
                for k in (
                    "num_hidden_layers",
                    "hidden_size",
                    "intermediate_size",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "vocab_size",
                )
            },
        }
    )


def _sparsity(model) -> float:
    zeros = total = 0
    for name, p in model.named_parameters():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / max(1, total)


def child_ours(args) -> None:
    """Our pruning through `prune_checkpoint`, `--repeat` times; held-out ppl of the result."""
    _import_ours()
    import time as _time

    from safetensors.torch import load_file

    from loram_core.config import PruneConfig
    from loram_core.evaluate import perplexity
    from loram_core.models import count_parameters, load_model
    from loram_core.prune import prune_checkpoint

    data = load_file(args.data)
    cfg = PruneConfig(
        strategy=args.strategy,
        ratio=args.ratio,
        sparse_method=args.method,
        n_m=(2, 4),
        keep_first=args.first,
        keep_last=args.last,
        importance="param_first",
        calib_samples=data["calib"].shape[0],
        damp=args.damp,
        blocksize=args.blocksize,
        device_map=args.device_map,
    )
    times, rss_first = [], None
    for k in range(args.repeat):
        out = Path(args.out) / f"rep{k}"
        c0, t0 = _cpu_s(), _time.perf_counter()
        prune_checkpoint(args.base, out, cfg, data["calib"])
        times.append((_time.perf_counter() - t0, _cpu_s() - c0))
        if rss_first is None:
            rss_first = _maxrss_mib()
    model = load_model(Path(args.out) / "rep0")
    best = min(times)
    _emit(
        {
            "prune_s": best[0],
            "cpu_s": best[1],
            "first_s": times[0][0],
            "rss_prune_mib": rss_first,
            "ppl": perplexity(model, data["heldout"]),
            "params": count_parameters(model),
            "sparsity": _sparsity(model),
        }
    )


def child_stream_build(args) -> None:
    """A random-init LLaMA checkpoint (one model.safetensors, fp32) for the streaming test."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {
        n: torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02
        for n, s in shapes.items()
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    _emit(
        {
            "bytes": (out / "model.safetensors").stat().st_size,
            "params": sum(t.numel() for t in tensors.values()),
            "linear_params": sum(t.numel() for n, t in tensors.items() if n.endswith("proj.weight")),
        }
    )


def child_stream(args) -> None:
    """Our streamed prune of the big checkpoint, no eval: SparseGPT (unstructured 0.5, all layers)
    or, with `--strategy structured`, Taylor param_first at ratio 0.5 (LoRAM's layers: keep 4 + 2)."""
    _import_ours()
    import time as _time

    from safetensors.torch import load_file

    from loram_core.config import PruneConfig
    from loram_core.prune import prune_checkpoint

    calib = load_file(args.data)["calib"]
    if args.strategy == "structured":
        cfg = PruneConfig(
            strategy="structured", ratio=0.5, importance="param_first", calib_samples=calib.shape[0]
        )
    else:
        cfg = PruneConfig(
            strategy="unstructured",
            ratio=0.5,
            sparse_method="sparsegpt",
            keep_first=0,
            keep_last=0,
            calib_samples=calib.shape[0],
            damp=args.damp,
            blocksize=args.blocksize,
        )
    c0, t0 = _cpu_s(), _time.perf_counter()
    prune_checkpoint(args.base, args.out, cfg, calib)
    _emit({"prune_s": _time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "rss_prune_mib": _maxrss_mib()})


CHILDREN = {
    "baseline": child_baseline,
    "prepare": child_prepare,
    "ours": child_ours,
    "stream-build": child_stream_build,
    "stream": child_stream,
}


# --------------------------------------------------------------------------------------------------
# The parent: launches, measures, tabulates. Imports nothing heavy, so that its own memory never
# leaks into a child's `ru_maxrss` (Linux carries the pre-exec high-water mark over exec).
# --------------------------------------------------------------------------------------------------


def launch(cmd: list[str], log: Path, env: dict, timeout: float) -> dict:
    """Run one child; its result line plus what the kernel says it used (wait4)."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
    result: dict = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK) :])
    result.update(
        rc=proc.returncode,
        proc_s=wall,
        proc_cpu_s=usage.ru_utime + usage.ru_stime,
        rss_proc_mib=usage.ru_maxrss / 1024,
        log=str(log),
    )
    if (
        proc.returncode != 0
        or "rss_prune_mib" not in result
        and "bytes" not in result
        and "base" not in result
    ):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        result["error"] = f"exit {proc.returncode}" + (" (timed out)" if wall > timeout else "")
        print(f"  ! {' '.join(cmd[1:4])} failed: {result['error']}; log {log}\n{tail}", file=sys.stderr)
    return result


def ensure_peers(venv: Path) -> Path | None:
    py = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        print(f"setting up the peers' venv in {venv} (bench/setup_peers.sh) ...", flush=True)
        r = subprocess.run(["bash", str(BENCH / "setup_peers.sh"), str(venv)], cwd=ROOT)
        if r.returncode != 0:
            print("  ! could not set up the peers' venv; peers are skipped", file=sys.stderr)
            return None
    return py


def peer_versions(py: Path) -> str:
    code = (
        "import importlib.metadata as m;"
        "print(', '.join(f'{n} {m.version(n)}' for n in "
        "('torch','transformers','llmcompressor','compressed-tensors','torch-pruning')))"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() or r.stderr.strip()[-200:]


def fmt(x, spec: str = ".2f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def ratio(a, b) -> str:
    return "–" if a is None or b in (None, 0) else f"{a / b:.3f}x"


def row(r: dict, cells_extra: list[str] | None = None) -> list[str]:
    err = r.get("error")
    return [
        r["contender"],
        r["setting"],
        fmt(r.get("prune_s")),
        fmt(r.get("first_s")),
        fmt(r.get("cpu_s")),
        fmt(r.get("proc_s"), ".1f"),
        fmt(r.get("rss_prune_mib"), ".0f"),
        fmt(r.get("rss_proc_mib"), ".0f"),
        (fmt(r.get("ppl"), ".3f") if not err else f"failed ({err})"),
        *(cells_extra or []),
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one repeat, fewer rows, a smaller checkpoint")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (more thrash a busy box)")
    p.add_argument("--repeat", type=int, default=None, help="pruning passes per child (default 3; --quick 1)")
    p.add_argument("--calib", type=int, default=32, help="calibration blocks (of 128 tokens)")
    p.add_argument("--no-peers", action="store_true", help="measure ours only")
    p.add_argument("--peers-venv", default=str(BENCH / ".peers-venv"))
    p.add_argument("--stream-layers", type=int, default=None, help="layers of the streaming checkpoint")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a child is killed")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, checkpoints)")
    p.add_argument("--output", default=str(BENCH / "PRUNE.md"), help="where the tables go ('' for nowhere)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for name, default in [
        ("--base", None),
        ("--data", None),
        ("--out", None),
        ("--strategy", "unstructured"),
        ("--method", "sparsegpt"),
        ("--device-map", None),
    ]:
        p.add_argument(name, default=default, help=argparse.SUPPRESS)
    for name, default in [("--ratio", 0.5), ("--damp", 0.01)]:
        p.add_argument(name, type=float, default=default, help=argparse.SUPPRESS)
    for name, default in [
        ("--first", 0),
        ("--last", 0),
        ("--blocksize", 128),
        ("--layers", 16),
        ("--hidden", 1536),
        ("--inter", 4096),
        ("--heads", 12),
        ("--kv", 4),
        ("--vocab", 2048),
    ]:
        p.add_argument(name, type=int, default=default, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.repeat is None:
            args.repeat = 1
        CHILDREN[args.child](args)
        return

    repeat = args.repeat or (1 if args.quick else 3)
    stream_layers = args.stream_layers or (8 if args.quick else 16)
    work = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    logs = work / "logs"
    logs.mkdir()
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    ours_py = [sys.executable, str(Path(__file__).resolve())]
    started = time.perf_counter()
    load_before = os.getloadavg()
    n_child = [0]

    def run(name: str, cmd: list[str]) -> dict:
        n_child[0] += 1
        print(f"[{time.perf_counter() - started:6.1f}s] {name}", flush=True)
        return launch(
            cmd, logs / f"{n_child[0]:02d}-{name.replace(' ', '_').replace(':', '')}.log", env, args.timeout
        )

    data = str(work / "data.safetensors")
    prep = run(
        "prepare: demo base, corpus, dense ppl",
        [*ours_py, "--child", "prepare", "--data", data, "--calib", str(args.calib)],
    )
    if "base" not in prep:
        sys.exit("could not prepare the demo base and data; see the log above")
    base = prep["base"]
    peer_py = None if args.no_peers else ensure_peers(Path(args.peers_venv))
    common = ["--base", base, "--data", data]

    # ---- 1. sparse: SparseGPT / Wanda / magnitude, all decoder layers ------------------------------
    sparse_rows: list[dict] = []
    settings = [
        ("sparsegpt", "unstructured"),
        ("sparsegpt", "2:4"),
        ("wanda", "unstructured"),
        ("wanda", "2:4"),
        ("magnitude", "unstructured"),
    ]
    if not args.quick:
        settings.append(("magnitude", "2:4"))
    for method, pattern in settings:
        label = "50% unstructured" if pattern == "unstructured" else "2:4"
        strategy = "unstructured" if pattern == "unstructured" else "semi"
        r = run(
            f"ours {method} {label}",
            [
                *ours_py,
                "--child",
                "ours",
                *common,
                "--out",
                str(work / f"ours-{method}-{strategy}"),
                "--strategy",
                strategy,
                "--method",
                method,
                "--repeat",
                str(repeat),
            ],
        )
        sparse_rows.append(
            {**r, "contender": "ours", "setting": f"{method} {label}", "key": (method, pattern)}
        )
        if peer_py is not None and method in ("sparsegpt", "wanda"):
            r = run(
                f"llmcompressor {method} {label}",
                [
                    str(peer_py),
                    str(BENCH / "_peer_llmc.py"),
                    *common,
                    "--method",
                    method,
                    "--pattern",
                    pattern,
                    "--repeat",
                    str(repeat),
                ],
            )
            sparse_rows.append(
                {**r, "contender": "llmcompressor", "setting": f"{method} {label}", "key": (method, pattern)}
            )

    # ---- 2. structured: random and Taylor, ratio 0.5, layers [1, L-1) ------------------------------
    struct_rows: list[dict] = []
    first, last = 1, 1  # configs/demo.yaml's range: the paper's 4/2 assume deep models
    for strategy in ("random", "structured"):
        setting = "random" if strategy == "random" else "Taylor param_first"
        ours_variants = [("", [])]
        if strategy == "structured":  # streamed (default) and whole-model (prune.device_map) backward
            ours_variants = [(" (streamed)", []), (" (whole model)", ["--device-map", "cpu"])]
        for k, (suffix, extra) in enumerate(ours_variants):
            r = run(
                f"ours {strategy}{suffix}",
                [*ours_py, "--child", "ours", *common, "--out", str(work / f"ours-{strategy}-{k}"), "--strategy",
                 strategy, "--first", str(first), "--last", str(last), "--repeat", str(repeat), *extra],
            )  # fmt: skip
            struct_rows.append({**r, "contender": "ours", "setting": setting + suffix})
        if peer_py is None:
            continue
        variants = [("manual", "KV groups + MLP")]
        if strategy == "structured":
            variants.append(("none", "MLP only, heads dense"))
        for heads, what in variants:
            if args.quick and heads == "none":
                continue
            r = run(
                f"torch-pruning {strategy} {heads}",
                [
                    str(peer_py),
                    str(BENCH / "_peer_tp.py"),
                    *common,
                    "--importance",
                    "taylor" if strategy == "structured" else "random",
                    "--heads",
                    heads,
                    "--first",
                    str(first),
                    "--last",
                    str(last),
                    "--repeat",
                    str(repeat),
                ],
            )
            struct_rows.append({**r, "contender": "torch-pruning", "setting": f"{setting} ({what})"})

    # ---- 3. streaming memory ---------------------------------------------------------------------
    ckpt = work / "stream-base"
    build = run(
        f"build {stream_layers}-layer checkpoint",
        [*ours_py, "--child", "stream-build", "--out", str(ckpt), "--layers", str(stream_layers)],
    )
    ours_base = run("baseline: import torch + transformers + loram_core", [*ours_py, "--child", "baseline"])
    # A warm baseline: the same streaming code on a 1-layer, 64-wide checkpoint, so that every kernel
    # and library page the real run touches is touched too, with next to no data.
    tiny = work / "stream-tiny"
    tiny_dims = ["--layers", "1", "--hidden", "64", "--inter", "128", "--heads", "4", "--kv", "2"]
    run("build tiny checkpoint", [*ours_py, "--child", "stream-build", "--out", str(tiny), *tiny_dims])
    ours_warm = run(
        "warm baseline: streaming sparsegpt on the tiny checkpoint",
        [*ours_py, "--child", "stream", "--base", str(tiny), "--data", data, "--out", str(work / "tiny-out")],
    )
    stream = run(
        "ours streaming sparsegpt 50%",
        [
            *ours_py,
            "--child",
            "stream",
            "--base",
            str(ckpt),
            "--data",
            data,
            "--out",
            str(work / "stream-out"),
        ],
    )
    taylor = run(
        "ours streaming structured Taylor 0.5",
        [*ours_py, "--child", "stream", "--strategy", "structured", "--base", str(ckpt), "--data", data,
         "--out", str(work / "taylor-out")],
    )  # fmt: skip
    for d in (ckpt, work / "stream-out", work / "taylor-out", tiny, work / "tiny-out"):
        shutil.rmtree(d, ignore_errors=True)
    peer_base = None
    if peer_py is not None:
        code = (
            "import resource, json;"
            + "".join(f"import {m};" for m in PEER_IMPORTS)
            + f"print({MARK!r} + json.dumps({{'rss_prune_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))"
        )
        peer_base = run(
            "baseline: import torch + transformers + llmcompressor + torch_pruning",
            [str(peer_py), "-c", code],
        )

    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    # ---- tables -------------------------------------------------------------------------------
    head = [
        "contender",
        "setting",
        "prune s (best)",
        "prune s (first)",
        "CPU s",
        "process s",
        "peak RSS MiB (prune)",
        "peak RSS MiB (process)",
        "held-out ppl",
    ]
    peers_by_key = {r["key"]: r for r in sparse_rows if r["contender"] == "llmcompressor"}
    t1 = []
    t1.append(
        ["dense base (no pruning)", "–", "–", "–", "–", "–", "–", "–", fmt(prep["ppl"], ".3f"), "–", "–"]
    )
    for r in sparse_rows:
        peer = peers_by_key.get(r["key"]) if r["contender"] == "ours" else None
        extra = (
            [ratio(r.get("ppl"), peer.get("ppl")), ratio(r.get("prune_s"), peer.get("prune_s"))]
            if peer
            else ["–", "–"]
        )
        t1.append(row(r, extra))
    table1 = table(head + ["ppl ours/peer", "time ours/peer"], t1)

    t2 = []
    tp_taylor = next(
        (
            r
            for r in struct_rows
            if r["contender"] == "torch-pruning" and "Taylor" in r["setting"] and "KV" in r["setting"]
        ),
        None,
    )
    tp_random = next(
        (r for r in struct_rows if r["contender"] == "torch-pruning" and r["setting"].startswith("random")),
        None,
    )
    for r in struct_rows:
        peer = None
        if r["contender"] == "ours":
            peer = tp_taylor if "Taylor" in r["setting"] else tp_random
        extra = [fmt(r.get("params"), ",d")]
        extra += (
            [ratio(r.get("ppl"), peer.get("ppl")), ratio(r.get("prune_s"), peer.get("prune_s"))]
            if peer
            else ["–", "–"]
        )
        t2.append(row(r, extra))
    t2.insert(
        0,
        [
            "dense base (no pruning)",
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
            fmt(prep["ppl"], ".3f"),
            fmt(prep["params"], ",d"),
            "–",
            "–",
        ],
    )
    table2 = table(head + ["params", "ppl ours/peer", "time ours/peer"], t2)

    size_mib = build.get("bytes", 0) / 2**20
    peak = stream.get("rss_prune_mib")
    proc_peak = stream.get("rss_proc_mib")
    baseline = ours_base.get("rss_prune_mib")
    warm = ours_warm.get("rss_prune_mib")

    def above(x, ref) -> str:
        return f"{x - ref:,.0f} MiB = {(x - ref) / size_mib:.3f}x the checkpoint" if x and ref else "–"

    t3 = [
        [
            "checkpoint (fp32, one model.safetensors)",
            f"{size_mib:,.0f} MiB, {build.get('params', 0):,} params, {stream_layers} layers of hidden {args.hidden}, intermediate {args.inter}, {args.heads} heads / {args.kv} KV heads, vocab {args.vocab}",
        ],
        ["pruning wall / CPU s", f"{fmt(stream.get('prune_s'))} / {fmt(stream.get('cpu_s'))}"],
        [
            "peak RSS of the pruning process (absolute)",
            f"{fmt(peak, ',.0f')} MiB = {ratio(peak, size_mib)} the checkpoint (whole process: {fmt(proc_peak, ',.0f')} MiB)",
        ],
        [
            "baseline: Python + torch + transformers + loram_core imported, nothing done",
            f"{fmt(baseline, ',.0f')} MiB",
        ],
        ["peak RSS minus that baseline", above(peak, baseline)],
        [
            "warm baseline: the same streaming prune of a 1-layer, 64-wide checkpoint",
            f"{fmt(warm, ',.0f')} MiB",
        ],
        ["peak RSS minus the warm baseline", above(peak, warm)],
        [
            "of which the packed keep-masks `prune_sparse` holds for every layer until it returns",
            f"{build.get('linear_params', 0) / 8 / 2**20:,.0f} MiB at the end (1 bit per pruned weight)",
        ],
        [
            "Done-when: peak RSS <= half the checkpoint",
            "; ".join(
                f"{what}: {'yes' if peak and ref is not None and peak - ref <= size_mib / 2 else 'no'}"
                for what, ref in (
                    ("absolute", 0.0),
                    ("above the import baseline", baseline),
                    ("above the warm baseline", warm),
                )
            ),
        ],
    ]
    table3 = table(["streaming (ours, SparseGPT 50% unstructured, all layers)", "value"], t3)
    t_peak = taylor.get("rss_prune_mib")
    scored = stream_layers - 6  # LoRAM's default: the first 4 and last 2 layers stay dense
    spill_mib = (
        (stream_layers - 4) * prep["calib_shape"][0] * prep["calib_shape"][1] * args.hidden * 4 / 2**20
    )
    t4 = [
        ["pruning wall / CPU s (scores, then the cut)", f"{fmt(taylor.get('prune_s'))} / {fmt(taylor.get('cpu_s'))}"],
        [
            "peak RSS of the pruning process (absolute)",
            f"{fmt(t_peak, ',.0f')} MiB = {ratio(t_peak, size_mib)} the checkpoint",
        ],
        ["peak RSS minus the import baseline", above(t_peak, baseline)],
        [
            "hidden states written to `$TMPDIR` (layer inputs from layer 4 up, read back and deleted in the backward)",
            f"{spill_mib:,.0f} MiB at most",
        ],
        ["layers scored", f"{scored} (4..{stream_layers - 3})"],
    ]  # fmt: skip
    table4 = table(["streaming (ours, structured Taylor param_first, ratio 0.5)", "value"], t4)

    cfgd = prep["config"]
    lines = [
        "# Pruning benchmark: ours vs llmcompressor and torch-pruning",
        "",
        "Made by `bench/bench_prune.py` (issue 3); re-run it to refresh this file:",
        "",
        "```",
        " ".join(["nice -n 10 .venv/bin/python bench/bench_prune.py", *sys.argv[1:]]),
        "```",
        "",
        f"- machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"no GPU; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (the box is shared, "
        f"so wall times are noisy: compare within a table, and look at CPU s too); "
        f"{args.threads} torch thread(s) per child; best of {repeat} pruning pass(es) per child; "
        f"whole bench {elapsed / 60:.1f} min.",
        f"- ours: torch {_version('torch')}, transformers {_version('transformers')} (this venv); "
        f"peers: {peer_versions(peer_py) if peer_py else 'not run'} (bench/.peers-venv).",
        f"- model: the demo's pretrained base ({cfgd['num_hidden_layers']} layers, hidden {cfgd['hidden_size']}, "
        f"intermediate {cfgd['intermediate_size']}, {cfgd['num_attention_heads']} heads / "
        f"{cfgd['num_key_value_heads']} KV heads, vocab {cfgd['vocab_size']}, {prep['params']:,} params, fp32); "
        f"calibration: the first {prep['calib_shape'][0]} training blocks of {prep['calib_shape'][1]} tokens; "
        f"held-out: {prep['heldout_shape'][0]} blocks of {prep['heldout_shape'][1]} tokens (the corpus's "
        "held-out documents). Every contender reads the same file; perplexity is exp of the mean "
        "next-token NLL over all held-out tokens, the same function on both sides.",
        "- columns: *prune s* is the pruning's wall time inside the child (loading the model from disk, "
        "calibrating, solving; ours also writes the pruned checkpoint, the peers keep theirs in memory), best "
        "of the passes and the first (cold) one; *CPU s* is user+sys of the best pass; *process s* is the "
        "child's whole life (imports, all passes, evaluation); *peak RSS (prune)* is the child's `ru_maxrss` "
        "when its first pass ends, *(process)* its `ru_maxrss` at exit, as `os.wait4` reports it. Ratios are "
        "ours / peer of the same setting in this run (below 1 is better for both).",
        "",
        "## 1. Sparse: SparseGPT, Wanda, magnitude (all decoder layers' linears, damping 0.01, block 128)",
        "",
        table1,
        "",
        "llmcompressor runs `oneshot` with its sequential pipeline (one decoder layer at a time, inputs "
        "propagated through the already pruned layers, as ours does) and `SparseGPTModifier` / "
        "`WandaPruningModifier` on every `Linear` except `lm_head`. Its unstructured SparseGPT mask takes "
        "every weight at or below the k-th score, so it removes one weight (plus ties) more per block than "
        "ours. Magnitude is ours only (the floor); llmcompressor's `MagnitudePruningModifier` is a "
        "training-time schedule, not a one-shot solver.",
        "",
        "## 2. Structured: random and Taylor (ratio 0.5, layers 1..L-2)",
        "",
        table2,
        "",
        "torch-pruning 1.6.1 cannot prune the attention of transformers 5's GQA Llama: the dependency "
        "search that starts at q/k/v_proj never ends (it keeps re-adding the RoPE slice/cat and repeat_kv "
        "nodes with new index sets; upstream VainF/Torch-Pruning#527), and its GQA mode would remove query "
        "heads inside every KV group rather than whole KV groups as LLM-Pruner and LoRAM do. Its rows "
        "therefore let torch-pruning's DependencyGraph + `GroupTaylorImportance(group_reduction='sum', "
        "normalizer=None)` (LLM-Pruner's param_first) or `RandomImportance` choose and cut the MLP "
        "channels, and either leave the attention dense (*MLP only*) or remove whole KV-head groups with "
        "torch-pruning's `prune_linear_out/in_channels` at LLM-Pruner's group-Taylor choice (*KV groups + "
        "MLP*, the same widths as ours, so that row is the one compared). Random rows draw different "
        "channels on each side, so their ppl ratio is not a like-for-like comparison. Ours scores Taylor "
        "streamed by default (one decoder layer resident, section 3), which costs a second forward pass "
        "and a round trip of the hidden states through `$TMPDIR`: on a model this small that is slower "
        "than a whole-model backward; `prune.device_map` gives the whole-model one (the *whole model* "
        "row, run here with `device_map=cpu`), with the same scores.",
        "",
        "## 3. Streaming memory (`prune_checkpoint` on a 16-layer checkpoint)",
        "",
        table3,
        "",
        table4,
        "",
        "The checkpoint is random-init (memory does not depend on the values); calibration is the same "
        f"{prep['calib_shape'][0]} blocks as above. The import baseline is what the process holds before "
        "any work; the warm baseline adds what running the same kernels once costs (library pages, "
        "allocator arenas), so *peak minus warm baseline* is closest to the data the streaming really "
        "keeps: one decoder layer (the embeddings and head are resident only while the calibration "
        "inputs are captured), the calibration activations entering it (each batch's output replaces its "
        "input), one forward batch's transients, the layer's Hessians (q/k/v and gate/up share one each; "
        "the largest is down_proj's, intermediate² fp32, which SparseGPT damps, factors and inverts in its "
        "own memory) and the weight being pruned, updated in place. The packed keep-masks of the layers "
        "pruned so far are the one part that grows with the model (1/32 of an fp32 checkpoint).",
        "",
        "Structured Taylor needs the loss gradient through every layer above the ones it scores. Ours "
        "streams that too (`taylor_group_scores_streamed`): a forward pass layer by layer writes each "
        "layer's input hidden states to `$TMPDIR`; the backward pass reads the layers again from the "
        "top, runs each on its saved inputs and backpropagates the gradient from the layer above, "
        "turning its weights' gradients into group scores at once. Resident are one layer with its "
        "linears' gradients and the hidden states and gradients at one layer boundary; the scores "
        "equal a whole-model backward's (tested). The cut then streams like `random`.",
        "",
    ]
    if peer_base and peer_base.get("rss_prune_mib"):
        lines[-1:-1] = [
            f"For reference, the peers' import baseline (torch + transformers + llmcompressor + "
            f"torch_pruning) is {peer_base['rss_prune_mib']:,.0f} MiB; ours (section 3) {fmt(baseline, ',.0f')} MiB.",
            "",
        ]
    text = "\n".join(lines)
    print()
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        print(f"(written to {args.output})")
    if args.keep:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _version(name: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
