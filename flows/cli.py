"""The `loram` command line: `run` (the Prefect flow) for publishers; `pull`, `recover`, `merge`,
`original` and `inspect` for consumers; `plan`, `verify`, `deploy`.

Only typer, rich and our own light modules load at start, so `--help`, `--version` and a refused
config answer at once; each command imports the heavy libraries (torch, transformers, prefect,
peft) it needs. The terminal gets only what these commands print: other libraries' warnings and
progress bars go to a log file (`flows/_console.py`); `--debug` shows them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from loram_core.errors import LoramError
from loram_core.report import format_gib
from loram_provider.flows import consumer_cli
from loram_provider.flows._terminal import console
from loram_provider.flows._terminal import fail as _fail
from loram_provider.flows._terminal import step_bars as _step_bars

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="LoRAM provider: prune, align, quantize, publish."
)


def _version(value: bool) -> None:
    if value:
        from loram_core.version import code_version

        console.print(f"loram-provider {code_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """LoRAM provider: prune, align, quantize, publish; pull, recover, merge."""


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
        bool,
        typer.Option("--debug", help="show Prefect's log lines, tracebacks and libraries' warnings here too"),
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
    from loram_provider.flows._console import (
        check_api_reachable,
        log_file_for,
        quiet_progress_bars,
        route_console,
    )
    from loram_provider.flows.credentials import block_credentials

    try:
        check_api_reachable()
        with block_credentials(cfg.credentials_block):
            cfg = pin_version(cfg)  # the version is checked for a clash now
            checks.preflight(cfg)
    except LoramError as err:
        _fail(err)
    quiet_progress_bars()
    log_file = log_file_for(cfg.workdir)
    if not debug:
        route_console(log_file)
    from loram_provider.flows.provider import provider

    with _step_bars():
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
    from loram_provider.flows._summary import print_run_summary

    print_run_summary(console, result)
    if not debug:
        console.print(f"log: {log_file}", highlight=False, soft_wrap=True)


def _ephemeral_server_error(err: RuntimeError) -> LoramError:
    return LoramError(
        f"{err} Prefect's temporary server (ephemeral mode) did not start in time, typically on a busy machine "
        "migrating a fresh database: raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (e.g. 120), or run "
        "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api."
    )


def _print_summary(result: dict) -> None:
    """The run's result as `loram run` prints it (`flows/_summary.py`)."""
    from loram_provider.flows._summary import print_run_summary

    print_run_summary(console, result)


@app.command()
def inspect(
    uri: Annotated[str, typer.Argument(help=escape("<bucket>/<name>[/<version>]"))],
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest (JSON) instead")] = False,
) -> None:
    """Verify a published version against its manifest and say what it holds (`--json`: the manifest)."""
    from loram_core.bucket import verify_version

    try:
        manifest = verify_version(uri)
    except LoramError as err:
        _fail(err)
    if as_json:
        sys.stdout.write(manifest.model_dump_json(indent=2) + "\n")
        return
    from loram_core.bucket import resolve_version
    from loram_provider.flows._summary import print_version

    print_version(console, manifest, resolve_version(uri)[0])


