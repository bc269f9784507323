"""How time and memory of each pipeline step grow with model size: four LLaMA shapes, one machine.

Sizes: the demo's shape (~1.4M parameters), ~25M, ~113M and ~403M (LLaMA proportions: head_dim
64, GQA with 4 query heads per KV head above the demo, intermediate ~2.7-3x hidden, untied head),
random weights (seeded, std 0.02) saved in bf16 as hub checkpoints are, each with a byte-level
BPE tokenizer of its vocabulary trained on the demo corpus. Every step runs as the pipeline runs
it (`loram_core.steps`), in a child process of its own, so the wall seconds are the step's own
and the peak RSS (`ru_maxrss` from `os.wait4`) is that step's process: prune for each strategy,
align (a fixed number of tokens, reported per 1k), quantize (NF4), evaluate (every model the run
made), publish (file://) and pull (verified). The exponent of growth per step is the slope of a
least-squares line through log(seconds) (or log(peak RSS)) against log(parameters).

At the largest size a stock-loadable version (structured, every layer pruned: `keep_first=0,
keep_last=0`) is published in several shards (`publish.max_shard_size`) to a local S3 server
(moto on loopback, as tests/s3_server.py runs it), pulled, verified, and loaded with stock
`AutoModelForCausalLM.from_pretrained` (no remote code); its logits are compared with
`load_model`'s of the same files.

    nice -n 10 .venv/bin/python bench/bench_scale.py            # writes bench/SCALE.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MiB = 2**20

# LLaMA shapes: (vocab, hidden, intermediate, layers, heads, kv heads).
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "demo": (2048, 128, 384, 6, 4, 2),
    "25M": (8192, 512, 1408, 6, 8, 2),
    "110M": (16384, 768, 2048, 14, 12, 4),
    "400M": (32000, 1024, 3072, 28, 16, 4),
}
STRATEGIES = ("random", "structured", "semi", "unstructured")
ALIGN_STEPS, ALIGN_BATCH, SEQ = 4, 2, 128  # 1,024 tokens
SHARD = "100MB"  # the largest version's shards


def _overrides(size: str, work: Path, strategy: str = "structured", *extra: str) -> list[str]:
    return [
        f"workdir={work / 'steps'}", f"base.cache_dir={work / 'cache'}", f"base.source={work / 'bases' / size}",
        "device=cpu", f"corpus.seq_len={SEQ}", "corpus.max_tokens=65536", "corpus.eval_blocks=4",
        "calibration.samples=8", f"prune.strategy={strategy}", "prune.keep_first=1", "prune.keep_last=1",
        f"align.steps={ALIGN_STEPS}", f"align.batch_size={ALIGN_BATCH}", "align.warmup_steps=1",
        "align.log_every=2", "align.checkpoint_every=1000", "verify.enabled=false",
        "evaluate.batch_size=4", f"publish.uri=file://{work / 'bucket'}", f"publish.name=scale-{size}",
        "publish.version=v1", "publish.check_create_only=false", *extra,
    ]  # fmt: skip


def _cfg(size: str, work: Path, strategy: str = "structured", *extra: str):
    from loram_core.config import load_config

    return load_config(REPO / "configs" / "demo.yaml", _overrides(size, work, strategy, *extra))


# ---------------------------------------------------------------- children (one step each)


class Clock:
    """Wall and CPU (user + sys of this process) seconds of the step between `start` and `stop`."""

    def start(self) -> None:
        self.t0, self.c0 = time.perf_counter(), self._cpu()

    def stop(self, **result) -> dict:
        return {"seconds": time.perf_counter() - self.t0, "cpu_seconds": self._cpu() - self.c0, **result}

    @staticmethod
    def _cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime


def child_build(size: str, work: Path) -> dict:
    """The base checkpoint: tokenizer + random LLaMA weights in bf16 (not a measured step)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loram_core.data import demo_corpus_file, read_documents
    from loram_core.demo import train_tokenizer

    vocab, hidden, inter, layers, heads, kv = SIZES[size]
    out = work / "bases" / size
    if (out / "config.json").is_file():
        return {"params": json.loads((out / "params.json").read_text())["params"]}
    docs = read_documents([str(demo_corpus_file(work / "cache"))], "text")
    tokenizer = train_tokenizer(docs, vocab)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(size + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    (tmp / "params.json").write_text(json.dumps({"params": params}))
    tmp.rename(out)
    return {"params": params}


def child_data(size: str, work: Path) -> dict:
    from loram_core import steps

    cfg = _cfg(size, work)
    base = steps.prepare_base(cfg)
    blocks = steps.prepare_corpus(cfg, base)
    steps.prepare_calibration(cfg, base, blocks)
    steps.prepare_eval(cfg, base, blocks)
    return {}


def _inputs(cfg):
    from loram_core import steps

    base = steps.prepare_base(cfg)
    blocks = steps.prepare_corpus(cfg, base)
    return base, blocks, steps.prepare_calibration(cfg, base, blocks)


def child_prune(size: str, work: Path, strategy: str, *extra: str) -> dict:
    from loram_core import steps

    cfg = _cfg(size, work, strategy, *extra)
    base, _, calib = _inputs(cfg)
    clock = Clock()
    clock.start()
    out = steps.prune(cfg.prune, cfg.context, base, calib)
    return clock.stop(out=out)


def child_align(size: str, work: Path) -> dict:
    from loram_core import steps

    cfg = _cfg(size, work)
    base, blocks, calib = _inputs(cfg)
    pruned = steps.prune(cfg.prune, cfg.context, base, calib)
    clock = Clock()
    clock.start()
    steps.align(cfg.align, cfg.context, pruned, blocks)
    r = clock.stop(tokens=ALIGN_STEPS * ALIGN_BATCH * SEQ)
    per_1k = 1000 / r["tokens"]
    return {**r, "seconds_per_1k": r["seconds"] * per_1k, "cpu_per_1k": r["cpu_seconds"] * per_1k}


def _made(cfg):
    from loram_core import steps

    base, blocks, calib = _inputs(cfg)
    pruned = steps.prune(cfg.prune, cfg.context, base, calib)
    aligned = steps.align(cfg.align, cfg.context, pruned, blocks) if cfg.runs("align") else pruned
    return base, blocks, pruned, aligned


def child_quantize(size: str, work: Path) -> dict:
    from loram_core import steps

    cfg = _cfg(size, work)
    _, _, _, aligned = _made(cfg)
    clock = Clock()
    clock.start()
    steps.quantize(cfg.quantize, cfg.context, aligned)
    return clock.stop()


def child_evaluate(size: str, work: Path, *extra: str) -> dict:
    from loram_core import steps

    cfg = _cfg(size, work, "structured", *extra)
    base, blocks, pruned, aligned = _made(cfg)
    nf4 = steps.quantize(cfg.quantize, cfg.context, aligned) if cfg.runs("quantize") else None
    clock = Clock()
    clock.start()
    result = steps.evaluate(cfg, base, pruned, aligned, nf4, blocks)
    return clock.stop(metrics=result["metrics"])


def child_publish(size: str, work: Path, *extra: str) -> dict:
    from loram_core import steps

    cfg = _cfg(size, work, "structured", *extra)  # `extra` may choose another strategy
    base, blocks, pruned, aligned = _made(cfg)
    nf4 = steps.quantize(cfg.quantize, cfg.context, aligned) if cfg.runs("quantize") else None
    evaluation = steps.evaluate(cfg, base, pruned, aligned, nf4, blocks)
    clock = Clock()
    clock.start()
    result = steps.publish(cfg, base, blocks, aligned, nf4, evaluation)
    return clock.stop(uri=result["uri"], bytes=result["uploaded_bytes"], files=result["uploaded_files"])


def child_pull(size: str, work: Path, uri: str) -> dict:
    from loram_core.bucket import pull

    dest = work / "pulled" / size
    shutil.rmtree(dest, ignore_errors=True)
    clock = Clock()
    clock.start()
    manifest = pull(uri, dest, cache=False)
    return clock.stop(files=len(manifest.files), bytes=sum(f.size for f in manifest.files), dest=str(dest))


def child_stock(size: str, work: Path, dest: str, uri: str) -> dict:
    """Verify the version in the bucket, then load the pulled `model/` stock and compare with load_model."""
    import torch
    from transformers import AutoModelForCausalLM

    from loram_core.bucket import verify_version
    from loram_core.models import load_model

    t0 = time.perf_counter()
    manifest = verify_version(uri)
    verify_s = time.perf_counter() - t0
    model_dir = Path(dest) / "model"
    config = json.loads((model_dir / "config.json").read_text())
    index_file = model_dir / "model.safetensors.index.json"
    index = (
        json.loads(index_file.read_text())
        if index_file.is_file()
        else {"weight_map": {"": "model.safetensors"}}
    )
    t0 = time.perf_counter()
    stock = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # no remote code
    load_s = time.perf_counter() - t0
    ours = load_model(model_dir).eval()
    ids = torch.randint(0, config["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (stock(ids).logits - ours(ids).logits).abs().max().item()
    shards = sorted(set(index["weight_map"].values()))
    return {"verify_seconds": verify_s, "verified_files": len(manifest.files), "load_seconds": load_s,
            "class": type(stock).__name__, "auto_map": "auto_map" in config, "shards": len(shards),
            "shard_mib": [round((model_dir / s).stat().st_size / MiB, 1) for s in shards],
            "max_abs_logit_diff": diff, "widths": [config["intermediate_size"], config["num_attention_heads"],
                                                   config["num_key_value_heads"], config["head_dim"]],
            "original": config["loram"]["original"]}  # fmt: skip


CHILDREN = {"build": child_build, "data": child_data, "prune": child_prune, "align": child_align,
            "quantize": child_quantize, "evaluate": child_evaluate, "publish": child_publish,
            "pull": child_pull, "stock": child_stock}  # fmt: skip


def _child_main(name: str, size: str, work: Path, args: list[str]) -> None:
    if name != "pull":  # the libraries every model step loads: the baseline its peak RSS starts from
        import torch  # noqa: F401
        import transformers  # noqa: F401

        from loram_core import steps  # noqa: F401
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = CHILDREN[name](size, work, *args)
    result["rss_before_mib"] = before / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the parent


def run_child(name: str, size: str, work: Path, *args: str, env: dict | None = None) -> dict:
    """Run one step in a fresh process; its result with `wall` (process seconds) and `rss_mib` (peak)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--size", size, "--work", str(work),
           "--", *args]  # fmt: skip
    t0 = time.perf_counter()
    # One thread per child: on a shared 2-core machine OpenMP's spinning threads otherwise measure the
    # neighbours' load more than the step (the same choice as bench_prune.py).
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, env={**os.environ, **threads, **(env or {})}, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"child {name} {size} {args} failed ({proc.returncode})")
    line = next(x for x in reversed(out.splitlines()) if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result.update(wall=time.perf_counter() - t0, rss_mib=usage.ru_maxrss / 1024,
                  cpu=usage.ru_utime + usage.ru_stime)  # fmt: skip
    print(f"  {name:9s} {size:5s} {' '.join(args)[:30]:30s} {result.get('seconds', result['wall']):8.2f} s  "
          f"{result['rss_mib']:7.0f} MiB", flush=True)  # fmt: skip
    return result


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def start_s3() -> tuple[object, dict]:
    """moto's S3 server on loopback in this (parent) process, as tests/s3_server.py starts it; the env for children."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.s3_server import aws_env

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = aws_env(f"http://{host}:{port}")
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="scale")
    return server, env


def code_version() -> str:
    """The commit the bench ran at, `+dirty` when tracked files differ from it (a table names its code)."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "diff", "--quiet", "HEAD"], capture_output=True
    ).returncode
    return head.stdout.strip() + ("+dirty" if dirty else "")


def s3_part(size: str, work: Path) -> dict:
    """The stock-loadable version of `size` in shards: pruned, scored, published to S3, pulled, verified, loaded.

    Each in its own child, so the publish and pull rows measure those steps alone.
    """
    uniform = ["prune.keep_first=0", "prune.keep_last=0", "until=prune"]
    where = ["publish.uri=s3://scale", "publish.version=stock", f"publish.max_shard_size={SHARD}"]
    load_before, code = os.getloadavg(), code_version()
    server, env = start_s3()
    try:
        run_child("data", size, work)
        out = {"prune": run_child("prune", size, work, "random", *uniform, env=env)}
        out["evaluate"] = run_child("evaluate", size, work, "prune.strategy=random", *uniform, env=env)
        out["publish"] = run_child("publish", size, work, "prune.strategy=random", *uniform, *where, env=env)
        out["pull"] = run_child("pull", size, work, out["publish"]["uri"], env=env)
        out["stock"] = run_child("stock", size, work, out["pull"]["dest"], out["publish"]["uri"], env=env)
    finally:
        server.stop()
    return {**out, "load_before": load_before, "load_after": os.getloadavg(), "code": code}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--size", default="demo", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=REPO / ".loram" / "bench-scale", help="scratch folder (kept)")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of " + ",".join(SIZES))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "SCALE.md")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--render", action="store_true", help="re-render --out from the last run's results.json")
    p.add_argument(
        "--s3-only", action="store_true", help="re-run the S3 part alone into the last results.json"
    )
    a = p.parse_args()
    if a.child:
        return _child_main(a.child, a.size, a.work, a.rest)
    if a.render:
        a.out.write_text(render(**json.loads((a.work / "results.json").read_text())))
        return print(f"wrote {a.out}")
    # Every measured step computes afresh: the steps' cached outputs of an earlier run are removed
    # (the bases and the corpus, inputs that are not measured, are kept for reuse).
    for folder in ("steps", "bucket", "pulled"):
        shutil.rmtree(a.work / folder, ignore_errors=True)
    if a.s3_only:
        results = json.loads((a.work / "results.json").read_text())
        results["s3"] = s3_part(results["largest"], a.work)
        (a.work / "results.json").write_text(json.dumps(results, indent=2))
        a.out.write_text(render(**results))
        return print(f"wrote {a.out}")
    started, load_before, code = time.time(), os.getloadavg(), code_version()
    sizes = a.sizes.split(",")
    rows: dict[str, dict] = {}
    for size in sizes:
        print(f"size {size}", flush=True)
        r = rows[size] = {"params": run_child("build", size, a.work)["params"]}
        r["base_bytes"] = sum(f.stat().st_size for f in (a.work / "bases" / size).glob("*.safetensors"))
        run_child("data", size, a.work)
        r["prune"] = {s: run_child("prune", size, a.work, s) for s in STRATEGIES}
        r["align"] = run_child("align", size, a.work)
        r["quantize"] = run_child("quantize", size, a.work)
        r["evaluate"] = run_child("evaluate", size, a.work)
        r["publish"] = run_child("publish", size, a.work)
        r["pull"] = run_child("pull", size, a.work, r["publish"]["uri"])
    largest = sizes[-1]
    s3 = s3_part(largest, a.work)
    load_after = os.getloadavg()
    results = {"rows": rows, "s3": s3, "largest": largest, "load_before": load_before,
               "load_after": load_after, "seconds": time.time() - started, "code": code}  # fmt: skip
    (a.work / "results.json").write_text(json.dumps(results, indent=2))  # --render re-renders from it
    a.out.write_text(render(**results))
    print(f"wrote {a.out}")


# ---------------------------------------------------------------- the report


def _fit(rows: dict, get) -> tuple[str, str]:
    sizes = list(rows)
    xs = [rows[s]["params"] for s in sizes]
    ys = [get(rows[s]) for s in sizes]
    if len(xs) < 2:
        return "–", "–"
    all4 = f"{slope(xs, ys):.2f}"
    top3 = f"{slope(xs[1:], ys[1:]):.2f}" if len(xs) > 3 else "–"
    return all4, top3


def render(
    rows: dict,
    s3: dict,
    largest: str,
    load_before,
    load_after,
    seconds: float,
    code: str = "?",
    note: str = "",
) -> str:
    """SCALE.md from a run's results (`note`: a sentence kept in results.json, e.g. what changed since)."""
    import torch
    import transformers

    sizes = list(rows)
    steps = [(f"prune {s}", lambda r, s=s: r["prune"][s]) for s in STRATEGIES] + [
        ("align (per 1k tokens)", lambda r: {**r["align"], "seconds": r["align"]["seconds_per_1k"],
                                             "cpu_seconds": r["align"]["cpu_per_1k"]}),
        ("quantize (NF4)", lambda r: r["quantize"]), ("evaluate", lambda r: r["evaluate"]),
        ("publish (file://)", lambda r: r["publish"]), ("pull (verified)", lambda r: r["pull"]),
    ]  # fmt: skip
    head = (
        "| step | " + " | ".join(f"{s} s" for s in sizes) + " | exponent (4 sizes) | exponent (3 largest) |"
    )
    sep = "|---" * (len(sizes) + 3) + "|"
    time_rows, cpu_rows, rss_rows = [], [], []
    for name, get in steps:
        for key, out in (("seconds", time_rows), ("cpu_seconds", cpu_rows)):
            values = " | ".join(f"{get(rows[s])[key]:.2f}" for s in sizes)
            e4, e3 = _fit(rows, lambda r, get=get, key=key: max(get(r)[key], 1e-3))
            out.append(f"| {name} | {values} | {e4} | {e3} |")
        rss = " | ".join(f"{get(rows[s])['rss_mib']:,.0f}" for s in sizes)
        r4, r3 = _fit(rows, lambda r, get=get: get(r)["rss_mib"])
        rss_rows.append(f"| {name} | {rss} | {r4} | {r3} |")
    shape = "\n".join(
        f"| {s} | {rows[s]['params']:,} | {SIZES[s][0]:,} | {SIZES[s][1]} | {SIZES[s][2]} | {SIZES[s][3]} | "
        f"{SIZES[s][4]} / {SIZES[s][5]} | {rows[s]['base_bytes'] / MiB:,.1f} |"
        for s in sizes
    )
    big = rows[largest]
    ckpt = big["base_bytes"] / MiB
    ratios = "\n".join(
        f"| prune {s} | {big['prune'][s]['rss_mib']:,.0f} | {big['prune'][s]['rss_before_mib']:,.0f} | "
        f"{big['prune'][s]['rss_mib'] / ckpt:.2f} | {(big['prune'][s]['rss_mib'] - big['prune'][s]['rss_before_mib']) / ckpt:.2f} |"
        for s in STRATEGIES
    )
    st, pub, pul = s3["stock"], s3["publish"], s3["pull"]
    return f"""# How each step's cost grows with model size

Made by `bench/bench_scale.py` (issue 24); re-run it to refresh this file:

```
nice -n 10 .venv/bin/python bench/bench_scale.py
```

- machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU, shared with other work: load average
  {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1/5/15 min) before, {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} after; the bench ran under
  `nice -n 10` for {seconds / 60:.1f} min at commit {code}. torch {torch.__version__}, transformers {transformers.__version__}.
{f"- note: {note}{chr(10)}" if note else ""}- models: LLaMA shapes, random weights (seeded, std 0.02) in bf16, untied head, each with a byte-level
  BPE tokenizer of its vocabulary trained on the demo corpus (the stdlib docs). Every step runs as the
  pipeline runs it (`loram_core.steps`, `device=cpu`, `prune.dtype=auto` = float32 on the CPU), in a process
  of its own: *s* is the step's wall seconds inside that process (no imports, no input loading that other
  steps cache), *peak RSS* its `ru_maxrss` (`os.wait4`), which includes the ~{rows[sizes[0]]["prune"]["random"]["rss_before_mib"]:,.0f} MiB of imported
  libraries every child starts with.
- settings: ratio 0.65, layers 1..L-2 pruned (`keep_first=1, keep_last=1`), calibration 8 blocks of {SEQ} tokens,
  structured = Taylor `param_first` (streamed), semi = SparseGPT 2:4, unstructured = SparseGPT 65%; align
  {ALIGN_STEPS} steps of {ALIGN_BATCH} x {SEQ} tokens (AdamW, fp32 on the CPU) on the structured base, reported per 1,000
  tokens; quantize = NF4 of the aligned model; evaluate = held-out perplexity of the original, pruned,
  aligned and NF4 models on 4 blocks of {SEQ}; publish = the version (16-bit + NF4 + masks + card + manifest)
  into a file:// bucket; pull = download with every sha256 checked, cache off.
- exponent: the least-squares slope of log(value) against log(parameters): 1 is linear in model size.
  The smallest sizes are dominated by fixed costs (process set-up inside the step, per-layer Python, file
  opening), so the slope over the three largest sizes is the one that says how a larger model will behave.

## Sizes

| size | parameters | vocab | hidden | intermediate | layers | heads / KV heads | checkpoint MiB (bf16) |
|---|---|---|---|---|---|---|---|
{shape}

## Wall seconds per step

{head}
{sep}
{chr(10).join(time_rows)}

## CPU seconds per step (user + sys of the step's process while it ran)

Less sensitive than wall time to the other work on this shared machine (what another process takes
from the two cores is not counted), so its exponents are the steadier ones.

{head.replace(" s |", " CPU s |")}
{sep}
{chr(10).join(cpu_rows)}

## Peak RSS per step (MiB)

{head.replace(" s |", " MiB |")}
{sep}
{chr(10).join(rss_rows)}

## Pruning's resident memory against the checkpoint at {largest} ({ckpt:,.0f} MiB of bf16 safetensors)

| step | peak RSS MiB | RSS after imports MiB | peak / checkpoint | (peak - imports) / checkpoint |
|---|---|---|---|---|
{ratios}

Pruning streams one decoder layer at a time (cast to float32 on the CPU), so what it holds beyond the
libraries is about one layer, its calibration activations and the embeddings and head while calibration
inputs are captured, not the model.

## The largest version in shards, through S3, loaded stock

A {largest} version pruned with `random` in every layer (`keep_first=0, keep_last=0`, `until=prune`: the widths, not
the choice of channels, decide the layout) and
published with `publish.max_shard_size={SHARD}` to moto's S3 server on loopback:

Run after the tables above, at commit {s3.get("code", code)} (load average {s3["load_before"][0]:.2f} before, {s3["load_after"][0]:.2f} after), each step in its own process:

| what | value |
|---|---|
| prune `random`, every layer (s) | {s3["prune"]["seconds"]:.1f} ({s3["prune"]["cpu_seconds"]:.1f} CPU s; peak RSS {s3["prune"]["rss_mib"]:,.0f} MiB) |
| evaluate, original and pruned (s) | {s3["evaluate"]["seconds"]:.1f} ({s3["evaluate"]["cpu_seconds"]:.1f} CPU s); perplexity {s3["evaluate"]["metrics"]["original_ppl"]:,.0f} -> {s3["evaluate"]["metrics"]["pruned_ppl"]:,.0f} (random weights: the numbers only show the step ran) |
| publish to s3:// (s) | {pub["seconds"]:.1f} ({pub["files"]} files, {pub["bytes"] / MiB:,.0f} MiB uploaded; peak RSS {pub["rss_mib"]:,.0f} MiB) |
| pull, every sha256 checked (s) | {pul["seconds"]:.1f} ({pul["files"]} files, {pul["bytes"] / MiB:,.0f} MiB; peak RSS {pul["rss_mib"]:,.0f} MiB) |
| verify in place (`verify_version`, s) | {st["verify_seconds"]:.1f} ({st["verified_files"]} files) |
| `model/` shards (MiB each) | {st["shards"]}: {", ".join(f"{x:,.1f}" for x in st["shard_mib"])} |
| config | plain `llama` (auto_map: {st["auto_map"]}), widths intermediate/heads/KV heads/head_dim {"/".join(map(str, st["widths"]))}; original {st["original"]} |
| stock `AutoModelForCausalLM.from_pretrained` (no trust_remote_code) | {st["class"]}, loaded in {st["load_seconds"]:.1f} s |
| max abs logit difference, stock vs `load_model` (fp32) | {st["max_abs_logit_diff"]:.3g} |

## Reading the numbers

- By CPU time, pruning with SparseGPT grows faster than the parameter count (exponent {_fit(rows, lambda r: r["prune"]["semi"]["cpu_seconds"])[1]}
  over the three largest sizes): each linear's Hessian is factored and inverted, O(d^3) in its input width d,
  and d grows with the hidden size while the parameter count grows with hidden^2 x layers. Taylor and random
  pruning, alignment, quantization, evaluation, publish and pull grow about linearly or slower.
- Peak RSS of pruning grows far slower than the model (exponent {_fit(rows, lambda r: r["prune"]["semi"]["rss_mib"])[1]} for SparseGPT): it streams one layer.
  At {largest}, the streamed SparseGPT prune holds {(big["prune"]["semi"]["rss_mib"] - big["prune"]["semi"]["rss_before_mib"]) / ckpt:.2f}x the bf16 checkpoint above its imports,
  Taylor {(big["prune"]["structured"]["rss_mib"] - big["prune"]["structured"]["rss_before_mib"]) / ckpt:.2f}x (its backward also holds the embeddings and head, and a boundary's gradients).
  Alignment's ({big["align"]["rss_mib"]:,.0f} MiB) is the model, its gradients and AdamW's two moments in fp32.
- Wall seconds on this shared machine are the least steady column (quantize's at the small sizes is mostly
  waiting for a core); compare CPU seconds across sizes.
"""


if __name__ == "__main__":
    main()
