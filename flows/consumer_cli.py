"""The consumer's commands: `pull` a version, `recover` a LoRA trained on it for the original,
`merge` it into the original's weights, and `original` (which model a version was pruned from).

Registered on the `loram` app by `flows/cli.py`; light at import, like every command module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from loram_core.errors import LoramError
from loram_provider.flows._terminal import DTYPES as _DTYPES
from loram_provider.flows._terminal import console, err_console, quiet, step_bars
from loram_provider.flows._terminal import fail as _fail


def pull(
    uri: Annotated[
        str, typer.Argument(help="BUCKET/NAME (its LATEST) or BUCKET/NAME/VERSION, file:// or s3://")
    ],
    dest: Annotated[
        Path,
        typer.Argument(
            help="folder to create (one holding this version is refreshed, another needs --force)"
        ),
    ],
    only: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="model | model-nf4 | masks; repeat for several (default: all)"),
    ] = None,
    cache: Annotated[bool, typer.Option(help="reuse and fill the local content-addressed cache")] = True,
    force: Annotated[
        bool, typer.Option("--force", help="replace DEST when it holds an earlier pull of another version")
    ] = False,
) -> None:
    """Download a published version into DEST, every file checked against its manifest's sha256."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from loram_core.bucket import pull as run_pull

    try:
        _check_pull_dest(uri, dest, force)
    except LoramError as err:
        _fail(err)
    with Progress(TextColumn("pull"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TextColumn("{task.fields[what]}"), console=err_console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("pull", total=None, what="")
        shown = [0]

        def show(event: dict) -> None:
            shown[0] = max(shown[0], event["step"])  # threads report out of order: never backwards
            bar.update(task, completed=shown[0] << 20, total=event["total"] << 20, what=event["what"])

        try:
            manifest = run_pull(uri, dest, only, cache=cache, progress=show)
        except LoramError as err:
            bar.stop()
            _fail(err)
    err_console.print(
        f"[green]verified[/] {len(manifest.files)} files of {manifest.name}/{manifest.version} -> {dest}",
        highlight=False,
    )


def _check_pull_dest(uri: str, dest: Path, force: bool) -> None:
    """Refuse to replace a DEST that holds another version (or anything but a pull) without `--force`.

    The version is resolved first, so a bucket's bad manifest or LATEST is refused for what it is
    before the consumer's folder is looked at. A DEST holding this very version is pulled again in
    place (files checked, missing ones fetched).
    """
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    from loram_core.bucket import resolve_version
    from loram_core.bucket.untrusted import MAX_MANIFEST_BYTES, parse_manifest

    _, theirs = resolve_version(uri)
    held = dest / "manifest.json"
    if not dest.is_dir() or not held.is_file() or held.stat().st_size > MAX_MANIFEST_BYTES:
        return  # not a pull: `pull` itself refuses a DEST that is not empty and not an earlier pull
    try:
        mine = parse_manifest(held.read_bytes(), str(held))
    except LoramError:
        mine = None  # a manifest.json that is no version's: pull's own rule for a foreign DEST decides
    if mine is None or (mine.name, mine.version) == (theirs.name, theirs.version) or force:
        return
    raise LoramError(
        f"{str(dest)!r} holds {mine.name}/{mine.version} (an earlier pull); pulling {theirs.name}/{theirs.version} "
        "would replace it. Pass --force to replace it, or pull into another DEST."
    )


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
            help="original checkpoint dir, bucket URI or hub id (default: the one the version's manifest names, "
            "checked by fingerprint)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of normA's draws")] = 0,
    dtype: Annotated[str, typer.Option(help="merged checkpoint dtype (mask, complement)")] = "bfloat16",
    force: Annotated[bool, typer.Option("--force", help="replace --out if it exists")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show libraries' warnings here too")] = False,
) -> None:
    """Recover a LoRA adapter trained on a pruned base for the original model."""
    modes = ("auto", "zeroA", "normA", "dense", "mask", "complement")
    if mode not in modes:
        _fail(LoramError(f"--mode {mode!r} is not one of {', '.join(modes)}."))
    if dtype not in _DTYPES:
        _fail(LoramError(f"--dtype {dtype!r} is not one of {', '.join(_DTYPES)}."))
    from loram_core.recover.output import check_out

    try:
        check_out(out, force)  # before anything loads
    except LoramError as err:
        _fail(err)
    quiet(debug, "recover")
    from loram_core.recover import recover as run_recover

    try:
        result = run_recover(
            base, adapter, out, mode=mode, original=original, seed=seed, dtype=dtype, force=force
        )  # type: ignore[arg-type]
    except LoramError as err:
        _fail(err)
    what = "merged model" if result.merged else "peft adapter"
    console.print(
        f"[green]recovered[/] ({result.mode}) {len(result.grown)} pruned and {len(result.unchanged)} unchanged "
        f"modules -> {what} at {escape(str(result.out_dir))} for {escape(result.base_model)}"
    )
    if result.original:
        console.print(f"original: {result.original}", highlight=False, markup=False)


