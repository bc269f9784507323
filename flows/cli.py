"""The `loram` command line: `run` (the Prefect flow), `inspect` and `plan` (no Prefect needed).

Only typer, rich and our own light modules load at start, so `--help` and a refused config answer
at once; each command imports the heavy libraries (torch, transformers, prefect, peft) it needs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loram_core.errors import LoramError
from loram_core.report import format_gib, recovery_sentence

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="LoRAM provider: prune, align, quantize, publish."
)
console = Console()
err_console = Console(stderr=True)


_DTYPES = ("bfloat16", "float16", "float32")


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML preset, e.g. configs/demo.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted overrides: prune.ratio=0.5")] = None,  # noqa: UP045
    until: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="last model step: prune | align | quantize (the config's `until`); evaluate and publish follow"
        ),
    ] = None,
    no_publish: Annotated[
        bool,
        typer.Option(
            "--no-publish", help="write the version under <workdir>/local-bucket (publish.enabled=false)"
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="show Prefect's tracebacks of handled errors")
    ] = False,
) -> None:
    """Run the provider flow on CONFIG and print what was published."""
    from loram_core.config import load_config

    flags = ([f"until={until}"] if until is not None else []) + (
        ["publish.enabled=false"] if no_publish else []
    )
    try:
        cfg = load_config(config, [*(overrides or []), *flags])  # a bad key or value: refused right here
    except LoramError as err:
        _fail(err)
    from loram_core import checks
    from loram_core.steps import pin_version
    from loram_provider.flows._console import check_api_reachable, log_file_for, route_tracebacks
    from loram_provider.flows.credentials import block_credentials

    try:
        check_api_reachable()
        with block_credentials(cfg.credentials_block):
            cfg = pin_version(cfg)  # the version is checked for a clash now
            checks.preflight(cfg)
    except LoramError as err:
        _fail(err)
    _quiet_libraries()
    log_file = log_file_for(cfg.workdir)
    if not debug:
        route_tracebacks(log_file)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from loram_provider.flows.provider import provider
    from loram_provider.tasks import _progress

    bars: dict[str, int] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:

        def listen(name: str, done: int, total: int, event: dict) -> None:
            if name not in bars:
                bars[name] = bar.add_task(name, total=total, info="")
            what = event.get("what", name)  # the phase within a step (e.g. taylor, then prune)
            info = f"loss {event['loss']:.3f}" if "loss" in event else ("" if what == name else what)
            if "tokens_per_s" in event:
                info += f" {_progress.throughput(event)}"
            bar.update(bars[name], completed=done, total=total, info=info)

        _progress.LISTENERS.append(listen)
        try:
            with checks.checked(cfg):  # the flow's preflight task: already passed, in this process
                result = provider(cfg)
        except LoramError as err:
            if not debug:
                err = LoramError(f"{err}\n(full log with tracebacks: {log_file}; `--debug` shows them here)")
            _fail(err)
        except RuntimeError as err:
            if "ephemeral Prefect API server" not in str(err):
                raise
            _fail(_ephemeral_server_error(err))
        finally:
            _progress.LISTENERS.remove(listen)
    _print_summary(result)


def _ephemeral_server_error(err: RuntimeError) -> LoramError:
    return LoramError(
        f"{err} Prefect's temporary server (ephemeral mode) did not start in time, typically on a busy machine "
        "migrating a fresh database: raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (e.g. 120), or run "
        "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api."
    )


def _quiet_libraries() -> None:
    """Our progress bars and Prefect's log lines tell the story; silence the libraries' own bars."""
    import logging

    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # bitsandbytes 0.50 warns on every CPU import that an optional kernels package is missing;
    # NF4 works without it (its generic path), so the warning only alarms users.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _print_summary(result: dict) -> None:
    from loram_core.card import consumer_uri
    from loram_core.sizes import size_rows

    m, p = result["metrics"], result["params"]
    status = result.get("publish", {}).get("status", "published")
    table = Table(title=f"{status} {consumer_uri(result['uri'])}")  # absolute: usable from anywhere
    table.add_column("model")
    table.add_column("held-out perplexity", justify="right")
    table.add_column("stored parameters", justify="right")
    table.add_column("weights memory", justify="right")
    stored = p.get("stored_params", p["pruned_params"])
    sixteen = format_gib(p.get("hbm_gb", stored * 2 / 2**30))
    table.add_row("original", f"{m['original_ppl']:.2f}", f"{p['original_params']:,}",
                  format_gib(p["original_params"] * 2 / 2**30))  # fmt: skip
    table.add_row("pruned", f"{m['pruned_ppl']:.2f}", f"{stored:,}", sixteen)
    if "aligned_ppl" in m:
        table.add_row("aligned", f"{m['aligned_ppl']:.2f}", f"{stored:,}", sixteen)
    for key, label in (("aligned_nf4_ppl", "aligned, NF4"), ("pruned_nf4_ppl", "pruned, NF4")):
        if key in m:
            table.add_row(label, f"{m[key]:.2f}", f"{stored:,}", format_gib(p["hbm_gb_4bit_actual"]))
    console.print(table)
    compute = result.get("compute") or {}
    if compute:
        console.print(f"computed on {compute['device']} ({compute.get('name', '')})", highlight=False)
    sizes = Table(title="size", show_header=False)
    sizes.add_column("quantity")
    sizes.add_column("value", justify="right")
    for label, value in size_rows(p):
        shown = (
            f"{value:,.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        )
        sizes.add_row(label, shown)
    console.print(sizes)
    if "aligned_ppl" in m:  # only a run that aligned has anything to say about recovery
        console.print(recovery_sentence(m), highlight=False)
    if result.get("verification"):
        _print_verification(result["verification"])


def _print_verification(verification: dict) -> None:
    """The LoRA ablation's table (`verify` section), as the card shows it."""
    from loram_core.verify.report import table_rows

    title = "LoRA trained small, inferred large (held-out task loss, mean ± std over seeds, lower is better)"
    table = Table(title=title)
    rows = table_rows(verification)
    for col in rows[0]:
        table.add_column(
            col, justify="right" if col in ("task loss", "vs LoRAM", "token accuracy") else "left"
        )
    for r in rows:
        table.add_row(*r.values())
    console.print(table)


