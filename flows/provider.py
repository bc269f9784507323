"""The provider flow: prune -> align -> quantize -> evaluate -> publish.

Runs in Prefect's ephemeral mode with no server, or reports to the server `PREFECT_API_URL` names.
    loram run configs/demo.yaml
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loram_core.config import parse_config
from loram_core.steps import pin_version
from tasks import steps as t


@flow(name="loram-provider")
def provider(config: dict[str, Any]) -> dict[str, Any]:
    """Prepare one LoRAM base model and publish it; `config` is a `PipelineConfig` as a dict."""
    cfg = pin_version(parse_config(config))  # one version per run: a retried publish reuses it
    base = t.prepare_base(cfg)
    corpus = t.prepare_corpus(cfg, base)
    pruned = t.prune(cfg, base, corpus)
    aligned = t.align(cfg, pruned, corpus)
    nf4 = t.quantize(cfg, aligned)
    evaluation = t.evaluate(cfg, base, pruned, aligned, nf4, corpus)
    published = t.publish(cfg, base, corpus, aligned, nf4, evaluation)
    uri = published["uri"]
    create_markdown_artifact(
        key="provider-summary",
        markdown=summary_markdown(uri, evaluation, published["status"]),
        description="What this run published",
    )
    return {"uri": uri, "publish": published, **evaluation}


def summary_markdown(uri: str, evaluation: dict, status: str = "published") -> str:
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
        ("HBM GB (bf16)", p["hbm_gb"]),
        ("HBM GB (4-bit, QLoRAM)", p["hbm_gb_4bit"]),
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
    return f"## {status.capitalize()} `{uri}`\n\n| quantity | value |\n|---|---|\n{body}\n"
