"""The model card (`README.md`) published with every version: what it is and how a consumer uses it."""

from __future__ import annotations

from pathlib import Path

from loram_core.config import SPARSE
from loram_core.evaluate import protocol_sentence
from loram_core.manifest import Manifest
from loram_core.report import recovery_sentence
from loram_core.sizes import size_rows
from loram_core.verify.report import verification_markdown


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return "n/a" if x is None else str(x)


def protocol_note(eval_info: dict) -> str:
    """What the perplexities are: the protocol, the held-out text's source and its token counts."""
    p = eval_info.get("protocol")
    if not p:
        return "Perplexity of the held-out blocks (no protocol recorded)."
    source = eval_info.get("source")
    if source == "corpus":
        held = eval_info.get("heldout", {})
        of = "tokens" if held.get("of") == "tokens" else "paragraphs and records"
        where = f"the corpus's held-out split ({held.get('fraction')} of its {of}, never trained on)"
    else:
        where = "the files " + ", ".join(f"`{f}`" for f in source or [])
    return f"{protocol_sentence(p)} Held-out text: {where}; EOS only between documents."


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


def _load_section(remote_code: bool, nf4: bool, dest: str) -> str:
    flag = ", trust_remote_code=True" if remote_code else ""
    code = f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{dest}/model"{flag})
model = AutoModelForCausalLM.from_pretrained("{dest}/model"{flag}, dtype="bfloat16")
{"model_4bit = AutoModelForCausalLM.from_pretrained(" + repr(dest + "/model-nf4") + flag + ")  # QLoRAM: needs bitsandbytes" + chr(10) if nf4 else ""}```"""
    cpu_note = _cpu_nf4_note(remote_code) if nf4 else ""
    if not remote_code:
        return f"{code}\n\nThe layers keep the original's shapes, so the stock architecture loads it as is.{cpu_note}"
    return f"""{code}

Pruned layers are narrower than the others, which no stock architecture expresses. `model/` and
`model-nf4/` therefore ship `modeling_loram.py`: the family's stock `*ForCausalLM`, whose layers take
the widths in `config.json`'s `loram` section (it imports only torch and transformers; read it before
you trust it). Without `trust_remote_code=True` transformers stops with "... contains custom code which
must be executed to correctly load the model ... Please pass the argument `trust_remote_code=True`"
(in an interactive terminal it asks instead): pass the flag. Load through `AutoModelForCausalLM`; the
family class itself (e.g. `LlamaForCausalLM`) would build the original's widths. On CPUs with
AVX512-BF16, the NF4 linears whose widths bitsandbytes' fast kernel cannot repack (output not a
multiple of 32, or input not a multiple of 64) run its generic path: same result, slower.{cpu_note}"""


def model_card(m: Manifest, bucket_uri: str, remote_code: bool | None = None) -> str:
    """Markdown: what the version is, how a consumer gets, loads, trains and recovers it, its numbers.

    Args:
        m: the version's manifest (its `files` may still be empty).
        bucket_uri: the bucket the version is published to, as configured (may be relative).
        remote_code: whether `model/` ships `modeling_loram.py`; default: structured strategies do.
    """
    p, metrics, prune = m.params, m.metrics, m.prune
    if remote_code is None:
        remote_code = prune["strategy"] not in SPARSE
    nf4 = bool(m.quantize.get("enabled"))
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
        ", then aligned to the original by continual pre-training"
        if aligned
        else " (not aligned: this run stopped after pruning)"
    )
    recovery = recovery_sentence(metrics) if aligned else ""
    recovery = recovery[:1].upper() + recovery[1:] + ("." if recovery else "")
    return f"""# {m.name} {m.version}

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

{protocol_note(m.eval)}

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
""" + verification_markdown(m.verification)
