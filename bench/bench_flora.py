"""Optimizer state and speed: AdamW vs our Flora (vs the authors' flora-opt, when installed).

Runs a few training steps of a ~10M-parameter Llama on random tokens, on CPU or the first GPU,
and prints one table; ratios are taken within this one run. Takes well under two minutes on CPU.

    python bench/bench_flora.py [--steps 6] [--rank 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loram_core.optim import build_optimizer, optimizer_state_bytes


def _model(device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(device).train()


def _optimizers(rank: int) -> dict[str, Callable]:
    makers: dict[str, Callable] = {
        "adamw": lambda ps: build_optimizer("adamw", ps, lr=1e-3, weight_decay=0.01),
        f"flora r={rank} (ours)": lambda ps: build_optimizer(
            "flora", ps, lr=1e-3, weight_decay=0.01, flora_rank=rank, flora_kappa=100
        ),
    }
    try:  # the authors' reference (LGPL-3): measured only when someone installed it
        from flora_opt import Flora as ReferenceFlora
    except Exception:  # ImportError, or its bitsandbytes/accelerate imports failing
        ReferenceFlora = None
    if ReferenceFlora is not None:
        makers[f"flora-opt r={rank}"] = lambda ps: ReferenceFlora(
            ps, lr=1e-3, rank=rank, kappa=100, beta1=0.9, weight_decay=0.01, relative_step=False
        )
    return makers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per optimizer (after 2 warm-up)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (more oversubscribe a busy box)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tokens = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(
        device
    )

    rows = []
    for name, make in _optimizers(args.rank).items():
        model = _model(device)
        opt = make(model.parameters())
        step_seconds = 0.0
        t0 = 0.0
        for i in range(args.steps + 2):
            if i == 2:  # warm-up done: state exists, kernels are loaded
                _sync(device)
                t0, step_seconds = time.perf_counter(), 0.0
            model(input_ids=tokens, labels=tokens).loss.backward()
            _sync(device)
            s0 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            step_seconds += time.perf_counter() - s0
        _sync(device)
        total = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            (name, params, optimizer_state_bytes(opt), args.steps / total, 1e3 * step_seconds / args.steps)
        )

    base = rows[0][2]
    print(
        f"device={device}  params={rows[0][1] / 1e6:.1f}M  batch={args.batch}x{args.seq}  timed steps={args.steps}"
    )
    print(f"{'optimizer':<22} {'state MiB':>10} {'vs adamw':>9} {'steps/s':>8} {'opt.step ms':>12}")
    for name, _, state, rate, step_ms in rows:
        print(f"{name:<22} {state / 2**20:>10.2f} {state / base:>9.3f} {rate:>8.2f} {step_ms:>12.1f}")


if __name__ == "__main__":
    main()