@app.command()
def inspect(uri: Annotated[str, typer.Argument(help=escape("<bucket>/<name>[/<version>]"))]) -> None:
    """Verify a published version against its manifest and print the manifest."""
    from loram_core.bucket import verify_version

    try:
        manifest = verify_version(uri)
    except LoramError as err:
        _fail(err)
    console.print_json(manifest.model_dump_json())
    err_console.print(f"[green]verified[/] {len(manifest.files)} files of {manifest.name}/{manifest.version}")


@app.command()
def pull(
    uri: Annotated[
        str, typer.Argument(help="BUCKET/NAME (its LATEST) or BUCKET/NAME/VERSION, file:// or s3://")
    ],
    dest: Annotated[Path, typer.Argument(help="folder to create (an earlier pull there is replaced)")],
    only: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="model | model-nf4 | masks; repeat for several (default: all)"),
    ] = None,
    cache: Annotated[bool, typer.Option(help="reuse and fill the local content-addressed cache")] = True,
) -> None:
    """Download a published version into DEST, every file checked against its manifest's sha256."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from loram_core.bucket import pull as run_pull

    with Progress(TextColumn("pull"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TextColumn("{task.fields[what]}"), console=err_console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("pull", total=None, what="")

        def show(event: dict) -> None:
            bar.update(task, completed=event["step"] << 20, total=event["total"] << 20, what=event["what"])

        try:
            manifest = run_pull(uri, dest, only, cache=cache, progress=show)
        except LoramError as err:
            bar.stop()
            _fail(err)
    err_console.print(
        f"[green]verified[/] {len(manifest.files)} files of {manifest.name}/{manifest.version} -> {dest}",
        highlight=False,
    )


@app.command()
def plan(
    source: Annotated[Path, typer.Argument(help="a pipeline YAML, a model directory or its config.json")],
    strategy: Annotated[Optional[str], typer.Option(help="random | structured | semi | unstructured")] = None,  # noqa: UP045
    ratio: Annotated[Optional[float], typer.Option(help="fraction removed")] = None,  # noqa: UP045
    keep_first: Annotated[Optional[int], typer.Option(help="leading layers left dense")] = None,  # noqa: UP045
    keep_last: Annotated[Optional[int], typer.Option(help="trailing layers left dense")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON object")] = False,
) -> None:
    """Widths, parameter counts and HBM of a pruning config, with no weights loaded.

    With a pipeline YAML the model is its `base.source` and the options override its `prune`
    section; with a model, unset options default to structured at 0.5.
    """
    from loram_core.config import load_config, parse_config
    from loram_core.demo import base_model_config
    from loram_core.prune.plan import plan as make_plan
    from loram_core.prune.plan import read_model_config

    options = {"strategy": strategy, "ratio": ratio, "keep_first": keep_first, "keep_last": keep_last}
    try:
        if source.suffix in (".yaml", ".yml"):
            pipeline = load_config(source)
            model_config = base_model_config(pipeline.base)
            prune = pipeline.prune.model_dump()
            prune.update({k: v for k, v in options.items() if v is not None})
        else:
            model_config = read_model_config(source)
            prune = {"strategy": strategy or "structured", "ratio": 0.5 if ratio is None else ratio,
                     "keep_first": keep_first, "keep_last": keep_last}  # fmt: skip
        prune_cfg = parse_config({"prune": prune}, source="command-line options").prune
        p = make_plan(model_config, prune_cfg)
    except LoramError as err:
        _fail(err)
    if as_json:
        sys.stdout.write(json.dumps(p.to_dict(), indent=2) + "\n")
        return
    table = Table(title=f"{prune_cfg.strategy} at {prune_cfg.ratio}")
    for col in ("layer", "heads", "kv heads", "intermediate"):
        table.add_column(col, justify="right")
    for i, w in enumerate(p.layers):
        mark = "" if i in p.pruned_layers else " (dense)"
        table.add_row(f"{i}{mark}", str(w["heads"]), str(w["kv_heads"]), str(w["intermediate"]))
    console.print(table)
    console.print(
        f"parameters {p.original_params:,} -> {p.pruned_params:,} ({p.reduction:.2f}x); HBM {format_gib(p.hbm_gb)} bf16, "
        f"{format_gib(p.hbm_gb_4bit)} 4-bit (QLoRAM accounting), {format_gib(p.hbm_gb_4bit_actual)} 4-bit actual"
    )


@app.command()
def recover(
    base: Annotated[
        str,
        typer.Option(help="published version (dir or file://, s3:// URI) or pruned checkpoint with masks/"),
    ],
    adapter: Annotated[Path, typer.Option(help="peft LoRA adapter trained on the base")],
    out: Annotated[
        Path, typer.Option(help="directory to write the recovered adapter (or merged model) into")
    ],
    mode: Annotated[
        str, typer.Option(help="auto | zeroA | normA (structured) | dense | mask | complement (sparse)")
    ] = "auto",
    original: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="original checkpoint dir (or hub id): named in the adapter, used for shapes; mask/complement merge into it"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of normA's draws")] = 0,
    dtype: Annotated[str, typer.Option(help="merged checkpoint dtype (mask, complement)")] = "bfloat16",
) -> None:
    """Recover a LoRA adapter trained on a pruned base for the original model."""
    modes = ("auto", "zeroA", "normA", "dense", "mask", "complement")
    if mode not in modes:
        _fail(LoramError(f"--mode {mode!r} is not one of {', '.join(modes)}."))
    if dtype not in _DTYPES:
        _fail(LoramError(f"--dtype {dtype!r} is not one of {', '.join(_DTYPES)}."))
    from loram_core.recover import recover as run_recover

    try:
        result = run_recover(base, adapter, out, mode=mode, original=original, seed=seed, dtype=dtype)  # type: ignore[arg-type]
    except LoramError as err:
        _fail(err)
    what = "merged model" if result.merged else "peft adapter"
    console.print(
        f"[green]recovered[/] ({result.mode}) {len(result.grown)} pruned and {len(result.unchanged)} unchanged "
        f"modules -> {what} at {result.out_dir} for {result.base_model}"
    )


@app.command()
def merge(
    original: Annotated[Path, typer.Option(help="original checkpoint dir (16/32-bit or bitsandbytes NF4)")],
    adapter: Annotated[
        Path, typer.Option(help="peft LoRA adapter for the original (e.g. from `loram recover`)")
    ],
    out: Annotated[Path, typer.Option(help="directory to write the merged checkpoint into")],
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32")] = "bfloat16",
) -> None:
    """Merge a LoRA adapter into the original model's weights (an NF4 model is dequantized first)."""
    if dtype not in _DTYPES:
        _fail(LoramError(f"--dtype {dtype!r} is not one of {', '.join(_DTYPES)}."))
    from loram_core.recover import merge as run_merge

    try:
        merged = run_merge(original, adapter, out, dtype=dtype)
    except LoramError as err:
        _fail(err)
    console.print(f"[green]merged[/] {len(merged)} modules into {out} ({dtype})")


