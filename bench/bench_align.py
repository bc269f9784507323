"""Alignment loop speed: our `train_causal_lm` vs Hugging Face `transformers.Trainer` (and FLoRA).

Same model (a ~10M-parameter LlamaForCausalLM built from config, same seed), same 128-token blocks,
batch size, gradient accumulation, warmup + cosine schedule to 10%, AdamW, max_grad_norm 1.0,
lm_head frozen, fp32 on the CPU (or the first GPU), no evaluation, no checkpoints, no logging.
Each contender runs in its own subprocess, one after the other, so none shares the cores with
another. Tokens/s are taken between the end of step `--warmup` and the end of the last step
(both loops are timed at the same point: after optimizer, scheduler and zero_grad); peak RSS is the
child's `ru_maxrss`. Ratios are within one run. About 3.5 minutes on 2 CPU cores.

    python bench/bench_align.py [--steps 20] [--warmup 4] [--batch 8] [--grad-accum 2] [--write bench/ALIGN.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENDERS = ("ours", "trainer", "flora")
LABELS = {
    "ours": "ours: `train_causal_lm` (AdamW)",
    "trainer": "transformers `Trainer` (adamw_torch)",
    "flora": "ours: `train_causal_lm` (FLoRA r=8)",
}
MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=2048,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
LR, MIN_LR_RATIO, SEED = 1e-3, 0.1, 0


# ---------------------------------------------------------------------------------------- data


def make_blocks(kind: str, seq_len: int, out: Path) -> str:
    """Writes int32 `[n, seq_len]` training blocks to `out`; returns where they came from."""
    import torch
    from safetensors.torch import save_file

    source = "random tokens"
    blocks = None
    if kind == "demo":
        bases = sorted(Path("~/.cache/loram-provider").expanduser().glob("demo-base-*/tokenizer.json"))
        if bases:
            from transformers import AutoTokenizer

            from loram_core.data import demo_corpus_file, pack

            tok = AutoTokenizer.from_pretrained(bases[0].parent)
            if len(tok) <= MODEL["vocab_size"]:
                text = demo_corpus_file("~/.cache/loram-provider").read_text()
                docs = [d for d in text.split("\n\n") if d.strip()]
                blocks = pack(docs, tok, seq_len)
                source = f"demo corpus, tokenizer of {bases[0].parent.name}"
    if blocks is None:
        gen = torch.Generator().manual_seed(SEED)
        blocks = torch.randint(0, MODEL["vocab_size"], (4096, seq_len), generator=gen, dtype=torch.int32)
    save_file({"train": blocks.contiguous()}, str(out))
    return f"{source}, {blocks.shape[0]} blocks of {seq_len}"


# ------------------------------------------------------------------------------ child process


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    return LlamaForCausalLM(LlamaConfig(**MODEL))


def _stamp() -> tuple[float, float, int]:
    """(wall s, this process's CPU s, busy jiffies of the whole machine): taken at each step's end."""
    import torch

    with open("/proc/stat") as fh:
        cpu = [int(x) for x in fh.readline().split()[1:]]
    busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time(), busy


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _one_step_state_bytes(model, name: str, blocks, batch: int) -> int:
    """Optimizer-state bytes after one step of a fresh `name` optimizer on `model`'s trainable params."""
    from loram_core.optim import build_optimizer, optimizer_state_bytes

    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(name, params, lr=LR, weight_decay=0.0, flora_rank=8, flora_kappa=100, seed=SEED)
    ids = blocks[:batch].long().to(next(model.parameters()).device)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    n = optimizer_state_bytes(opt)
    opt.zero_grad(set_to_none=True)
    return n


def run_ours(spec: dict, blocks, model) -> dict:
    from loram_core.align import train_causal_lm
    from loram_core.config import AlignConfig

    optimizer = "flora" if spec["contender"] == "flora" else "adamw"
    cfg = AlignConfig(
        steps=spec["steps"],
        batch_size=spec["batch"],
        grad_accum=spec["grad_accum"],
        lr=LR,
        warmup_steps=spec["warmup"],
        min_lr_ratio=MIN_LR_RATIO,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optimizer=optimizer,
        flora_rank=8,
        flora_kappa=100,
        freeze_lm_head=True,
        precision="fp32",
        log_every=1,  # the progress callback is our per-step clock; it costs a dict per step
        checkpoint_every=10**9,
        seed=SEED,
    )
    stamps: list[tuple[float, float, int]] = []
    t0 = time.perf_counter()
    result = train_causal_lm(model, blocks, cfg, progress=lambda ev: stamps.append(_stamp()))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "stamps": stamps,
        "wall": wall,
        "peak_rss": peak,
        "mean_loss": sum(v for _, v in result.losses) / len(result.losses),
        "state_bytes": _one_step_state_bytes(model, optimizer, blocks, spec["batch"]),
    }


