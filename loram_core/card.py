"""The model card (`README.md`) published with every version: what it is and how a consumer uses it."""

from __future__ import annotations

from pathlib import Path

from loram_core.config import SPARSE
from loram_core.evaluate import protocol_sentence
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
you trust it). Pruned layers narrower than the others are something no stock architecture expresses.
Without `trust_remote_code=True` transformers stops with "... contains custom code which must be
executed to correctly load the model ... Please pass the argument `trust_remote_code=True`" (in an
interactive terminal it asks instead): pass the flag. Load through `AutoModelForCausalLM`; the family
class itself (e.g. `LlamaForCausalLM`) would build the original's widths.{_nf4_paths() if nf4 else ""}{cpu_note}"""


def _nf4_paths() -> str:
    """Of `model-nf4/` only: a version without it says nothing of it (issue 23)."""
    return (
        " An NF4 variant also ships the code when its widths are ones bitsandbytes' AVX512-BF16 CPU kernel "
        "cannot repack. On CPUs with AVX512-BF16, the NF4 linears whose widths bitsandbytes' fast kernel cannot "
        "repack (output not a multiple of 32, or input not a multiple of 64) run its generic path: same result, "
        "slower."
    )


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
    prows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in version_size_rows(p, nf4))
    aligned = "aligned_ppl" in metrics
    aligned_note = (
        f", then aligned to the original by {_ALIGNED_BY.get(m.align.get('objective', 'cpt'), 'continual pre-training')}"
        if aligned
        else " (not aligned: this run stopped after pruning)"
    )
    what = "the aligned pruned model" if aligned else "the pruned model (not aligned)"
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
# the loram command: pip install . in a checkout of loram-provider (its README: Installing)
loram pull {uri} {dest}      # downloads, checks every sha256 against manifest.json
loram inspect {uri}          # or verify it in place
```

## Load it

`model/` is {what} in 16 bits{"; `model-nf4/` is its 4-bit NF4 variant (bitsandbytes, double quant) for QLoRAM" if nf4 else ""}:

{_load_section(remote_code, nf4, dest)}

## Train a LoRA on it

{train_snippet(dest, bool(remote_code.get("model")))}

## Recover it for the original model

```bash
loram recover --base {uri} --adapter my-lora --out my-lora-full
```

{original_paragraph(m, uri)} {_recover_note(prune["strategy"])}

## Use it on the original model

```python
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("my-lora-full")  # loads the original, adds the LoRA
```

or merge it into the original's weights (one 16-bit checkpoint, no peft needed to run it):

```bash
loram merge --adapter my-lora-full --out my-model   # the original the adapter names; --original overrides
```

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
"""
        + verification_markdown(m.verification)
    )


def version_size_rows(params: dict, nf4: bool) -> list[tuple[str, int | float | str]]:
    """`size_rows` of what the version holds: no NF4 footprint for a version without `model-nf4/`."""
    return [row for row in size_rows(params) if nf4 or not row[0].startswith("memory, 4-bit as NF4")]


def train_snippet(dest: str, remote_code: bool) -> str:
    """A complete LoRA training script on the pulled `model/` (peft, a few steps on your texts)."""
    flag = ", trust_remote_code=True" if remote_code else ""
    return f"""```python
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{dest}/model")
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained("{dest}/model"{flag})
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
texts = ["Replace these lines with your own training texts.", "Each one is a sequence to learn."]
batch = tokenizer(texts, return_tensors="pt", padding=True)
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # no loss on padding
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step in range(10):
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {{step}}: loss {{loss.item():.3f}}")
model.save_pretrained("my-lora")
```

Any peft LoRA works the same (the transformers `Trainer`, TRL, your own loop): `recover` needs only the
saved adapter folder."""


def _recover_note(strategy: str) -> str:
    if strategy in SPARSE:
        return (
            "`--mode dense` (default) writes the adapter unchanged; `mask` and `complement` write a merged "
            "original model with the LoRA delta multiplied by the keep-mask (or its complement)."
        )
    return "The result is a standard peft adapter for the original, naming it and its stock class."


def original_paragraph(m: Manifest, uri: str) -> str:
    """Which original this version was pruned from, and how `recover` finds it (no `--original` needed)."""
    from loram_core.original import original_of

    record = original_of(m.base)
    kind, fp = record.get("kind"), m.base.get("fingerprint", "n/a")
    check = f"fingerprint `{fp}` (sha256 over its config and weight files), which `recover` checks"
    if kind == "hub":
        at = record.get("commit") or record.get("revision")
        return (
            f"The original is the hub model `{record['repo_id']}`{f' at commit `{at}`' if at else ''}; the "
            "recovered adapter names it, and peft downloads it when loading."
        )
    if kind == "demo":
        return (
            f"The original is this project's demo base, at `{record.get('path')}` on the machine that published "
            f"the version; `recover` finds it there (or under `~/.cache/loram-provider/`) by itself, {check}. "
            f"Not on your machine? `loram original --build {uri}` pretrains it again from the settings in "
            "the manifest (minutes on a CPU; another CPU may pretrain a slightly different model, which the "
            "fingerprint check then refuses). `--original DIR` names another copy."
        )
    if kind == "path":
        return (
            f"The original is `{record['path']}` on the machine that published the version; `recover` reads it "
            f"there by itself, {check}. Elsewhere, pass `--original` your copy of it."
        )
    if kind == "uri":
        return (
            f"The original is `{record['uri']}`; `recover` fetches it once into `~/.cache/loram-provider/originals` "
            f"and checks it, {check}."
        )
    return "Pass `--original` the checkpoint this version was pruned from (its manifest does not say where it is)."
