"""What the provider flow needs to be run by a team: a telling run name and tags, the UI's tables,
hooks that stop child processes and send a failure notification, and the GPU concurrency slot.

    @flow(flow_run_name=run_name, on_cancellation=[stop_children], on_crashed=[stop_children, notify_failure],
          on_failure=[notify_failure])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.logging import get_logger
from prefect.runtime import flow_run as current_run

from loram_core import launch
from loram_core.config import PipelineConfig, parse_config
from loram_core.errors import ConfigError
from loram_core.prune.plan import Plan
from loram_core.report import format_gib

log = get_logger("loram.ops")


def _config(parameters: dict[str, Any]) -> PipelineConfig:
    raw = parameters.get("config", {})
    return raw if isinstance(raw, PipelineConfig) else parse_config(raw or {}, source="flow parameters")


def model_label(cfg: PipelineConfig) -> str:
    """The base model in a few characters: `demo`, or the checkpoint folder's name."""
    return "demo" if cfg.base.source == "demo" else Path(cfg.base.source.rstrip("/")).name


def describe_run(cfg: PipelineConfig) -> str:
    """What a run makes, in one line that tells runs apart: model, strategy and ratio, alignment
    steps and tokens (or none), NF4, and the version it publishes.

    `demo random r=0.65, align 200 steps (410k tokens), NF4 -> demo-llama/20261124-011102`
    """
    ratio = "{}:{}".format(*cfg.prune.n_m) if cfg.prune.strategy == "semi" else f"r={cfg.prune.ratio:g}"
    if cfg.runs("align"):
        a = cfg.align
        tokens = a.steps * a.batch_size * a.grad_accum * cfg.corpus.seq_len * a.nproc_per_node
        made = f"align {a.steps} steps ({_count(tokens)} tokens)"
    else:
        made = "prune only" if cfg.until == "prune" else "no alignment"
    if cfg.runs("quantize"):
        made += ", NF4"
    version = cfg.publish.version or "<new version>"
    where = "" if cfg.publish.enabled else " (local)"
    return f"{model_label(cfg)} {cfg.prune.strategy} {ratio}, {made} -> {cfg.publish.name}/{version}{where}"


def _count(n: int) -> str:
    """`410k`, `1.2M`, `3.4B` (tokens)."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def run_name() -> str:
    """The flow run's name (`describe_run`); renamed with its version once the run pins it (`tag_run`)."""
    try:
        cfg = _config(current_run.parameters)
    except ConfigError:  # the preflight reports it; the run still needs a name
        return "loram-provider (invalid config)"
    return describe_run(cfg)


def run_tags(cfg: PipelineConfig) -> list[str]:
    """Tags the UI can filter runs by: strategy, model, published name, device."""
    return ["loram", f"strategy:{cfg.prune.strategy}", f"model:{model_label(cfg)}",
            f"publish:{cfg.publish.name}", f"device:{cfg.device}"]  # fmt: skip


def tag_run(cfg: PipelineConfig) -> None:
    """Add `run_tags` to the current flow run (a deployment's own tags stay) and name it after what it
    makes, its version pinned now (`describe_run`)."""
    run_id = current_run.id
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        client.update_flow_run(
            run_id, name=describe_run(cfg), tags=sorted(set(run.tags) | set(run_tags(cfg)))
        )


def children_registry(workdir: str, run_id: str) -> Path:
    """Where the run's long steps record their child process groups (read by `stop_children`)."""
    return Path(workdir).expanduser().absolute() / "pgroups" / str(run_id)


def track_children(cfg: PipelineConfig) -> None:
    """Have this run's `torchrun` launches register their process groups for the hooks."""
    run_id = current_run.id or "local"
    os.environ[launch.REGISTRY_ENV] = str(children_registry(cfg.workdir, run_id))


def stop_children(flow: Any, flow_run: FlowRun, state: State) -> None:
    """on_cancellation / on_crashed hook: kill every process group the run's steps started.

    Prefect runs it in the flow's process or, when that process was killed, in the worker's: the
    registry is a folder in the work dir, so both find the groups.
    """
    try:
        workdir = _config(flow_run.parameters or {}).workdir
    except Exception:  # an unparseable config started nothing
        return
    killed = launch.kill_registered(children_registry(workdir, str(flow_run.id)))
    if killed:
        log.warning(
            "run %s ended (%s): killed child process groups %s", flow_run.name, state.type.value, killed
        )


