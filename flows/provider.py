"""The provider flow: prune -> align -> quantize -> evaluate -> publish.

Runs in Prefect's ephemeral mode with no server, or reports to the server `PREFECT_API_URL` names.
    loram run configs/demo.yaml
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loram_core.config import parse_config
from loram_core.report import recovery_sentence
from tasks import steps as t
from tasks.verify import verify as verify_task


@flow(name="loram-provider")
def provider(config: dict[str, Any]) -> dict[str, Any]:
    """Prepare one LoRAM base model and publish it; `config` is a `PipelineConfig` as a dict."""
    cfg = parse_config(config)
    base = t.prepare_base(cfg)
    corpus = t.prepare_corpus(cfg, base)
    pruned = t.prune(cfg, base, corpus)
    # `until` and each section's `enabled` choose the model steps; evaluate and publish always run.
    aligned = t.align(cfg, pruned, corpus) if cfg.runs("align") else pruned
    nf4 = t.quantize(cfg, aligned) if cfg.runs("quantize") else None
    evaluation = t.evaluate(cfg, base, pruned, aligned, nf4, corpus)
    verification = verify_task(cfg, base, pruned, aligned, corpus) if cfg.runs("verify") else None
    uri = t.publish(cfg, base, corpus, aligned, nf4, evaluation, verification)
    create_markdown_artifact(
        key="provider-summary",
        markdown=summary_markdown(uri, evaluation),
        description="What this run published",
    )
    return {"uri": uri, **evaluation, "verification": verification}


PPL_ROWS = {
    "original_ppl": "original perplexity",
    "pruned_ppl": "pruned perplexity",
    "aligned_ppl": "aligned perplexity",
    "aligned_nf4_ppl": "aligned NF4 perplexity",
    "pruned_nf4_ppl": "pruned NF4 perplexity",
}


def summary_markdown(uri: str, evaluation: dict) -> str:
    """The run's summary artifact: the perplexities of the models made, sizes, and where it computed."""
    from loram_core.sizes import size_rows

    m, p = evaluation["metrics"], evaluation["params"]
    rows = [(label, m[key]) for key, label in PPL_ROWS.items() if key in m]
    if "aligned_ppl" in m:  # only a run that aligned has anything to say about recovery
        rows.append(("alignment", recovery_sentence(m)))
    rows += size_rows(p)
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