def merge(
    adapter: Annotated[
        Path, typer.Option(help="peft LoRA adapter for the original (e.g. from `loram recover`)")
    ],
    out: Annotated[Path, typer.Option(help="directory to write the merged checkpoint into")],
    original: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="original checkpoint dir (16/32-bit or bitsandbytes NF4); default: the one the adapter names"
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32")] = "bfloat16",
    force: Annotated[bool, typer.Option("--force", help="replace --out if it exists")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="show libraries' warnings and progress bars")
    ] = False,
) -> None:
    """Merge a LoRA adapter into the original model's weights (an NF4 model is dequantized first)."""
    if dtype not in _DTYPES:
        _fail(LoramError(f"--dtype {dtype!r} is not one of {', '.join(_DTYPES)}."))
    from loram_core.recover.output import check_out

    try:
        check_out(out, force)
    except LoramError as err:
        _fail(err)
    quiet(debug, "merge")
    from loram_core.recover import merge as run_merge

    try:
        merged = run_merge(original, adapter, out, dtype=dtype, force=force)
    except LoramError as err:
        _fail(err)
    console.print(f"[green]merged[/] {len(merged)} modules into {escape(str(out))} ({dtype})")


def original(
    uri: Annotated[str, typer.Argument(help="a published version: URI (file://, s3://) or pulled folder")],
    build: Annotated[
        bool,
        typer.Option("--build", help="rebuild the demo base from the manifest's settings if it is missing"),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show libraries' warnings here too")] = False,
) -> None:
    """Say which original model a version was pruned from and where it is here (checked by fingerprint)."""
    from loram_core.original import resolve_original

    try:
        base, where = _version_base(uri)
        if build:
            _build_original(base, debug)
        found = resolve_original(base, None, where, where)
    except LoramError as err:
        _fail(err)
    console.print(escape(found.name), highlight=False, soft_wrap=True)  # alone on stdout: --original "$(...)"
    err_console.print(f"original: {found.how}", highlight=False, markup=False)


def _version_base(uri: str) -> tuple[dict, str]:
    """The `base` section of a version's manifest (a URI, or a pulled folder) and how to name it."""
    folder = Path(uri)
    if "://" not in uri and (folder / "manifest.json").is_file():
        from loram_core.bucket.untrusted import MAX_MANIFEST_BYTES, parse_manifest

        held = folder / "manifest.json"
        if held.stat().st_size > MAX_MANIFEST_BYTES:
            raise LoramError(f"{held} is larger than any manifest loram writes; is it a version folder?")
        return parse_manifest(held.read_bytes(), str(held)).base, str(folder.absolute())
    from loram_core.bucket import resolve_version

    version_uri, manifest = resolve_version(uri, check_uri=False)
    return manifest.base, version_uri


def _build_original(base: dict, debug: bool) -> None:
    """Pretrain the demo base a version was pruned from, from its manifest's settings (if missing)."""
    from loram_core.original import demo_candidates, original_of

    record = original_of(base)
    if record.get("kind") != "demo" or "demo" not in record:
        raise LoramError(
            "--build rebuilds only the demo base (from the settings its manifest records); this version's original "
            f"is {record.get('repo_id') or record.get('path') or record.get('uri') or 'not recorded'}."
        )
    if any((p / "config.json").is_file() for p in demo_candidates(record)):
        return
    quiet(debug, "original")
    from loram_core.config import BaseConfig, CorpusConfig
    from loram_core.demo import build_demo_base

    cfg = BaseConfig(demo=record["demo"], cache_dir=record.get("cache_dir") or BaseConfig().cache_dir)
    corpus = CorpusConfig(heldout_fraction=record["heldout_fraction"])
    with step_bars(err_console):
        from loram_provider.tasks import _progress

        def report(event: dict) -> None:
            for listener in _progress.LISTENERS:
                listener("pretrain demo base", event["step"], event["total"], event)

        build_demo_base(cfg, corpus, report, heldout_unit=record.get("heldout_unit", "documents"))
