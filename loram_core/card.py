"""The model card (`README.md`) published with every version: what it is and how a consumer uses it."""

from __future__ import annotations

from pathlib import Path

from loram_core.config import SPARSE
from loram_core.manifest import Manifest
from loram_core.report import recovery_sentence
from loram_core.sizes import size_rows
from loram_core.verify.report import verification_markdown

# `align.objective` -> how the card says the base was aligned.
_ALIGNED_BY = {
    "cpt": "continual pre-training",
    "kd": "distillation from the original (KL to its next-token distribution)",
    "cpt+kd": "continual pre-training plus distillation from the original",
}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return "n/a" if x is None else str(x)


def consumer_uri(bucket_uri: str) -> str:
    """The bucket URI as a consumer elsewhere can use it: a relative local path made absolute.

    `file://./bucket` names a folder relative to where the publisher ran; the card gives
    `file:///abs/path/bucket` instead. Remote URIs (`s3://...`) are returned unchanged.
    """
    uri = bucket_uri.rstrip("/")
    if uri.startswith("file://"):
        return "file://" + str(Path(uri.removeprefix("file://")).expanduser().resolve())
    if "://" not in uri:
        return "file://" + str(Path(uri).expanduser().resolve())
    return uri


# Hugging Face's model-tree relations are adapter, merge, quantized and finetune. A LoRAM base is the
# original's weights pruned and then trained further (continual pre-training): a finetune, not a
# pure quantization (its NF4 variant rides along in the same version), a merge or an adapter.
BASE_MODEL_RELATION = "finetune"


def hf_metadata(m: Manifest) -> str:
    """The YAML block that opens the card: the hub's `base_model`, relation, library, tags, license.

    `base_model` (and so `base_model_relation`) only when the original's repo id is known (a hub
    source, or a local hub-cache snapshot); `license` (with `license_name` / `license_link`) as the
    original's card or config states it.
    """
    import yaml

    meta: dict = {}
    repo_id = m.base.get("repo_id")
    if repo_id:
        meta["base_model"] = repo_id
        meta["base_model_relation"] = BASE_MODEL_RELATION
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["loram", "pruned", m.prune["strategy"]]
    for key in ("license", "license_name", "license_link"):
        if m.base.get(key):
            meta[key] = m.base[key]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


CPU_NF4_RECIPE = """for m in model_4bit.modules():  # before its first forward
    if hasattr(m, "support_avx512bf16_for_cpu"):
        m.support_avx512bf16_for_cpu = False"""


def _cpu_nf4_note(remote_code: bool) -> str:
    """How to train `model-nf4/` on a CPU with AVX512-BF16 (bitsandbytes 0.50's fast kernel has no backward)."""
    if remote_code:
        return (
            " The shipped code also sends every forward with gradients enabled through bitsandbytes'"
            " differentiable path: its fast CPU kernel, which bitsandbytes switches to after an inference"
            " call, has no backward."
        )
    return f"""

To train `model-nf4/` on a CPU with AVX512-BF16: bitsandbytes (0.50) repacks 4-bit weights at the first
inference call for a fast kernel that has no backward, after which no gradient passes through those
layers (a LoRA before them learns nothing, silently). Keep its generic path, which trains:

```python
{CPU_NF4_RECIPE}
```

GPUs are unaffected; the result is the same, only slower."""


def _load_section(remote_code: dict[str, bool], nf4: bool, dest: str) -> str:
    def flag(variant: str) -> str:
        return ", trust_remote_code=True" if remote_code.get(variant) else ""

    nf4_line = (
        f"model_4bit = AutoModelForCausalLM.from_pretrained({dest + '/model-nf4'!r}{flag('model-nf4')})"
        "  # QLoRAM: needs bitsandbytes\n"
    )
    code = f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{dest}/model"{flag("model")})
