"""The bench's base models: the demo's, and a larger one built with the same machinery (`loram_core.demo`).

Both are LLaMA-architecture GQA models on the demo corpus (the stdlib docs), its tokenizer and its
held-out split, so perplexities are comparable across them and with `make demo`:

| name | layers x hidden | MLP | heads / KV heads | parameters | pretraining |
|---|---|---|---|---|---|
| `demo` | 6 x 128 | 384 | 4 / 2 | 1.71 M | 900 steps x 16 x 128 tokens (1.8 M tokens), lr 5e-3 |
| `larger` | 8 x 256 | 768 | 8 / 4 | 7.34 M | 1,200 steps x 16 x 128 tokens (2.5 M tokens), lr 3e-3 |

Held-out perplexity (`bench/QUALITY.md`): demo 59.23, larger 63.65. The larger one is the more
undertrained (0.33 tokens per parameter against 1.1), so it scores worse dense but loses less to
pruning. It takes about 4x the demo's compute per step and 1.3x its steps. On a shared machine
build it with OMP_NUM_THREADS=1: two threads on oversubscribed cores cost 4-5x the CPU time per step
(measured here: 6.5 vs 1.4 CPU-s per step). Each is cached, keyed by its settings and the corpus
(`build_demo_base`): the demo's where `make demo` keeps it
(`~/.cache/loram-provider`), the larger one under `~/.cache/loram-provider/bench` (override with
`LORAM_BENCH_CACHE`), so a second bench, or another bench, reuses it.

    from bench._models import prepare
    base_dir, blocks_file = prepare("larger", workdir)     # builds once, then a few seconds
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_CACHE = os.environ.get("LORAM_BENCH_CACHE", "~/.cache/loram-provider/bench")

# Overrides of configs/demo.yaml that define each model (its corpus, tokenizer and split are the demo's).
MODELS: dict[str, list[str]] = {
    "demo": [],
    "larger": [
        f"base.cache_dir={BENCH_CACHE}",
        "base.demo.hidden_size=256",
        "base.demo.intermediate_size=768",
        "base.demo.num_hidden_layers=8",
        "base.demo.num_attention_heads=8",
        "base.demo.num_key_value_heads=4",
        "base.demo.pretrain_steps=1200",
        "base.demo.lr=0.003",
    ],
}


def config(name: str, workdir: str | Path, overrides: list[str] | None = None):
    """The demo pipeline config for model `name` (see `MODELS`), writing under `workdir`."""
    from loram_core.config import load_config

    if name not in MODELS:
        raise SystemExit(f"unknown bench model {name!r}; known: {', '.join(MODELS)}")
    return load_config(
        REPO / "configs" / "demo.yaml", [f"workdir={workdir}", *MODELS[name], *(overrides or [])]
    )


def prepare(name: str, workdir: str | Path, progress=None) -> tuple[str, str]:
    """Model `name`'s base checkpoint (built and cached on first use) and its corpus blocks file.

    Returns:
        (base checkpoint directory, `steps.prepare_corpus`'s blocks file: train and held-out blocks).
    """
    from loram_core import steps

    cfg = config(name, workdir)
    base = steps.prepare_base(cfg, progress)
    return base, steps.prepare_corpus(cfg, base)


if __name__ == "__main__":  # build (or find) every model: python bench/_models.py [name ...]
    import sys
    import tempfile

    for model in sys.argv[1:] or list(MODELS):
        print(model, prepare(model, tempfile.mkdtemp(prefix="bench-models-"))[0], flush=True)
