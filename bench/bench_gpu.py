"""The publisher's GPU path, side by side with the peers, section by section, on any CUDA machine.

    python bench/bench_gpu.py --section all --out-dir $OUT          # TinyLlama-1.1B shape, every section
    python bench/bench_gpu.py --section prune-semi --out-dir $OUT   # one section (bench/gpu_check.sh's way)
    python bench/bench_gpu.py --shape 7b --section prune-7b --out-dir $OUT   # 7B shape, four strategies
    python bench/bench_gpu.py --shape tiny --device cpu --section all       # the logic, on any machine

Random weights (bf16) and seeded random tokens: speed and memory do not depend on what the weights
learned, and the perplexity columns compare contenders on the same model and text (they are not
language-model quality). Sections, each writing `<out-dir>/<section>.json` the moment it ends (a
later crash keeps what finished); the base is built once into `--work` and reused by later runs:
- prune-semi, prune-unstructured: our streamed SparseGPT (2:4, 50%): wall seconds, GPU peak,
  held-out perplexity; llmcompressor: its one-shot SparseGPT on the same blocks when importable;
- prune-streamed: Taylor (structured 0.65) and random, streamed;
- prune-7b (`--shape 7b`): all four strategies, each output deleted once scored (disk: GPU.md);
- align-eager, align-compiled: our loop (bf16 weights with fp32 masters, fused AdamW, chunked loss),
  compile off/on: the `auto` probe's seconds and the warm-up (first `WARMUP_STEPS` steps, compile
  included) apart from the steady tokens/s and MFU; align-trainer: transformers' Trainer the same way;
- nf4: quantize to NF4 and score it (skipped, saying so, without bitsandbytes); evaluate: perplexity.
Nothing here imports prefect or datasets; pydantic comes from the carried wheels (gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHAPES = {
    # TinyLlama-1.1B: 22 layers, 2048 wide, GQA 32/4.
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    # LLaMA-2-7B's shape (plain multi-head attention).
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}  # fmt: skip
SECTIONS = ("base", "prune-semi", "prune-unstructured", "llmcompressor", "prune-streamed", "align-eager",
            "align-compiled", "align-trainer", "nf4", "evaluate")  # fmt: skip
WARMUP_STEPS = 2  # steps not counted in the steady tokens/s (kernel selection, compilation, allocator)


def build_base(shape: str, out: Path, device: torch.device) -> Path:
    """A random-weight LLaMA of `shape`, bf16, saved as safetensors (initialised on the device: fast).

    Kept in `out` for the next section (built once per work dir and shape).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="2GB")
    tmp.rename(out)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _timed(device: torch.device, fn):
    from loram_core.device import peak_memory_gib, reset_peak_memory, synchronize

    reset_peak_memory(device)
    synchronize(device)
    t0 = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - t0, peak_memory_gib(device)


def _eval_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def prune_rows(base: Path, work: Path, device: torch.device, strategies: list[str], calib, heldout,
               keep_outputs: bool = True) -> dict:  # fmt: skip
    """Our streamed pruning per strategy: seconds, GPU peak, held-out perplexity of the result.

    Without `keep_outputs` each strategy's checkpoint is deleted once scored (the 7B run's disk).
    """
    from loram_core.config import PruneConfig
    from loram_core.evaluate import perplexity
    from loram_core.models import load_model
    from loram_core.prune import prune_checkpoint

    rows = {}
    for name in strategies:
        strategy, _, ratio = name.partition("@")
        cfg = PruneConfig(strategy=strategy, ratio=float(ratio or 0.5), calib_samples=len(calib))
        out = work / f"ours-{name}"
        shutil.rmtree(out, ignore_errors=True)
        _, seconds, peak = _timed(device, lambda: prune_checkpoint(base, out, cfg, calib, device=device))  # noqa: B023
        model = load_model(out, dtype=_eval_dtype(device)).to(device)
        rows[f"ours {name}"] = {"seconds": seconds, "gpu_peak_gib": peak, "ppl": perplexity(model, heldout)}
        del model
        if not keep_outputs:
            shutil.rmtree(out)
    return rows


