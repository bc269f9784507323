"""One thin Prefect task per pipeline step; each calls one `loram_core.steps` function.

The model steps (prune, align, quantize) get their own section and the run's context (work dir,
device), nothing else; the data steps get the config, since calibration and evaluation text default
to the corpus's settings; evaluate and publish get it too, since they report on the whole run.

Steps are idempotent by their own work-dir keys, so Prefect's input-hash cache is off (it would
hash configs and paths only, and the models must never be passed between tasks).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from loram_core import steps
from loram_core.config import AlignConfig, PipelineConfig, PruneConfig, QuantizeConfig, RunContext
from loram_core.device import describe
from loram_provider.tasks._gpu import gpu_slots
from loram_provider.tasks._progress import StepProgress


def _log_device(ctx: RunContext | PipelineConfig, step: str) -> None:
    """Say in the task's log where this step computes (the run summary records it too)."""
    info = describe(steps.compute_device(ctx))
    get_run_logger().info("%s computes on %s (%s)", step, info["device"], info["name"])


@task(cache_policy=NO_CACHE)
def prepare_base(cfg: PipelineConfig) -> str:
    """The original model's checkpoint: the given directory, or the demo base (built once, cached)."""
    progress = StepProgress("pretrain-demo-base", "Demo base pretraining", curve_key="demo-pretraining-loss")
    return steps.prepare_base(cfg, progress)


@task(cache_policy=NO_CACHE)
def prepare_corpus(cfg: PipelineConfig, base_dir: str) -> str:
    """Tokenize and pack the corpus with the base's tokenizer; returns the blocks file."""
    return steps.prepare_corpus(cfg, base_dir)


@task(cache_policy=NO_CACHE)
def prepare_calibration(cfg: PipelineConfig, base_dir: str, blocks_file: str | None) -> str:
    """The calibration blocks pruning measures with (`calibration` section; defaults follow `corpus`)."""
    return steps.prepare_calibration(cfg, base_dir, blocks_file)


@task(cache_policy=NO_CACHE)
def prune(prune: PruneConfig, ctx: RunContext, base_dir: str, calib_file: str) -> str:
    """Prune the base model (layer-streamed through the run's device); returns the pruned checkpoint."""
    _log_device(ctx, "prune")
    progress = StepProgress("prune", f"Pruning ({prune.strategy})")
    with gpu_slots(ctx) as leased:
        return steps.prune(prune, leased, base_dir, calib_file, progress)


@task(cache_policy=NO_CACHE)
def align(align: AlignConfig, ctx: RunContext, pruned_dir: str, blocks_file: str) -> str:
    """Continual pre-training of the pruned model on the corpus; resumes after a crash."""
    _log_device(ctx, "align")
    progress = StepProgress("align", "Alignment (continual pre-training)", curve_key="alignment-loss")
    with gpu_slots(ctx, align.nproc_per_node) as leased:
        return steps.align(align, leased, pruned_dir, blocks_file, progress)


@task(cache_policy=NO_CACHE)
def quantize(quantize: QuantizeConfig, ctx: RunContext, aligned_dir: str) -> str | None:
    """The NF4 (bitsandbytes) variant of the aligned model, or None when disabled."""
    _log_device(ctx, "quantize")
    with gpu_slots(ctx) as leased:
        return steps.quantize(quantize, leased, aligned_dir)


@task(cache_policy=NO_CACHE)
def evaluate(
    cfg: PipelineConfig,
    base_dir: str,
    pruned_dir: str,
    aligned_dir: str,
    nf4_dir: str | None,
    blocks_file: str | None,
) -> dict:
    """Held-out perplexity of the original, pruned, aligned and 4-bit models, and parameter counts."""
    _log_device(cfg, "evaluate")
    with gpu_slots(cfg) as leased:
        return steps.evaluate(leased, base_dir, pruned_dir, aligned_dir, nf4_dir, blocks_file)


# Retries only where I/O can fail transiently: the upload to the bucket.
@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def publish(
    cfg: PipelineConfig,
    base_dir: str,
    blocks_file: str | None,
    aligned_dir: str,
    nf4_dir: str | None,
    evaluation: dict,
    verification: dict | None = None,
) -> dict:
    """Upload the version's files, then its manifest; returns its URI and status (published | unchanged)."""
    progress = StepProgress("publish", f"Publishing to {cfg.publish.uri}")
    return steps.publish(cfg, base_dir, blocks_file, aligned_dir, nf4_dir, evaluation, verification, progress)


@task(cache_policy=NO_CACHE)
def preflight(cfg: PipelineConfig) -> None:
    """Check base checkpoint, corpus, layer range, device, bucket and work dir before any compute."""
    steps.preflight(cfg)