model = AutoModelForCausalLM.from_pretrained("{dest}/model"{flag("model")}, dtype="bfloat16")
{nf4_line if nf4 else ""}```"""
    # The CPU training note depends on whether model-nf4/'s shipped code already routes around the kernel.
    cpu_note = _cpu_nf4_note(bool(remote_code.get("model-nf4"))) if nf4 else ""
    shipping = [f"`{v}/`" for v in ("model", "model-nf4") if remote_code.get(v)]
    if not shipping:
        return f"{code}\n\n{_stock_note(remote_code)}{cpu_note}"
    return f"""{code}

{" and ".join(shipping)} {"ships" if len(shipping) == 1 else "ship"} `modeling_loram.py`: the family's stock `*ForCausalLM`, whose layers take
the widths in `config.json`'s `loram` section (it imports only torch and transformers; read it before
you trust it). Pruned layers narrower than the others are something no stock architecture expresses;
an NF4 variant also ships it when its widths are ones bitsandbytes' AVX512-BF16 CPU kernel cannot
repack. Without `trust_remote_code=True` transformers stops with "... contains custom code which
must be executed to correctly load the model ... Please pass the argument `trust_remote_code=True`"
(in an interactive terminal it asks instead): pass the flag. Load through `AutoModelForCausalLM`; the
family class itself (e.g. `LlamaForCausalLM`) would build the original's widths. On CPUs with
AVX512-BF16, the NF4 linears whose widths bitsandbytes' fast kernel cannot repack (output not a
multiple of 32, or input not a multiple of 64) run its generic path: same result, slower.{cpu_note}"""


def _stock_note(remote_code: dict[str, bool]) -> str:
    return (
        "Every layer has the same widths, so `config.json` is a plain family config (the pruned widths in "
        "its standard fields, `head_dim` explicit, the original's shapes in its `loram` section): the stock "
        "architecture loads it as is (`AutoModelForCausalLM.from_pretrained`, no `trust_remote_code`)."
        if remote_code.get("uniform")
        else "The layers keep the original's shapes, so the stock architecture loads it as is."
    )


def model_card(m: Manifest, bucket_uri: str, remote_code: bool | dict[str, bool] | None = None) -> str:
    """Markdown: Hugging Face metadata, what the version is, how a consumer gets, loads, trains and
    recovers it, its numbers.

    Args:
        m: the version's manifest (its `files` may still be empty).
        bucket_uri: the bucket the version is published to, as configured (may be relative).
        remote_code: per variant (`model`, `model-nf4`), whether it ships `modeling_loram.py`, and
            `uniform` when a structured base loads stock because its widths are uniform; a bool
            applies to both variants; default: structured strategies ship it.
    """
    p, metrics, prune = m.params, m.metrics, m.prune
    nf4 = bool(m.quantize.get("enabled"))
    if remote_code is None:
        remote_code = prune["strategy"] not in SPARSE
    if isinstance(remote_code, bool):
        remote_code = {"model": remote_code, "model-nf4": remote_code and nf4}
    uri = f"{consumer_uri(bucket_uri)}/{m.name}/{m.version}"
    dest = f"./{m.name}-{m.version}"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    prows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in size_rows(p))
    if prune["strategy"] in SPARSE:
        recover_note = (
            "`--mode dense` (default) writes the adapter unchanged; `mask` and `complement` write a merged "
            "original model with the LoRA delta multiplied by the keep-mask (or its complement)."
        )
    else:
        recover_note = (
            "The result is a standard peft adapter for the original: "
            '`PeftModel.from_pretrained(original, "my-lora-full")`.'
        )
    aligned = "aligned_ppl" in metrics
    aligned_note = (
        f", then aligned to the original by {_ALIGNED_BY.get(m.align.get('objective', 'cpt'), 'continual pre-training')}"
        if aligned
        else " (not aligned: this run stopped after pruning)"
    )
    recovery = recovery_sentence(metrics) if aligned else ""
    recovery = recovery[:1].upper() + recovery[1:] + ("." if recovery else "")
    return (
        hf_metadata(m)
        + f"""# {m.name} {m.version}

A LoRAM base (Zhang et al., "Train Small, Infer Large", arXiv 2502.13533): the `{m.base["model_type"]}`
model `{m.base["source"]}` pruned with strategy **{prune["strategy"]}** at ratio {prune["ratio"]} (layers
{p["pruned_layers"][0]}..{p["pruned_layers"][-1]}){aligned_note}. Train LoRA on this small model, recover the adapter to the original's shape with the
masks in `masks/masks.safetensors`, and use it on the original model.

## Get it

```bash
loram pull {uri} {dest}      # downloads, checks every sha256 against manifest.json
loram inspect {uri}          # or verify it in place
```

## Load it

`model/` is the aligned pruned model in 16 bits{"; `model-nf4/` is its 4-bit NF4 variant (bitsandbytes, double quant) for QLoRAM" if nf4 else ""}:

{_load_section(remote_code, nf4, dest)}

## Train a LoRA on it

```python
from peft import LoraConfig, get_peft_model

targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
# ... train as usual (transformers Trainer, or your own loop), then:
lora.save_pretrained("my-lora")
```

## Recover it for the original model

```bash
loram recover --base {uri} --adapter my-lora --out my-lora-full --original ORIGINAL_DIR
```

{recover_note} `ORIGINAL_DIR` is the checkpoint this version was pruned from (`{m.base["source"]}`).

## Held-out perplexity

| metric | value |
|---|---|
{rows}

{recovery}

## Size

| quantity | value |
|---|---|
{prows}

Memory in binary units (1 GiB = 2^30 bytes). Base fingerprint `{m.base["fingerprint"]}`; corpus
fingerprint `{m.corpus.get("fingerprint", "n/a")}`; code `{m.code_version}`.
"""
        + verification_markdown(m.verification)
    )