@app.command()
def plan(
    source: Annotated[Path, typer.Argument(help="a pipeline YAML, a model directory or its config.json")],
    strategy: Annotated[Optional[str], typer.Option(help="random | structured | semi | unstructured")] = None,  # noqa: UP045
    ratio: Annotated[Optional[float], typer.Option(help="fraction removed")] = None,  # noqa: UP045
    keep_first: Annotated[Optional[int], typer.Option(help="leading layers left dense")] = None,  # noqa: UP045
    keep_last: Annotated[Optional[int], typer.Option(help="trailing layers left dense")] = None,  # noqa: UP045
    round_to: Annotated[Optional[int], typer.Option(help="MLP widths rounded down to a multiple")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON object")] = False,
) -> None:
    """Widths, parameter counts and HBM of a pruning config, with no weights loaded.

    With a pipeline YAML the model is its `base.source` and the options override its `prune`
    section; with a model, unset options default to structured at 0.5.
    """
    from loram_core.config import load_config, parse_config
    from loram_core.demo import base_model_config
    from loram_core.prune.plan import loading, read_model_config
    from loram_core.prune.plan import plan as make_plan

    options = {"strategy": strategy, "ratio": ratio, "keep_first": keep_first, "keep_last": keep_last,
               "round_to": round_to}  # fmt: skip
    try:
        if source.suffix in (".yaml", ".yml"):
            pipeline = load_config(source)
            model_config = base_model_config(pipeline.base)
            prune = pipeline.prune.model_dump()
            prune.update({k: v for k, v in options.items() if v is not None})
        else:
            model_config = read_model_config(source)
            prune = {"strategy": strategy or "structured", "ratio": 0.5 if ratio is None else ratio,
                     "keep_first": keep_first, "keep_last": keep_last, "round_to": round_to or 1}  # fmt: skip
        prune_cfg = parse_config({"prune": prune}, source="command-line options").prune
        p = make_plan(model_config, prune_cfg)
        how = loading(model_config, prune_cfg)
    except LoramError as err:
        _fail(err)
    if as_json:
        sys.stdout.write(json.dumps({**p.to_dict(), "loading": how}, indent=2) + "\n")
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
    console.print(_loading_line(how, prune_cfg.strategy))
    for line in _plan_notes(p, prune_cfg):
        console.print(line, highlight=False)


def _loading_line(how: str, strategy: str) -> str:
    """The plan's sentence on how a consumer loads the published 16-bit model."""
    if how == "remote code":
        return (
            "loading: layers of different widths, so model/ ships modeling_loram.py "
            "(AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)); keep_first=0 keep_last=0 "
            "gives uniform widths that load stock"
        )
    what = "the original's shapes" if strategy in ("semi", "unstructured") else "uniform widths"
    return (
        f"loading: stock AutoModelForCausalLM.from_pretrained, no remote code ({what}, a plain family config)"
    )


def _plan_notes(p, cfg) -> list[str]:
    """What the table leaves out: width rounding, and the per-layer ratios of a sparse plan."""
    notes = []
    if p.unrounded_intermediate is not None and p.round_to > 1:
        kept = p.layers[p.pruned_layers[0]]["intermediate"]
        notes.append(f"MLP widths rounded down to multiples of {p.round_to} (prune.round_to): "
                     f"{p.unrounded_intermediate:,} -> {kept:,} channels per pruned layer")  # fmt: skip
    if p.layerwise == "owl":
        notes.append(
            f"layer ratios: OWL (prune.owl_m={cfg.owl_m:g}, prune.owl_lambda={cfg.owl_lambda:g}) decides them at "
            "prune time from the dense model's Wanda scores on the calibration data, each within "
            f"{cfg.ratio - cfg.owl_lambda:g}..{cfg.ratio + cfg.owl_lambda:g} and averaging {cfg.ratio:g}; the "
            "pruned checkpoint's config.json records them (loram.layer_ratios), and the masks file too"
        )
    elif p.layer_ratios is not None:
        notes.append(f"layer ratios: {p.layer_ratios[0]:g} in every pruned layer (prune.layerwise=uniform)")
    return notes


@app.command()
def verify(
    config: Annotated[Path, typer.Argument(help="YAML preset, e.g. configs/demo.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted overrides: verify.rank=4")] = None,  # noqa: UP045
    debug: Annotated[
        bool, typer.Option("--debug", help="show Prefect's log lines and libraries' warnings here too")
    ] = False,
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
    from loram_provider.flows._console import log_file_for, quiet_progress_bars, route_console

    quiet_progress_bars()
    if not debug:
        route_console(log_file_for(cfg.workdir))
    from loram_provider.flows.verify import verify as verify_flow

    try:
        with checks.checked(cfg), _step_bars():
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


for _command in (consumer_cli.pull, consumer_cli.recover, consumer_cli.merge, consumer_cli.original):
    app.command()(_command)


def main() -> None:
    """The `loram` entry point."""
    from loram_provider.flows._console import hold_library_notices

    hold_library_notices(show="--debug" in sys.argv)
    app()


if __name__ == "__main__":
    main()
