"""The publisher's GPU path, side by side with the peers, from one run on any CUDA machine.

    python bench/bench_gpu.py                       # TinyLlama-1.1B shape, cuda, peers if installed
    python bench/bench_gpu.py --shape 7b --only prune   # a 7B-shaped model, all four strategies
    python bench/bench_gpu.py --shape tiny --device cpu # the script's own logic, on any machine

Random weights (bf16) and seeded random tokens: speed and memory do not depend on what the weights
learned, and the perplexity columns compare contenders on the same model and text (they are not
language-model quality). Rows:
- prune: our streamed SparseGPT (2:4 and 50%), wall seconds, GPU peak, held-out perplexity; the
  same for llmcompressor's one-shot SparseGPT when it is importable (its sequential pipeline, same
  calibration blocks, bf16); with `--shape 7b`, all four strategies with their GPU peaks;
- align: tokens/s and MFU of our loop (bf16 autocast, fused AdamW, chunked loss) and of
  transformers' Trainer (bf16, fused AdamW) at the same batch and sequence length;
- evaluate and quantize seconds.
Writes `bench/gpu-results.json` and prints the markdown tables that go into bench/GPU.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
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
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}  # fmt: skip


def build_base(shape: str, out: Path, device: torch.device) -> Path:
    """A random-weight LLaMA of `shape`, bf16, saved as safetensors (initialised on the device: fast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="2GB")
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


def bench_prune(base: Path, work: Path, device: torch.device, strategies: list[str], calib, heldout) -> dict:
    """Our streamed pruning per strategy: seconds, GPU peak, held-out perplexity of the result."""
    from loram_core.config import PruneConfig
    from loram_core.evaluate import perplexity
    from loram_core.models import load_model
    from loram_core.prune import prune_checkpoint

    rows = {}
    for name in strategies:
        strategy, _, ratio = name.partition("@")
        cfg = PruneConfig(strategy=strategy, ratio=float(ratio or 0.5), calib_samples=len(calib))
        out = work / f"ours-{name}"
        _, seconds, peak = _timed(device, lambda: prune_checkpoint(base, out, cfg, calib, device=device))  # noqa: B023
        model = load_model(out, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
        rows[f"ours {name}"] = {"seconds": seconds, "gpu_peak_gib": peak, "ppl": perplexity(model, heldout)}
        del model
    return rows


def bench_llmcompressor(base: Path, data: Path, device: torch.device) -> dict:
    """llmcompressor's SparseGPT (2:4 and 50%) in a child process, if this Python has it."""
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        return {}
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


def bench_align(base: Path, device: torch.device, seq: int, batch: int, steps: int, vocab: int) -> dict:
    """Tokens/s and MFU: our loop vs transformers' Trainer, same model, batch and sequence length."""
    from loram_core.align import train_causal_lm
    from loram_core.config import AlignConfig
    from loram_core.device import peak_flops
    from loram_core.loss import training_flops_per_token
    from loram_core.models import load_model

    blocks = torch.randint(0, vocab, (batch * (steps + 2), seq), generator=torch.Generator().manual_seed(5))
    cfg = AlignConfig(steps=steps, batch_size=batch, log_every=max(1, steps // 4), warmup_steps=0,
                      micro_batch_size="auto", gradient_checkpointing=False)  # fmt: skip
    model = load_model(base).to(device)
    flops = training_flops_per_token(model, seq)
    # Warm-up steps (kernel selection, allocator) are not counted: two steps first, then the timed run.
    train_causal_lm(model, blocks[: 2 * batch], cfg.model_copy(update={"steps": 2}))
    result, seconds, peak = _timed(device, functools.partial(train_causal_lm, model, blocks, cfg))
    peak_f = peak_flops(device)
    rows = {"ours": {"tokens_per_s": result.tokens / seconds, "gpu_peak_gib": peak,
                     "mfu": result.tokens / seconds * flops / peak_f if peak_f else None}}  # fmt: skip
    del model
    rows["transformers Trainer"] = _trainer(base, blocks, device, batch, steps, flops, peak_f)
    return rows


def _trainer(base: Path, blocks, device, batch: int, steps: int, flops: float, peak_f: float | None) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": blocks[i].long(), "labels": blocks[i].long()}

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model.lm_head.weight.requires_grad_(False)  # as ours: the head stays frozen
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=batch, max_steps=steps + 2, bf16=device.type == "cuda",
                                 optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
                                 learning_rate=5e-5, logging_steps=10_000, save_strategy="no", report_to=[],
                                 dataloader_num_workers=0, use_cpu=device.type != "cuda")  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=Blocks())
        _, seconds, peak = _timed(device, trainer.train)
    tokens = (steps + 2) * batch * blocks.shape[1]  # its warm-up steps are inside its timing
    return {"tokens_per_s": tokens / seconds, "gpu_peak_gib": peak,
            "mfu": tokens / seconds * flops / peak_f if peak_f else None}  # fmt: skip


