"""The model card (`README.md`) published with every version."""

from __future__ import annotations

from loram_core.manifest import Manifest
from loram_core.sizes import size_rows
from loram_core.verify.ablation import verification_markdown


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return "n/a" if x is None else str(x)


def model_card(m: Manifest, bucket_uri: str) -> str:
    """Markdown: what the version is, how a consumer uses it, and its measured numbers."""
    p, metrics, prune = m.params, m.metrics, m.prune
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    prows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in size_rows(p))
    return f"""# {m.name} {m.version}

A LoRAM base (Zhang et al., "Train Small, Infer Large", arXiv 2502.13533): the `{m.base["model_type"]}`
model `{m.base["source"]}` pruned with strategy **{prune["strategy"]}** at ratio {prune["ratio"]} (layers
{p["pruned_layers"][0]}..{p["pruned_layers"][-1]}), then aligned to the original by continual
pre-training. Train LoRA on this small model, then recover the adapter to the original's shape with the
masks in `masks/masks.safetensors` and use it on the original model.

## Use

```bash
loram inspect {bucket_uri.rstrip("/")}/{m.name}/{m.version}   # verify every file against manifest.json
```

`model/` loads with `loram_core.models.load_model` (stock `from_pretrained` too when all layers share one
width); `model-nf4/` is the 4-bit NF4 variant for QLoRAM training, if present.

## Held-out perplexity

| metric | value |
|---|---|
{rows}

## Size

| quantity | value |
|---|---|
{prows}

Base fingerprint `{m.base["fingerprint"]}`; corpus fingerprint `{m.corpus.get("fingerprint", "n/a")}`;
code `{m.code_version}`.
""" + verification_markdown(m.verification)
