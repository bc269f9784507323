"""One thin Prefect task per pipeline step; each calls one `loram_core.steps` function.

Steps are idempotent by their own work-dir keys, so Prefect's input-hash cache is off (it would
hash configs and paths only, and the models must never be passed between tasks).
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from loram_core import steps
from loram_core.config import PipelineConfig
from loram_core.plots import loss_curve_png, png_data_uri
from tasks._progress import StepProgress


@task(cache_policy=NO_CACHE)
def prepare_base(cfg: PipelineConfig) -> str:
    return steps.prepare_base(cfg, StepProgress("pretrain-demo-base", "Pretraining the demo base model"))


@task(cache_policy=NO_CACHE)
def prepare_corpus(cfg: PipelineConfig, base_dir: str) -> str:
    return steps.prepare_corpus(cfg, base_dir)


@task(cache_policy=NO_CACHE)
def prune(cfg: PipelineConfig, base_dir: str, blocks_file: str) -> str:
    return steps.prune(cfg, base_dir, blocks_file, StepProgress("prune", f"Pruning ({cfg.prune.strategy})"))


@task(cache_policy=NO_CACHE)
def align(cfg: PipelineConfig, pruned_dir: str, blocks_file: str) -> str:
    aligned = steps.align(
        cfg, pruned_dir, blocks_file, StepProgress("align", "Aligning (continual pre-training)")
    )
    log = steps.train_log(aligned)
    if log["losses"]:
        table = "\n".join(f"| {s} | {loss:.4f} |" for s, loss in log["losses"])
        create_markdown_artifact(
            key="alignment-loss",
            markdown=f"## Alignment loss\n\n![loss curve]({png_data_uri(loss_curve_png(log['losses']))})\n\n"
            f"| step | loss |\n|---|---|\n{table}\n",
            description="Loss curve of the alignment run",
        )
    return aligned


@task(cache_policy=NO_CACHE)
def quantize(cfg: PipelineConfig, aligned_dir: str) -> str | None:
    return steps.quantize(cfg, aligned_dir)


@task(cache_policy=NO_CACHE)
def evaluate(
    cfg: PipelineConfig,
    base_dir: str,
    pruned_dir: str,
    aligned_dir: str,
    nf4_dir: str | None,
    blocks_file: str,
) -> dict:
    return steps.evaluate(cfg, base_dir, pruned_dir, aligned_dir, nf4_dir, blocks_file)


# Retries only where I/O can fail transiently: the upload to the bucket.
@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def publish(
    cfg: PipelineConfig,
    base_dir: str,
    blocks_file: str,
    aligned_dir: str,
    nf4_dir: str | None,
    evaluation: dict,
) -> str:
    return steps.publish(cfg, base_dir, blocks_file, aligned_dir, nf4_dir, evaluation)
