"""The provider flow: prune -> align -> quantize -> evaluate -> publish.

Runs in Prefect's ephemeral mode with no server, or reports to the server `PREFECT_API_URL` names.
    loram run configs/demo.yaml
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loram_core.config import PipelineConfig, parse_config
from loram_core.report import recovery_sentence
from loram_core.steps import pin_version
from loram_provider.flows import ops
from loram_provider.flows.credentials import block_credentials
from loram_provider.tasks import steps as t
from loram_provider.tasks.verify import verify as verify_task


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
    with block_credentials(cfg.credentials_block):  # s3:// from a Prefect block, else the AWS environment
        return _pipeline(cfg)


def _pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """The provider's steps, in order, after the preflight; returns what the run made and published."""
    cfg = pin_version(cfg)  # one version per run: a retried publish reuses it
    ops.tag_run(cfg)
    ops.track_children(cfg)
    t.preflight(cfg)
    base = t.prepare_base(cfg)
    ops.plan_artifact_for(cfg, base)
    corpus = t.prepare_corpus(cfg, base) if cfg.reads_corpus() else None  # no step reads it: not tokenized
    calibration = t.prepare_calibration(cfg, base, corpus)
    # Each model step gets its own section and the run's context (work dir, device), nothing else.
    pruned = t.prune(cfg.prune, cfg.context, base, calibration)
    # `until` and each section's `enabled` choose the model steps; evaluate and publish always run.
    aligned = t.align(cfg.align, cfg.context, pruned, corpus) if cfg.runs("align") else pruned
    nf4 = t.quantize(cfg.quantize, cfg.context, aligned) if cfg.runs("quantize") else None
    evaluation = t.evaluate(cfg, base, pruned, aligned, nf4, corpus)
    verification = verify_task(cfg, base, pruned, aligned, corpus) if cfg.runs("verify") else None
    ops.evaluation_artifact(evaluation)
    published = t.publish(cfg, base, corpus, aligned, nf4, evaluation, verification)
    uri = published["uri"]
    ops.published_artifact(uri)
    create_markdown_artifact(
        key="provider-summary",
        markdown=summary_markdown(uri, evaluation, published["status"]),
        description="What this run published",
    )
    return {"uri": uri, "publish": published, **evaluation, "verification": verification}


PPL_ROWS = {
    "original_ppl": "original perplexity",
    "pruned_ppl": "pruned perplexity",
    "aligned_ppl": "aligned perplexity",
    "aligned_nf4_ppl": "aligned NF4 perplexity",
    "pruned_nf4_ppl": "pruned NF4 perplexity",
}


def summary_markdown(uri: str, evaluation: dict, status: str = "published") -> str:
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
    return f"## {status.capitalize()} `{uri}`\n\n| quantity | value |\n|---|---|\n{body}\n"
