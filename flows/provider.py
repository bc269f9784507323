"""The provider flow: prune -> align -> quantize -> evaluate -> publish.

Runs in Prefect's ephemeral mode with no server, or reports to the server `PREFECT_API_URL` names.
    loram run configs/demo.yaml
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loram_core.config import parse_config
from loram_core.report import format_gib, recovery_sentence
from tasks import steps as t


@flow(name="loram-provider")
def provider(config: dict[str, Any]) -> dict[str, Any]:
    """Prepare one LoRAM base model and publish it; `config` is a `PipelineConfig` as a dict."""
    cfg = parse_config(config)
    base = t.prepare_base(cfg)
    corpus = t.prepare_corpus(cfg, base)
    pruned = t.prune(cfg, base, corpus)
    aligned = t.align(cfg, pruned, corpus)
    nf4 = t.quantize(cfg, aligned)
    evaluation = t.evaluate(cfg, base, pruned, aligned, nf4, corpus)
    uri = t.publish(cfg, base, corpus, aligned, nf4, evaluation)
    create_markdown_artifact(
        key="provider-summary",
        markdown=summary_markdown(uri, evaluation),
        description="What this run published",
    )
    return {"uri": uri, **evaluation}


def summary_markdown(uri: str, evaluation: dict) -> str:
    """The run's summary artifact: perplexities, parameter counts, HBM and where it computed."""
    m, p = evaluation["metrics"], evaluation["params"]
    rows = [
        ("original perplexity", m["original_ppl"]),
        ("pruned perplexity", m["pruned_ppl"]),
        ("aligned perplexity", m["aligned_ppl"]),
    ]
    if "aligned_nf4_ppl" in m:
        rows.append(("aligned NF4 perplexity", m["aligned_nf4_ppl"]))
    rows += [
        ("original parameters", p["original_params"]),
        ("pruned parameters", p["pruned_params"]),
        ("reduction", p["reduction"]),
        ("HBM (bf16)", format_gib(p["hbm_gb"])),
        ("HBM (4-bit, QLoRAM)", format_gib(p["hbm_gb_4bit"])),
        ("HBM (4-bit, NF4 as stored)", format_gib(p["hbm_gb_4bit_actual"])),
        ("alignment", recovery_sentence(m)),
    ]
    compute = evaluation.get("compute", {})
    if compute:
        rows.append(("computed on", f"{compute['device']} ({compute.get('name', '')})"))
    body = "\n".join(
        f"| {k} | {v:,.3f} |"
        if isinstance(v, float)
        else f"| {k} | {v:,} |"
        if isinstance(v, int)
        else f"| {k} | {v} |"
        for k, v in rows
    )
    return f"## Published `{uri}`\n\n| quantity | value |\n|---|---|\n{body}\n"