def run_trainer(spec: dict, blocks, model) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from loram_core.optim import optimizer_state_bytes

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return blocks.shape[0]

        def __getitem__(self, i: int) -> dict:
            ids = blocks[i].long()
            return {"input_ids": ids, "labels": ids}

    stamps: list[tuple[float, float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after optimizer, scheduler, zero_grad
            stamps.append(_stamp())

    model.lm_head.weight.requires_grad_(False)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=spec["steps"],
            per_device_train_batch_size=spec["batch"],
            gradient_accumulation_steps=spec["grad_accum"],
            learning_rate=LR,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATIO},
            warmup_steps=spec["warmup"],
            weight_decay=0.0,
            optim=spec.get("trainer_optim", "adamw_torch"),
            max_grad_norm=1.0,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=False,
            dataloader_num_workers=0,
            seed=SEED,
        )
        t0 = time.perf_counter()
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()])
        out_ = trainer.train()
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "stamps": stamps,
        "wall": wall,
        "peak_rss": peak,
        "mean_loss": out_.training_loss,
        "state_bytes": optimizer_state_bytes(getattr(trainer.optimizer, "optimizer", trainer.optimizer)),
    }


def child(spec: dict) -> None:
    import torch
    from safetensors.torch import load_file

    if not torch.cuda.is_available():
        torch.set_num_threads(spec["threads"])
    blocks = load_file(spec["blocks"])["train"]
    model = _model()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    spec = dict(spec, params=sum(p.numel() for p in model.parameters()))
    if spec["contender"] == "trainer":  # imports count in the baseline, not in training
        import transformers.trainer  # noqa: F401
    else:
        import loram_core.align  # noqa: F401
    rss_before = _rss()
    run = run_trainer if spec["contender"] == "trainer" else run_ours
    out = run(spec, blocks, model)
    stamps, w = out.pop("stamps"), spec["warmup_excluded"]
    assert len(stamps) == spec["steps"], f"expected {spec['steps']} step stamps, got {len(stamps)}"
    tokens_per_step = spec["batch"] * spec["grad_accum"] * blocks.shape[1]
    timed = stamps[w - 1 :]
    walls = sorted(b[0] - a[0] for a, b in zip(timed[:-1], timed[1:], strict=True))
    cpus = sorted(b[1] - a[1] for a, b in zip(timed[:-1], timed[1:], strict=True))
    wall = timed[-1][0] - timed[0][0]
    own = timed[-1][1] - timed[0][1]
    machine = (timed[-1][2] - timed[0][2]) / os.sysconf("SC_CLK_TCK")
    out.update(
        contender=spec["contender"],
        device=str(device),
        params=spec["params"],
        rss_before=rss_before,
        # the median step: robust to bursts of other work on a shared machine
        tokens_per_s=tokens_per_step / walls[len(walls) // 2],
        tokens_per_s_mean=tokens_per_step * len(walls) / wall,
        step_ms=1e3 * walls[len(walls) // 2],
        cpu_ms=1e3 * cpus[len(cpus) // 2],
        others_cpu=max(0.0, (machine - own) / (wall * os.cpu_count())),
        torch_threads=torch.get_num_threads(),
    )
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------- parent


def table(rows: dict[str, dict]) -> str:
    ref, adam_state = rows["trainer"], rows["ours"]["state_bytes"]
    lines = [
        "| loop | tokens/s | vs Trainer | ms/step | CPU ms/step | vs Trainer (CPU) | train() wall s | "
        "peak RSS MiB | RSS at start MiB | optimizer state MiB | state vs AdamW | mean loss | others' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {LABELS[name]} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.3f} | "
            f"{r['step_ms']:,.0f} | {r['cpu_ms']:,.0f} | {ref['cpu_ms'] / r['cpu_ms']:.3f} | "
            f"{r['wall']:.1f} | {r['peak_rss'] / 2**20:,.0f} | {r['rss_before'] / 2**20:,.0f} | "
            f"{r['state_bytes'] / 2**20:.2f} | {r['state_bytes'] / adam_state:.3f} | {r['mean_loss']:.3f} | "
            f"{100 * r['others_cpu']:.0f}% |"
        )
    return "\n".join(lines)


NOTES = """\
- tokens/s: tokens per step over the median wall time of the timed steps (the median resists bursts
  of other work on a shared machine); with `--rounds N` each contender's fastest round is kept.
- CPU ms/step: the median step's CPU time of the contender's process; it barely moves when other
  processes take cores, so compare it when "others' CPU" (share of the machine's cores busy with
  other processes during the timed steps) is not near 0%. "vs Trainer (CPU)" is Trainer CPU / ours.
- RSS at start: after the model, the data and the loop's imports; peak RSS is `ru_maxrss`.
- optimizer state: `loram_core.optim.optimizer_state_bytes` after one step (lm_head frozen, so
  not counted); the Trainer row measures the Trainer's own AdamW after training.
- mean loss: mean training loss over all steps (sanity check: the loops train alike; the sample
  order differs, so the numbers differ a little).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per contender")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (more oversubscribe a busy box)"
    )
    parser.add_argument("--data", choices=("demo", "random"), default="demo")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat all contenders, order reversed each round"
    )
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--write", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: JSON spec of one contender
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if "ours" not in args.only or "trainer" not in args.only:
        parser.error("--only must include ours and trainer (the ratios are taken against them)")
    if not 1 <= args.warmup < args.steps - 1:
        parser.error("--warmup must be at least 1 and leave at least two timed steps")

    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        blocks_file = Path(tmp) / "blocks.safetensors"
        source = make_blocks(args.data, args.seq, blocks_file)
        for round_ in range(args.rounds):
            for name in args.only if round_ % 2 == 0 else reversed(args.only):
                runs[name].append(_run_child(name, args, blocks_file))
                r = runs[name][-1]
                print(
                    f"  round {round_ + 1} {name}: {r['tokens_per_s']:,.0f} tokens/s, {r['cpu_ms']:,.0f} CPU ms/step,"
                    f" others' CPU {100 * r['others_cpu']:.0f}%",
                    file=sys.stderr,
                    flush=True,
                )
    rows = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in runs.items()}

    r = rows["ours"]
    header = (
        f"device={r['device']} threads={r['torch_threads']} params={r['params'] / 1e6:.2f}M "
        f"(lm_head frozen) batch={args.batch}x{args.seq} grad_accum={args.grad_accum} "
        f"({args.batch * args.grad_accum * args.seq} tokens/step) steps={args.steps} "
        f"timed=steps {args.warmup + 1}..{args.steps} rounds={args.rounds} data={source}"
    )
    body = table(rows)
    ratio = rows["ours"]["tokens_per_s"] / rows["trainer"]["tokens_per_s"]
    cpu_ratio = rows["trainer"]["cpu_ms"] / rows["ours"]["cpu_ms"]
    summary = f"ours / Trainer: {ratio:.3f} by tokens/s, {cpu_ratio:.3f} by CPU time per step"
    print(header, "", body, "", summary, sep="\n")
    if args.write:
        cmd = "nice -n 10 .venv/bin/python bench/bench_align.py " + " ".join(sys.argv[1:])
        args.write.write_text(
            "# Alignment loop vs transformers Trainer\n\n"
            f"```\n{cmd}\n```\n\n{header}\n\n{body}\n\n{summary}\n\n{NOTES}"
        )


def _run_child(name: str, args: argparse.Namespace, blocks_file: Path) -> dict:
    spec = {
        "contender": name,
        "steps": args.steps,
        "warmup": args.warmup,  # schedule warmup, also the steps left out of the timing
        "warmup_excluded": args.warmup,
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "threads": args.threads,
        "blocks": str(blocks_file),
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
    )
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(found[-1][len("RESULT ") :])


if __name__ == "__main__":
    main()
