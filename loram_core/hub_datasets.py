"""Datasets read through `datasets.load_dataset`: hub ids in text sources, and the sources of a mix.

`hf://datasets/ORG/NAME` (optionally `@REVISION`) in `corpus.paths`, `calibration.source` or
`eval.source` is that dataset's `train` split, written once as a parquet file into the cache
(`<base.cache_dir>/datasets/`), so every reader downstream (the preflight, the held-out split, the
fingerprint of the step keys) treats it as the parquet file it then is. Longer `hf://datasets/...`
paths name files inside a dataset repo and are fetched as files (fsspec). A `dataset:` source of
`corpus.mix` has every option (`config`, `split`, `text_field`, `streaming`, `revision`).

With `HF_HUB_OFFLINE=1` datasets reads its own cache (`HF_DATASETS_CACHE`, else
`~/.cache/huggingface/datasets`) and the hub is never asked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from loram_core.errors import ConfigError, LoramError

if TYPE_CHECKING:
    from loram_core.config import DatasetSource

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HF_DATASET = re.compile(
    rf"^hf://datasets/(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]*))?/?$"
)


def hub_dataset(pattern: str) -> DatasetSource | None:
    """The dataset `hf://datasets/ORG/NAME[@REV]` names (its train split), or None for anything else."""
    from loram_core.config import DatasetSource

    match = _HF_DATASET.match(pattern)
    if match is None:
        return None
    return DatasetSource(name=match["repo"], revision=match["rev"])


def _cache_dir() -> str | None:
    return os.environ.get("HF_DATASETS_CACHE") or None  # read per call: datasets reads it once at import


@contextmanager
def _offline_as_the_environment_says() -> Iterator[None]:
    """datasets and huggingface_hub read HF_HUB_OFFLINE once, when first imported; a process whose
    environment says offline later (a worker, a test) would still ask the hub, and wait out its
    retries before falling back to the cache. Within the block, offline is what the environment says
    now (it is only ever switched on)."""
    import datasets.config
    import huggingface_hub.constants

    from loram_core.hub import _offline

    if not _offline():
        yield
        return
    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = before


def load(spec: DatasetSource, key: str, streaming: bool | None = None):
    """`datasets.load_dataset` of `spec` (a `Dataset`, or an `IterableDataset` when streaming).

    Raises:
        LoramError: the dataset, config or split does not exist or cannot be reached (offline and
            not in the datasets cache), naming `key`, the dataset and the fix.
    """
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    where = f"{key}: dataset {spec.name!r}" + (f" (config {spec.config!r})" if spec.config else "")
    stream = spec.streaming if streaming is None else streaming
    try:
        with _offline_as_the_environment_says():
            return load_dataset(spec.name, spec.config, split=spec.split, revision=spec.revision,
                                streaming=stream, cache_dir=_cache_dir())  # fmt: skip
    except DatasetNotFoundError as err:
        raise LoramError(
            f"{where}: {str(err).splitlines()[0]} Check ORG/NAME against the dataset's page, set HF_TOKEN for "
            "a gated or private one, or name a local dataset folder."
        ) from None
    except ConnectionError:
        cache = _cache_dir() or "~/.cache/huggingface/datasets"
        raise LoramError(
            f"{where}: the hub cannot be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}) and the "
            f"datasets cache {cache} holds no copy of it. Load it once with network access "
            f"(`datasets.load_dataset({spec.name!r}{', ' + repr(spec.config) if spec.config else ''})`, same "
            "HF_DATASETS_CACHE), or name local files instead."
        ) from None
    except (ValueError, FileNotFoundError) as err:  # an unknown split or config, a folder without data
        raise LoramError(f"{where}: {str(err).splitlines()[0]}") from None


def texts(spec: DatasetSource, key: str) -> Iterator[str]:
    """The non-blank texts of `spec`'s `text_field`, record by record (streamed when `spec.streaming`).

    Raises:
        ConfigError: `text_field` is not a column, naming the columns there are.
    """
    ds = load(spec, key)
    for i, record in enumerate(ds):
        if i == 0 and spec.text_field not in record:
            raise ConfigError(
                f"{key}: text_field={spec.text_field!r} is not a column of dataset {spec.name!r}; its columns "
                f"are {sorted(record)}. Set text_field to the one holding the text."
            )
        text = record[spec.text_field]
        if text and text.strip():
            yield text


def dataset_file(spec: DatasetSource, cache_dir: str | Path, key: str) -> Path:
    """The split as one parquet file, `<cache_dir>/datasets/<name>-<fingerprint>.parquet` (written once).

    The name carries datasets' own fingerprint of the loaded split, so a new revision of the data
    is a new file (and new step keys downstream), the same one is read back.
    """
    ds = load(spec, key, streaming=False)
    out = (
        Path(cache_dir).expanduser()
        / "datasets"
        / f"{spec.name.replace('/', '--')}-{ds._fingerprint}.parquet"
    )
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        ds.to_parquet(str(tmp))
        tmp.rename(out)
    return out


def identity(spec: DatasetSource) -> dict:
    """What names a dataset's content in step keys: its settings and, unless streamed, datasets' fingerprint."""
    out = spec.model_dump(mode="json")
    if not spec.streaming:
        out["fingerprint"] = load(spec, "corpus.mix", streaming=False)._fingerprint
    return out