def llmcompressor_rows(base: Path, data: Path, device: torch.device) -> dict:
    """llmcompressor's SparseGPT (2:4 and 50%) in a child process, if this Python has it."""
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        return {"skipped": "llmcompressor is not importable here"}
    rows = {}
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    for pattern, label in (("2:4", "semi"), ("unstructured", "unstructured@0.5")):
        cmd = [sys.executable, str(HERE / "_peer_llmc.py"), "--base", str(base), "--data", str(data),
               "--method", "sparsegpt", "--pattern", pattern, "--dtype", dtype]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res = json.loads(next(line for line in out.splitlines() if line.startswith("BENCH_RESULT"))[13:])
        rows[f"llmcompressor {label}"] = {"seconds": res["prune_s"], "gpu_peak_gib": res.get("gpu_peak_gib"),
                                          "ppl": res["ppl"], "version": res["version"]}  # fmt: skip
    return rows


def _steady(marks: list[tuple[int, float]], tokens_per_step: int) -> float | None:
    """Tokens/s between the first and the last (step, time) mark: the warm-up steps left out."""
    if len(marks) < 2:
        return None
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return (s1 - s0) * tokens_per_step / (t1 - t0)


def align_row(base: Path, device: torch.device, seq: int, batch: int, steps: int, vocab: int,
              compile_layers: bool) -> dict:  # fmt: skip
    """Our loop: probe seconds, warm-up seconds, steady tokens/s and MFU, GPU peak."""
    from loram_core.align import train_causal_lm
    from loram_core.config import AlignConfig
    from loram_core.device import peak_flops, synchronize
    from loram_core.loss import training_flops_per_token
    from loram_core.models import load_model

    blocks = torch.randint(0, vocab, (batch * steps, seq), generator=torch.Generator().manual_seed(5))
    cfg = AlignConfig(steps=steps, batch_size=batch, log_every=1, warmup_steps=0, micro_batch_size="auto",
                      gradient_checkpointing=False, compile=compile_layers,
                      precision="bf16-master" if device.type == "cuda" else "fp32")  # fmt: skip
    model = load_model(base).to(device)
    flops = training_flops_per_token(model, seq)
    marks: list[tuple[int, float]] = []

    def progress(event: dict) -> None:  # the event read the step's gradient norm: the GPU is done
        synchronize(device)
        if event["step"] >= WARMUP_STEPS:
            marks.append((event["step"], time.perf_counter()))

    t0 = time.perf_counter()
    result, seconds, peak = _timed(device, lambda: train_causal_lm(model, blocks, cfg, progress=progress))
    warmup = marks[0][1] - t0 - result.probe_seconds if marks else None
    tps = _steady(marks, batch * seq)
    peak_f = peak_flops(device)
    return {"tokens_per_s": tps, "mfu": tps * flops / peak_f if peak_f and tps else None, "gpu_peak_gib": peak,
            "probe_s": result.probe_seconds, "micro_batch_size": result.micro_batch_size,
            "warmup_s": warmup, "warmup_steps": WARMUP_STEPS, "steps": steps, "total_s": seconds,
            "precision": cfg.precision, "compile": compile_layers}  # fmt: skip