def notify_failure(flow: Any, flow_run: FlowRun, state: State) -> None:
    """on_failure / on_crashed hook: send the run's name, state and message to `notify_block`.

    `notify_block` names a saved Prefect notification block as `<type-slug>/<name>`, e.g.
    `slack-webhook/ml-alerts` or `custom-webhook-notification/ops` (any block with `notify`).
    """
    try:
        block_ref = _config(flow_run.parameters or {}).notify_block
    except Exception:
        return
    if not block_ref:
        return
    from prefect.blocks.core import Block

    block = Block.load(block_ref)
    name = _current_name(flow_run)
    subject = f"loram-provider run {name!r} {state.type.value.lower()}"
    body = f"{subject}: {state.message or state.name}\nflow run id: {flow_run.id}"
    block.notify(body=body, subject=subject)


def _current_name(flow_run: FlowRun) -> str:
    """The run's name as the UI shows it now: `tag_run` renames a run once its version is pinned, and
    the hook's `flow_run` may predate that."""
    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run.id).name
    except Exception:  # the server gone: the name the hook was given is still the run's
        return flow_run.name


def plan_artifact_for(cfg: PipelineConfig, base_dir: str) -> None:
    """The pruning plan's table artifacts for the run's base model and `prune` section."""
    from loram_core.models import load_config
    from loram_core.prune import plan

    plan_artifact(plan(load_config(base_dir), cfg.prune), model_label(cfg))


def plan_artifact(plan: Plan, model: str) -> None:
    """Table artifacts of a pruning plan: per-layer widths, and parameters and HBM (the paper's Tables 4-6)."""
    pruned = set(plan.pruned_layers)
    create_table_artifact(
        key="pruning-plan-layers",
        table=[{"layer": i, "pruned": i in pruned, **w} for i, w in enumerate(plan.layers)],
        description=f"Per-layer widths of {model} after {plan.strategy} pruning at {plan.ratio:g}",
    )
    create_table_artifact(
        key="pruning-plan",
        table=[
            {"quantity": "original parameters", "value": f"{plan.original_params:,}"},
            {"quantity": "pruned parameters", "value": f"{plan.pruned_params:,}"},
            {"quantity": "reduction", "value": f"{plan.reduction:.2f}x"},
            {"quantity": "HBM, 16-bit", "value": format_gib(plan.hbm_gb)},
            {"quantity": "HBM, 4-bit (QLoRAM accounting)", "value": format_gib(plan.hbm_gb_4bit)},
            {"quantity": "HBM, 4-bit as NF4 stores it", "value": format_gib(plan.hbm_gb_4bit_actual)},
            {"quantity": "pruned layers", "value": ", ".join(map(str, plan.pruned_layers))},
        ],
        description=f"Parameters and HBM of {model}, {plan.strategy} at {plan.ratio:g} (as the LoRAM paper's Tables 4-6)",
    )


def evaluation_artifact(evaluation: dict) -> None:
    """A table artifact of held-out perplexity per model."""
    m = evaluation["metrics"]
    rows = [("original", "original_ppl"), ("pruned", "pruned_ppl"), ("aligned", "aligned_ppl"),
            ("aligned, NF4", "aligned_nf4_ppl")]  # fmt: skip
    create_table_artifact(
        key="evaluation",
        table=[{"model": name, "held-out perplexity": round(m[k], 4)} for name, k in rows if k in m],
        description=f"Held-out perplexity on {m.get('heldout_tokens', '?')} tokens",
    )


def published_artifact(uri: str, status: str = "published") -> None:
    """A link artifact to the published version, by its absolute URI (a relative `file://./bucket`
    leads nowhere from the UI)."""
    from loram_core.card import consumer_uri

    absolute = consumer_uri(uri)
    create_link_artifact(
        key="published-version",
        link=absolute,
        link_text=absolute,
        description=f"The version this run {'found unchanged' if status == 'unchanged' else 'published'}",
    )