def bench_eval_quantize(base: Path, work: Path, device: torch.device, heldout) -> dict:
    """Seconds to score the held-out blocks, and to make the NF4 variant, on the device."""
    from loram_core.config import QuantizeConfig
    from loram_core.evaluate import perplexity
    from loram_core.models import load_model
    from loram_core.quantize import quantize_checkpoint

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(base, dtype=dtype).to(device)
    ppl, eval_s, _ = _timed(device, functools.partial(perplexity, model, heldout))
    del model
    _, quant_s, peak = _timed(
        device, lambda: quantize_checkpoint(base, work / "nf4", QuantizeConfig(), str(device))
    )
    return {"evaluate_s": eval_s, "dense_ppl": ppl, "quantize_s": quant_s, "quantize_gpu_peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", choices=["prune", "align", "all"], default="all")
    p.add_argument(
        "--calib", type=int, default=128, help="calibration blocks (llmcompressor's default count)"
    )
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=HERE / "gpu-results.json")
    args = p.parse_args()

    from safetensors.torch import save_file

    from loram_core.device import describe, resolve_device

    device = resolve_device(args.device)
    vocab = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (args.calib, args.seq), generator=g, dtype=torch.int32)
    heldout = torch.randint(0, vocab, (32, args.seq), generator=g, dtype=torch.int32)
    results: dict = {"device": describe(device), "shape": {"name": args.shape, **SHAPES[args.shape]},
                     "calib_blocks": args.calib, "seq_len": args.seq}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loram-bench-gpu-") as tmp:
        work = Path(tmp)
        base = build_base(args.shape, work / "base", device)
        data = work / "data.safetensors"
        save_file({"calib": calib, "heldout": heldout}, str(data))
        if args.only in ("prune", "all"):
            strategies = ["semi", "unstructured@0.5"]
            if args.shape == "7b":
                strategies += ["random@0.65", "structured@0.65"]
            results["prune"] = bench_prune(base, work, device, strategies, calib, heldout)
            results["prune"].update(bench_llmcompressor(base, data, device))
        if args.only in ("align", "all"):
            results["align"] = bench_align(base, device, args.seq, args.batch, args.steps, vocab)
            results["evaluate_quantize"] = bench_eval_quantize(base, work, device, heldout)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    """The tables of bench/GPU.md from one run's results."""
    lines = [f"device: {results['device']}", f"shape: {results['shape']}", ""]
    if "prune" in results:
        lines += ["| prune | seconds | GPU peak GiB | held-out ppl |", "|---|---:|---:|---:|"]
        for name, r in results["prune"].items():
            lines.append(f"| {name} | {r['seconds']:.1f} | {r['gpu_peak_gib']} | {r['ppl']:.3f} |")
        lines.append("")
    if "align" in results:
        lines += ["| align | tokens/s | MFU | GPU peak GiB |", "|---|---:|---:|---:|"]
        for name, r in results["align"].items():
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {r['gpu_peak_gib']} |")
        lines.append("")
        lines.append(f"evaluate/quantize: {results['evaluate_quantize']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