def trainer_row(base: Path, device: torch.device, seq: int, batch: int, steps: int, vocab: int) -> dict:
    """transformers' Trainer (bf16, fused AdamW) on the same model, batch and length, timed the same way."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from loram_core.device import peak_flops, synchronize
    from loram_core.loss import training_flops_per_token

    blocks = torch.randint(0, vocab, (batch * steps, seq), generator=torch.Generator().manual_seed(5))

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": blocks[i].long(), "labels": blocks[i].long()}

    marks: list[tuple[int, float]] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            synchronize(device)
            if state.global_step >= WARMUP_STEPS:
                marks.append((state.global_step, time.perf_counter()))

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model.lm_head.weight.requires_grad_(False)  # as ours: the head stays frozen
    flops = training_flops_per_token(model, seq)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=batch, max_steps=steps, bf16=device.type == "cuda",
                                 optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
                                 learning_rate=5e-5, logging_steps=10_000, save_strategy="no", report_to=[],
                                 dataloader_num_workers=0, use_cpu=device.type != "cuda")  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Marks()])
        _, seconds, peak = _timed(device, trainer.train)
    tps = _steady(marks, batch * seq)
    peak_f = peak_flops(device)
    return {"tokens_per_s": tps, "mfu": tps * flops / peak_f if peak_f and tps else None, "gpu_peak_gib": peak,
            "steps": steps, "total_s": seconds}  # fmt: skip


def nf4_row(base: Path, work: Path, device: torch.device, heldout) -> dict:
    """Seconds to make the NF4 variant, and its held-out perplexity (bf16 side modules, as evaluate)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"skipped": "bitsandbytes is not importable here (not in the carried wheels): NF4 not run"}
    from loram_core.config import QuantizeConfig
    from loram_core.evaluate import perplexity
    from loram_core.models import load_model
    from loram_core.quantize import quantize_checkpoint

    out = work / "nf4"
    shutil.rmtree(out, ignore_errors=True)
    _, quant_s, peak = _timed(device, lambda: quantize_checkpoint(base, out, QuantizeConfig(), str(device)))
    model = load_model(out, dtype=_eval_dtype(device), device_map=str(device))
    ppl, eval_s, _ = _timed(device, lambda: perplexity(model, heldout))
    return {"quantize_s": quant_s, "quantize_gpu_peak_gib": peak, "nf4_ppl": ppl, "evaluate_s": eval_s}


def evaluate_row(base: Path, device: torch.device, heldout) -> dict:
    """Seconds to score the held-out blocks with the dense base on the device."""
    from loram_core.evaluate import perplexity
    from loram_core.models import load_model

    model = load_model(base, dtype=_eval_dtype(device)).to(device)
    ppl, eval_s, peak = _timed(device, lambda: perplexity(model, heldout))
    return {"evaluate_s": eval_s, "dense_ppl": ppl, "gpu_peak_gib": peak, "heldout_tokens": heldout.numel()}


def run_section(name: str, args, base: Path, work: Path, data: Path, calib, heldout, device) -> dict:  # noqa: ANN001
    """One section's rows (see the module docstring)."""
    vocab = SHAPES[args.shape]["vocab_size"]
    if name == "base":  # built before any section: this one only records it
        return {"base": {"bytes": sum(f.stat().st_size for f in base.glob("*.safetensors"))}}
    if name == "prune-semi":
        return prune_rows(base, work, device, ["semi"], calib, heldout)
    if name == "prune-unstructured":
        return prune_rows(base, work, device, ["unstructured@0.5"], calib, heldout)
    if name == "llmcompressor":
        return llmcompressor_rows(base, data, device)
    if name == "prune-streamed":
        return prune_rows(
            base, work, device, ["structured@0.65", "random@0.65"], calib[: args.taylor_calib], heldout
        )
    if name == "prune-7b":
        return prune_7b(base, work, device, calib, heldout, args.taylor_calib, args.shape)
    if name in ("align-eager", "align-compiled"):
        row = align_row(base, device, args.seq, args.batch, args.steps, vocab, name == "align-compiled")
        return {f"ours {name.removeprefix('align-')}": row}
    if name == "align-trainer":
        return {"transformers Trainer": trainer_row(base, device, args.seq, args.batch, args.steps, vocab)}
    if name == "nf4":
        return {"nf4": nf4_row(base, work, device, heldout)}
    if name == "evaluate":
        return {"dense": evaluate_row(base, device, heldout)}
    raise SystemExit(f"unknown section {name!r}: one of {', '.join(SECTIONS + ('prune-7b', 'all'))}")


