"""One thin Prefect task per pipeline step; each calls one `loram_core.steps` function.

The model steps (prune, align, quantize) get their own section and the run's context (work dir,
device), nothing else; the data steps get the config, since calibration and evaluation text default
to the corpus's settings; evaluate and publish get it too, since they report on the whole run.

Steps are idempotent by their own work-dir keys, so Prefect's input-hash cache is off (it would
hash configs and paths only, and the models must never be passed between tasks). Each model step
has a live step card (`StepProgress`) and says at the end whether it computed (where, how long) or
reused the output a run with the same inputs and settings left (`_Watch`).
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from loram_core import steps
from loram_core.config import AlignConfig, PipelineConfig, PruneConfig, QuantizeConfig, RunContext
from loram_core.device import describe
from loram_core.report import format_bytes
from loram_provider.tasks._gpu import gpu_slots
from loram_provider.tasks._progress import StepProgress, core_logs_to_run_log, duration, note


def device_label(ctx: RunContext | PipelineConfig) -> str:
    """`cuda:0 (NVIDIA H100 80GB HBM3)` or `cpu (x86_64)`: where the step computes."""
    info = describe(steps.compute_device(ctx))
    return f"{info['device']} ({info['name']})"


class _Watch:
    """Tells a step that computed from one that found its output: the work dir's entries before it ran."""

    def __init__(self, ctx: RunContext | PipelineConfig, name: str, progress: StepProgress | None = None):
        self.name, self.progress, self.device = name, progress, device_label(ctx)
        self.root = root = Path(ctx.workdir).expanduser()
        self.before = {p.name for p in root.iterdir()} if root.is_dir() else set()
        self.t0 = time.monotonic()
        if progress is not None:
            progress.start()

    def done(self, out: str | None) -> str | None:
        """Note the step's end: reused (no `<name>-*` output appeared in the work dir) or computed."""
        root = Path(self.root)
        made = [p for p in (root.iterdir() if root.is_dir() else []) if p.name not in self.before]
        reused = not any(p.name.startswith(f"{self.name}-") for p in made)
        if reused:
            where = f" {out}" if out else ""
            note(self.name, f"reused{where} (finished earlier with the same inputs and settings)")
        else:
            note(self.name, f"done in {duration(time.monotonic() - self.t0)} on {self.device}")
        if self.progress is not None:
            self.progress.finish((out or "the cached result") if reused else None)
        return out


@task(cache_policy=NO_CACHE)
def prepare_base(cfg: PipelineConfig) -> str:
    """The original model's checkpoint: the given directory, or the demo base (built once, cached)."""
    progress = StepProgress("pretrain-demo-base", "Demo base pretraining", curve_key="demo-pretraining-loss",
                            device=device_label(cfg))  # fmt: skip
    t0 = time.monotonic()
    base = steps.prepare_base(cfg, progress)
    if progress.card is not None:  # it pretrained (a cached base reports nothing)
        progress.finish()
        note("pretrain-demo-base", f"done in {duration(time.monotonic() - t0)}: {base}")
    return base


@task(cache_policy=NO_CACHE)
def prepare_corpus(cfg: PipelineConfig, base_dir: str) -> str:
    """Tokenize and pack the corpus with the base's tokenizer; returns the blocks file."""
    return steps.prepare_corpus(cfg, base_dir)


@task(cache_policy=NO_CACHE)
def prepare_calibration(cfg: PipelineConfig, base_dir: str, blocks_file: str | None) -> str:
    """The calibration blocks pruning measures with (`calibration` section; defaults follow `corpus`)."""
    return steps.prepare_calibration(cfg, base_dir, blocks_file)


@task(cache_policy=NO_CACHE)
def prepare_eval(cfg: PipelineConfig, base_dir: str, blocks_file: str | None) -> str:
    """The held-out blocks every model is scored on (`eval` section)."""
    return steps.prepare_eval(cfg, base_dir, blocks_file)


@task(cache_policy=NO_CACHE)
def reference_loss(ctx: RunContext, base_dir: str, eval_file: str) -> float:
    """The original's held-out loss on the blocks alignment's held-out points use (the curve's reference)."""
    with gpu_slots(ctx) as leased:
        return steps.reference_loss(leased, base_dir, eval_file)


@task(cache_policy=NO_CACHE)
def prune(prune: PruneConfig, ctx: RunContext, base_dir: str, calib_file: str) -> str:
    """Prune the base model (layer-streamed through the run's device); returns the pruned checkpoint."""
    with gpu_slots(ctx) as leased:
        progress = StepProgress(
            "prune", f"Pruning ({prune.strategy})", device=device_label(leased), counting="layer"
        )
        watch = _Watch(leased, "prune", progress)
        return watch.done(steps.prune(prune, leased, base_dir, calib_file, progress))


@task(cache_policy=NO_CACHE)
def align(
    align: AlignConfig,
    ctx: RunContext,
    pruned_dir: str,
    blocks_file: str,
    eval_file: str | None = None,
    reference: float | None = None,
    base_dir: str | None = None,
) -> str:
    """Align the pruned model on the corpus (`align.objective`; `kd`/`cpt+kd` distil from `base_dir`).

    Resumes after a crash. `eval_file` gives the held-out points every `align.eval_every` steps;
    `reference` (the original's held-out loss on the same blocks) is the loss curve's reference line.
    """
    what = {"cpt": "continual pre-training", "kd": "distillation", "cpt+kd": "pre-training + distillation"}
    with gpu_slots(ctx, align.nproc_per_node) as leased, core_logs_to_run_log():
        progress = StepProgress("align", f"Alignment ({what[align.objective]})", curve_key="alignment-loss",
                                device=device_label(leased), reference=reference)  # fmt: skip
        watch = _Watch(leased, "align", progress)
        out = steps.align(align, leased, pruned_dir, blocks_file, progress, eval_file, base_dir=base_dir)
        return watch.done(out)


@task(cache_policy=NO_CACHE)
def quantize(quantize: QuantizeConfig, ctx: RunContext, aligned_dir: str) -> str | None:
    """The NF4 (bitsandbytes) variant of the aligned model, or None when disabled."""
    with gpu_slots(ctx) as leased:
        progress = StepProgress(
            "quantize", f"Quantization ({quantize.quant_type})", device=device_label(leased)
        )
        watch = _Watch(leased, "quantize", progress)
        return watch.done(steps.quantize(quantize, leased, aligned_dir))


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
    with gpu_slots(cfg) as leased:
        progress = StepProgress("evaluate", "Evaluation (held-out perplexity)", device=device_label(leased))
        watch = _Watch(leased, "evaluate", progress)
        result = steps.evaluate(leased, base_dir, pruned_dir, aligned_dir, nf4_dir, blocks_file)
        watch.done(None)
        return result


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
    from loram_core.card import consumer_uri

    progress = StepProgress(
        "publish", f"Publishing to {consumer_uri(steps.publish_uri(cfg))}", counting="MiB sent"
    )
    progress.start()
    result = steps.publish(
        cfg, base_dir, blocks_file, aligned_dir, nf4_dir, evaluation, verification, progress
    )
    progress.finish()
    sent = f"{result['uploaded_files']} files sent ({format_bytes(result['uploaded_bytes'])})"
    note(
        "publish",
        f"{result['status']} {consumer_uri(result['uri'])}: {sent}, {result['skipped_files']} already there",
    )
    return result


@task(cache_policy=NO_CACHE)
def preflight(cfg: PipelineConfig) -> None:
    """Check base checkpoint, corpus, layer range, device, bucket and work dir before any compute."""
    steps.preflight(cfg)