@app.command()
def verify(
    config: Annotated[Path, typer.Argument(help="YAML preset, e.g. configs/demo.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted overrides: verify.rank=4")] = None,  # noqa: UP045
) -> None:
    """Run CONFIG's pipeline (finished steps are reused) with the LoRA ablation, and publish it in the model card."""
    from loram_core.config import load_config
    from loram_core.verify.checks import require_alignment

    try:
        cfg = load_config(config, [*(overrides or []), "verify.enabled=true"])
        require_alignment(cfg)
    except LoramError as err:
        _fail(err)
    from loram_core import checks
    from loram_provider.flows.credentials import block_credentials

    try:
        with block_credentials(cfg.credentials_block):
            checks.preflight(cfg)
    except LoramError as err:
        _fail(err)
    _quiet_libraries()
    from loram_provider.flows.verify import verify as verify_flow

    try:
        with checks.checked(cfg):
            result = verify_flow(cfg.model_dump(mode="json"))
    except LoramError as err:
        _fail(err)
    _print_summary(result)


@app.command()
def deploy(
    gpus: Annotated[int, typer.Option(help="slots of the `gpu` limit: GPUs of a worker's host")] = 1,
    spec: Annotated[Path, typer.Option(help="deployments, schedules, pool")] = Path("prefect.yaml"),
    only: Annotated[Optional[list[str]], typer.Option(help="apply only this deployment (repeatable)")] = None,  # noqa: UP045
    code_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="checkout workers run the flow from (default: LORAM_CODE_DIR, else here)"),
    ] = None,
    automation: Annotated[
        Path, typer.Option(help="zombie-run automation to apply (replaces one of the same name)")
    ] = Path("deploy/zombie-runs.yaml"),
    no_automation: Annotated[bool, typer.Option("--no-automation", help="skip the automation")] = False,
) -> None:
    """Create the work pool, the `gpu` limit, the deployments (one per preset, with schedules) and
    the zombie-run automation on the server PREFECT_API_URL names."""
    from loram_provider.flows.deploy import apply, default_code_dir

    try:
        done = apply(spec, gpus, code_dir or default_code_dir(), only, None if no_automation else automation)
    except LoramError as err:
        _fail(err)
    console.print(
        f"[green]deployed[/] {', '.join(done.deployments)} to work pool {done.pool} on {done.api_url}; "
        f"concurrency limit gpu = {done.gpu_slots}"
        + (f"; automation {done.automation}" if done.automation else ""),
        highlight=False,
    )
    console.print(f"start a worker on the GPU host: prefect worker start --pool {done.pool}", highlight=False)


def main() -> None:
    """The `loram` entry point."""
    from loram_provider.flows._console import hold_library_notices

    hold_library_notices(show="--debug" in sys.argv)
    app()


if __name__ == "__main__":
    main()
