"""The provider flow: prune -> align -> quantize -> evaluate -> publish.

Runs in Prefect's ephemeral mode with no server, or reports to the server `PREFECT_API_URL` names.
    loram run configs/demo.yaml
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows import ops
from loram_core.config import PipelineConfig, parse_config
from tasks import steps as t


@flow(
    name="loram-provider",
    flow_run_name=ops.run_name,
    on_cancellation=[ops.stop_children],
    on_crashed=[ops.stop_children, ops.notify_failure],
    on_failure=[ops.notify_failure],
)
def provider(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 - immutable default
    """Prepare one LoRAM base model and publish it.

    Args:
        config: the whole pipeline (the UI's run form shows its schema and defaults); a dict is
            validated into a `PipelineConfig`. Checked in the preflight before any compute.
    """
    cfg = config if isinstance(config, PipelineConfig) else parse_config(config)
    ops.tag_run(cfg)
    ops.track_children(cfg)
    t.preflight(cfg)
    base = t.prepare_base(cfg)
    ops.plan_artifact_for(cfg, base)
    corpus = t.prepare_corpus(cfg, base)
    pruned = t.prune(cfg, base, corpus)
    aligned = t.align(cfg, pruned, corpus)
    nf4 = t.quantize(cfg, aligned)
    evaluation = t.evaluate(cfg, base, pruned, aligned, nf4, corpus)
    ops.evaluation_artifact(evaluation)
    uri = t.publish(cfg, base, corpus, aligned, nf4, evaluation)
    ops.published_artifact(uri)
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
    return f"## Published `{uri}`\n\n| quantity | value |\n|---|---|\n{body}\n"