def prune_7b(
    base: Path, work: Path, device: torch.device, calib, heldout, taylor_calib: int, shape_name: str
) -> dict:
    """All four strategies on the 7B shape, one output on disk at a time; Taylor's spills in host memory.

    Streamed Taylor keeps every layer's calibration inputs until its backward pass reaches them
    (`loram_core.prune.taylor`); they go to the temporary directory, here /dev/shm (host memory)
    when it has room for them, so the 64 GiB disk holds only the base and one output (GPU.md).
    """
    shape = SHAPES[shape_name]  # "7b" on the GPU (any shape runs the logic)
    spill = shape["num_hidden_layers"] * taylor_calib * calib.shape[1] * shape["hidden_size"] * 2
    shm = Path("/dev/shm")
    in_memory = shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * spill
    if in_memory:
        tempfile.tempdir = str(shm)
    rows = prune_rows(base, work, device, ["semi", "unstructured@0.5"], calib, heldout, keep_outputs=False)
    rows.update(prune_rows(base, work, device, ["structured@0.65", "random@0.65"], calib[:taylor_calib], heldout,
                           keep_outputs=False))  # fmt: skip
    rows["taylor_spill"] = {"bytes": spill, "where": str(shm) if in_memory else tempfile.gettempdir()}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    p.add_argument("--device", default="cuda")
    p.add_argument("--section", default="all", help=f"one of {', '.join(SECTIONS)}, prune-7b, or all")
    p.add_argument(
        "--calib", type=int, default=128, help="calibration blocks (llmcompressor's default count)"
    )
    p.add_argument(
        "--taylor-calib", type=int, default=32, help="calibration blocks of the streamed Taylor prune"
    )
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--steps", type=int, default=12, help="alignment steps (the first WARMUP_STEPS not counted)"
    )
    p.add_argument(
        "--work", type=Path, default=None, help="keeps the base between runs (default: a temp dir)"
    )
    p.add_argument("--out-dir", type=Path, default=HERE / "gpu-out")
    args = p.parse_args()

    from safetensors.torch import save_file

    from loram_core.device import describe, resolve_device

    device = resolve_device(args.device)
    vocab = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (args.calib, args.seq), generator=g, dtype=torch.int32)
    heldout = torch.randint(0, vocab, (32, args.seq), generator=g, dtype=torch.int32)
    names = list(SECTIONS) if args.section == "all" else [args.section]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    context = {"device": describe(device), "shape": {"name": args.shape, **SHAPES[args.shape]},
               "calib_blocks": args.calib, "seq_len": args.seq, "torch": torch.__version__}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loram-bench-gpu-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = build_base(args.shape, work / f"base-{args.shape}", device)
        data = work / "data.safetensors"
        save_file({"calib": calib, "heldout": heldout}, str(data))
        failed = []
        for name in names:
            t0 = time.perf_counter()
            try:
                rows = run_section(name, args, base, work, data, calib, heldout, device)
                record = {"section": name, "ok": True, **context, "rows": rows}
            except Exception as err:  # one section's failure is recorded; the next still runs
                record = {"section": name, "ok": False, **context, "error": repr(err),
                          "traceback": traceback.format_exc()}  # fmt: skip
                failed.append(name)
            record["wall_s"] = time.perf_counter() - t0
            (args.out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
            print(markdown(record), flush=True)
    if failed:
        raise SystemExit(f"sections failed: {', '.join(failed)} (see their JSON in {args.out_dir})")


def markdown(record: dict) -> str:
    """One section's rows as the markdown table of bench/GPU.md."""
    head = f"## {record['section']} ({record['wall_s']:.1f} s, {record['device'].get('name')})"
    if not record["ok"]:
        return f"{head}\nFAILED: {record['error']}\n"
    rows = record["rows"]
    keys = sorted({k for r in rows.values() if isinstance(r, dict) for k in r})
    lines = [head, "| row | " + " | ".join(keys) + " |"]
    lines.append("|---|" + "---:|" * len(keys))
    for name, r in rows.items():
        if not isinstance(r, dict):
            lines.append(f"| {name} | {r} |")
            continue
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
