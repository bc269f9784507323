"""Preflight checks: what a run needs, checked before any compute, each failure one `LoramError`.

Every check is cheap: it reads `config.json`, the safetensors headers (never the tensors), the
tokenizer, and streams the corpus only until one block of each split is certain. Each message
names the key or file, what is wrong with it and the fix, so the CLI can print it as one
paragraph and exit 2 instead of failing with a traceback minutes into a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from loram_core.config import CorpusConfig, PipelineConfig, fingerprint
from loram_core.errors import ConfigError, LoramError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

INDEX = "model.safetensors.index.json"
# Stores that hold a published version: files, or object stores (the create-only manifest needs one).
BUCKET_PROTOCOLS = ("file", "local", "s3", "s3a", "gs", "gcs", "abfs", "abfss", "az")


def check_base(path: Path) -> PretrainedConfig:
    """Check a base checkpoint directory: its config and its weights (headers only).

    Args:
        path: the directory `base.source` names.

    Returns:
        The model's config.

    Raises:
        LoramError: naming the file that is missing, unreadable, truncated or inconsistent.
    """
    from transformers import AutoConfig

    from loram_core.models import family_of, load_config

    config_file = path / "config.json"
    if not config_file.is_file():
        load_config(path)  # raises the error that names the fix
    try:
        json.loads(config_file.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise LoramError(
            f"base.source={str(path)!r}: {config_file} is not valid JSON ({err}); restore it from the "
            "original checkpoint (model.config.save_pretrained writes it)."
        ) from None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise LoramError(
            f"base.source={str(path)!r}: transformers cannot read {config_file}: {err}"
        ) from None
    family_of(config)  # an unsupported model_type names the supported families
    check_weights(path)
    return config


def safetensors_header(file: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, checked against the file's size.

    Reads the 8-byte header length and the JSON header only. A file is complete when its data
    section is exactly as long as the largest tensor end offset the header declares.

    Returns:
        `{tensor name: {"dtype", "shape", "data_offsets"}}` (the `__metadata__` entry left out).

    Raises:
        LoramError: the file is truncated, or its header is not a safetensors header.
    """
    size = file.stat().st_size
    fix = "copy or convert the checkpoint again (a download or copy was probably cut short)"
    with open(file, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise LoramError(
                f"{file} is truncated or not a safetensors file ({size} bytes, too short for its header); {fix}."
            )
        try:
            header = json.loads(fh.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise LoramError(f"{file} has no valid safetensors header; {fix}.") from None
    data = size - 8 - n
    if end != data:
        raise LoramError(
            f"{file} is truncated or corrupt: its header declares {end:,} bytes of tensor data, the file "
            f"holds {data:,}; {fix}."
        )
    return tensors


def check_weights(path: Path) -> None:
    """Check the checkpoint's safetensors files (and index, if sharded) without reading tensors.

    Raises:
        LoramError: no weights, an unreadable index, a shard it names missing or lacking a
            tensor, or a truncated file.
    """
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards: dict[str, list[str]] = {}
            for name, shard in weight_map.items():
                shards.setdefault(shard, []).append(name)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LoramError(
                f"{index} is not a safetensors index (a JSON object with a `weight_map`): {err!r}; "
                "restore it from the original checkpoint."
            ) from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise LoramError(
                f"{index} names shards that are not in {str(path)!r}: {', '.join(missing)}; copy them "
                "there (or the whole checkpoint again)."
            )
        for shard, names in shards.items():
            absent = sorted(set(names) - set(safetensors_header(path / shard)))
            if absent:
                raise LoramError(
                    f"{path / shard} lacks {len(absent)} tensors that {index.name} puts there "
                    f"(e.g. {absent[0]!r}); copy the checkpoint again."
                )
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoramError(
            f"base.source={str(path)!r} has no *.safetensors weights; convert the checkpoint to safetensors."
        )
    for file in files:
        safetensors_header(file)


def check_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Load the checkpoint's tokenizer (the corpus is tokenized with it).

    Raises:
        LoramError: there is none, or it cannot be loaded.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoramError(
            f"base.source={str(path)!r} has no usable tokenizer ({str(err).splitlines()[0]}); save it beside "
            "the weights with tokenizer.save_pretrained(DIR)."
        ) from None


def _documents(file: str, fmt: str, text_field: str, section: str = "corpus") -> Iterator[str]:
    """The documents `data.read_documents` would read from one file, streamed (nothing cached)."""
    from datasets import load_dataset
    from datasets.utils import logging as ds_logging

    kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
    verbosity = ds_logging.get_verbosity()
    ds_logging.set_verbosity_error()  # its reader logs a parse error before raising it: say it once
    try:
        ds = load_dataset(fmt, data_files=[file], split="train", streaming=True, **kwargs)
        for i, record in enumerate(ds):
            if i == 0 and text_field not in record:
                raise ConfigError(
                    f"{section}.text_field={text_field!r} is not a field of {file!r}; its fields are "
                    f"{sorted(record)}. Set {section}.text_field to the one holding the text."
                )
            text = record[text_field]
            if text and text.strip():
                yield text
    except LoramError:
        raise
    except Exception as err:  # a parse error of the user's file, whatever the reader (arrow, json)
        reason = str(err).splitlines()[0] if str(err) else repr(err)
        raise LoramError(
            f"cannot read {section} file {file!r} as {fmt}: {reason}; fix the file or set {section}.format."
        ) from None
    finally:
        ds_logging.set_verbosity(verbosity)


def check_corpus(
    cfg: CorpusConfig,
    cache_dir: str,
    tokenizer: PreTrainedTokenizerBase | None,
    heldout_unit: str = "documents",
) -> None:
    """Check that the corpus files exist, are readable, and hold one block of each split.

    The documents are streamed, split by content hash exactly as `data.make_blocks` splits them,
    and counted until the training and the held-out split each hold at least `corpus.seq_len`
    tokens (EOS after each document included); usually a few documents suffice. Without a
    tokenizer (the demo base, not built yet) UTF-8 bytes bound the count from above, which holds
    for the demo's byte-level BPE: then only a corpus certainly too small is refused.

    Raises:
        LoramError: no file, only empty files, an unreadable file, a missing `text_field`, no
            held-out document, or too few tokens for one block of a split.
    """
    from loram_core.data import _format_of, is_heldout, resolve_files

    files = resolve_files(cfg, cache_dir)
    fmt = _format_of(files, cfg.format)
    nonempty = [f for f in files if os.path.getsize(f) > 0]
    if not nonempty:
        raise ConfigError(
            f"corpus.paths={cfg.paths} matches only empty files ({', '.join(files[:3])}"
            f"{', ...' if len(files) > 3 else ''}); point it at files that hold text."
        )
    tokens = {False: 0, True: 0}  # per split: held out?
    docs = {False: 0, True: 0}
    if heldout_unit == "tokens":  # a share of all tokens: enough text in all for one block of each split
        _check_token_share(cfg, nonempty, fmt, tokenizer)
        return
    for file in nonempty:
        for doc in _documents(file, fmt, cfg.text_field):
            held = is_heldout(doc, cfg.heldout_fraction)
            n = len(tokenizer(doc, add_special_tokens=False)["input_ids"]) if tokenizer else len(doc.encode())
            tokens[held] += n + 1
            docs[held] += 1
            if min(tokens.values()) >= cfg.seq_len:
                return
    total = docs[False] + docs[True]
    if total == 0:
        raise ConfigError(
            f"corpus.paths={cfg.paths} holds no text (only blank {fmt} records in {len(files)} files); "
            "point it at files that hold text."
        )
    if docs[True] == 0:
        raise ConfigError(
            f"corpus.heldout_fraction={cfg.heldout_fraction} holds out none of the {total} documents of "
            f"corpus.paths={cfg.paths}; raise it or add documents."
        )
    unit = "tokens" if tokenizer else "bytes (an upper bound on tokens)"
    held = tokens[False] >= cfg.seq_len  # the split that falls short
    raise ConfigError(
        f"the corpus's {'held-out' if held else 'training'} split holds {tokens[held]} {unit}, fewer than one block of "
        f"corpus.seq_len={cfg.seq_len} ({docs[False]} training and {docs[True]} held-out documents); "
        "add text or lower corpus.seq_len."
    )


def check_writable(path: str | Path, key: str, value: str | None = None) -> None:
    """Check that a directory exists and is writable, or could be created (nothing is created).

    Args:
        path: the directory.
        key: the config key that names it, for the message.
        value: the key's value as the user wrote it, when it differs from `path` (a URI).

    Raises:
        LoramError: the path, or the nearest existing folder above it, is a file or not writable.
    """
    target = Path(path).expanduser().absolute()
    value = str(path) if value is None else value
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == target else f"cannot be created: {existing} is a file"
        raise LoramError(f"{key}={value!r} {what}; point it at a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LoramError(
            f"{key}={value!r} is not writable ({existing} denies writing to this user); "
            "point it at a writable directory or fix its permissions."
        )


def check_bucket(uri: str) -> None:
    """Check a publish URI: a bucket protocol fsspec can open, and writable when local.

    Refused before any connection is tried: protocols that are no bucket (`ftp://`, `http://`,
    `ssh://`...), unknown protocols, and object stores whose fsspec package is not installed.

    Raises:
        LoramError: naming the URI and the protocols that work.
    """
    from fsspec.core import split_protocol
    from fsspec.registry import known_implementations, registry

    from loram_core.bucket import bucket_fs

    protocol = split_protocol(uri)[0] or "file"
    use = "Use file://PATH or s3://BUCKET/PREFIX (gs://, az:// with gcsfs or adlfs installed)."
    if "::" in uri:
        raise LoramError(f"publish.uri={uri!r}: a chained fsspec URL (A::B) is not a bucket. {use}")
    if protocol not in BUCKET_PROTOCOLS:
        known = protocol in known_implementations or protocol in registry
        what = "is known to fsspec but is not a bucket" if known else "is not a protocol fsspec knows"
        raise LoramError(f"publish.uri={uri!r}: {protocol}:// {what}. {use}")
    fs, root = bucket_fs(uri)
    if protocol in ("file", "local"):
        check_writable(root, "publish.uri", uri)


def _check_token_share(
    cfg: CorpusConfig, files: list[str], fmt: str, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """With `eval.heldout_fraction` (a share of tokens): the corpus holds a block for each split's share."""
    f = cfg.heldout_fraction
    need = cfg.seq_len / min(f, 1 - f)
    total = 0
    for file in files:
        for doc in _documents(file, fmt, cfg.text_field):
            n = len(tokenizer(doc, add_special_tokens=False)["input_ids"]) if tokenizer else len(doc.encode())
            total += n + 1
            if total >= need:
                return
    raise ConfigError(
        f"eval.heldout_fraction={f} of the corpus's {total} tokens leaves less than one block of "
        f"corpus.seq_len={cfg.seq_len} in the {'held-out' if f <= 0.5 else 'training'} split; add text, "
        "raise or lower eval.heldout_fraction, or lower corpus.seq_len."
    )


def check_text_files(patterns: list[str], fmt: str, text_field: str, cache_dir: str, key: str) -> None:
    """Check calibration or eval files of their own: they exist, hold text and are readable.

    Args:
        patterns: the files/globs the section lists.
        fmt: its `format` (`auto` tells by the suffix).
        text_field: its `text_field` (json/parquet records).
        cache_dir: where bucket files are cached.
        key: the config key listing them (`calibration.source`, `eval.source`), for messages.

    Raises:
        LoramError: no file matches, only empty files, or the first record cannot be read.
    """
    from loram_core.data import _format_of, resolve_patterns

    files = resolve_patterns(patterns, cache_dir, key)
    nonempty = [f for f in files if os.path.getsize(f) > 0]
    if not nonempty:
        raise ConfigError(f"{key}={patterns} matches only empty files; point it at files that hold text.")
    fmt = _format_of(nonempty, fmt)
    for file in nonempty:
        for _ in _documents(file, fmt, text_field, key.split(".")[0]):
            return
    raise ConfigError(f"{key}={patterns} holds no text; point it at files that hold text.")


def check_publish_target(cfg: PipelineConfig) -> None:
    """Check the bucket a run publishes to, in seconds: reachable, credentials accepted, create-only
    writes honoured (`publish.check_create_only`), and no clash with an existing version.

    An existing version with this run's `publish.version` is refused here, before any compute,
    unless it was made with this run's settings (base source, prune, align, quantize): then the
    run is expected to reproduce it (steps are deterministic and cached), and the publish step
    itself reports "unchanged" or refuses different content.

    Args:
        cfg: the `PipelineConfig`.

    Raises:
        LoramError: naming the endpoint and the variable to set, the probe's failure and its
            opt-out, or the existing version and the settings that differ.
    """
    from loram_core.bucket import probe_create_only
    from loram_core.bucket.store import LocalStore, join, open_store
    from loram_core.manifest import Manifest

    p = cfg.publish
    store = _reach(p.uri, lambda: open_store(p.uri, quick=True))
    if isinstance(store, LocalStore) and not store.root.exists():
        return  # created at publish time; nothing published there yet
    # One read answers "reachable, credentials accepted" and finds the version if it exists.
    key = join(p.name, p.version, "manifest.json") if p.version else join(p.name, "LATEST")
    try:
        data, _ = _reach(p.uri, lambda: store.read(key))
    except FileNotFoundError:
        data = None
    if p.check_create_only and not isinstance(store, LocalStore):  # a folder honours it (hard links)
        _reach(p.uri, lambda: probe_create_only(store))
    if data is None or p.version is None:
        return
    existing = Manifest.model_validate_json(data)
    ours = {"base.source": cfg.base.source, "prune": cfg.prune.model_dump(mode="json"),
            "quantize": cfg.quantize.model_dump(mode="json"), "align": cfg.align.model_dump(mode="json")}  # fmt: skip
    theirs = {"base.source": existing.base.get("source"), "prune": existing.prune,
              "quantize": {k: existing.quantize.get(k) for k in ours["quantize"]},
              "align": {k: existing.align.get(k) for k in ours["align"]}}  # fmt: skip
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        raise LoramError(
            f"publish.version={p.version!r}: {p.uri.rstrip('/')}/{p.name}/{p.version} already exists, made with "
            f"other settings ({', '.join(differ)}); versions are immutable. Choose another publish.version "
            "or leave it unset for a timestamp."
        )


def _reach(uri: str, call):
    """Run a bucket call; a connection failure becomes a `LoramError` naming the endpoint to fix."""
    from loram_core.bucket.s3 import is_transient

    try:
        return call()
    except LoramError:
        raise
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - only connection failures are translated
        if not is_transient(err):
            raise
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        raise LoramError(
            f"publish.uri={uri!r}: cannot reach the S3 endpoint {endpoint} ({type(err).__name__}). Set "
            "AWS_ENDPOINT_URL to the store's address (e.g. http://minio:9000) and AWS_REGION, or check that "
            "it is up."
        ) from None


_CHECKED: set[str] = set()  # fingerprints of configs the preflight passed in this process, for this run


@contextmanager
def checked(cfg: PipelineConfig) -> Iterator[None]:
    """Within the body, `preflight(cfg)` of this very config returns at once: it has just passed.

    `loram run` checks a config before it starts Prefect (so a bad one is refused in a second,
    with no Prefect output) and then runs the flow in the same process; the flow's own preflight
    task would repeat the same reads. Runs from the UI or a schedule start in a worker process,
    where nothing is marked, so their preflight always runs.
    """
    key = fingerprint(cfg.model_dump(mode="json"))
    _CHECKED.add(key)
    try:
        yield
    finally:
        _CHECKED.discard(key)


def preflight(cfg: PipelineConfig) -> None:
    """Check what can be checked before any work: base model, corpus, layer range, bucket, workdir.

    Cheap by design: config files, safetensors headers and the tokenizer are read, the corpus is
    streamed until one block of each split is certain; no weights load.

    Raises:
        LoramError: naming the missing or broken file or the bad value, and the fix.
    """
    from loram_core.sources import heldout_rule
    from loram_core.steps import base_path, compute_device
    from loram_core.verify.checks import check_verify

    if fingerprint(cfg.model_dump(mode="json")) in _CHECKED:
        return
    path = base_path(cfg)
    tokenizer = None
    if path is not None:
        num_layers = check_base(path).num_hidden_layers
        tokenizer = check_tokenizer(path)
    else:
        num_layers = cfg.base.demo.num_hidden_layers
        check_writable(cfg.base.cache_dir, "base.cache_dir")
    cfg.prune.layer_range(num_layers)
    compute_device(cfg)  # `device=cuda` on a machine without one is refused here, not at the first step
    if cfg.corpus.paths != "demo" and cfg.reads_corpus():  # a corpus no step reads is not checked
        fraction, unit = heldout_rule(cfg)
        corpus = cfg.corpus.model_copy(update={"heldout_fraction": fraction})
        check_corpus(corpus, cfg.base.cache_dir, tokenizer, heldout_unit=unit)
    for key, section in (("calibration.source", cfg.calibration), ("eval.source", cfg.eval)):
        if section.source != "corpus":
            check_text_files(section.source, section.format, section.text_field, cfg.base.cache_dir, key)
    if cfg.publish.enabled:
        check_bucket(cfg.publish.uri)
        check_publish_target(cfg)
    check_writable(cfg.workdir, "workdir")
    check_verify(cfg)  # verify.rank, verify.recover_mode and align.enabled, before any compute
