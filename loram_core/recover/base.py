"""The pruned base an adapter was trained on: its config, its masks and the original it came from.

A base is a published version (`model/config.json`, `masks/masks.safetensors`, `manifest.json`),
locally or behind a bucket URI (`file://`, `s3://`; `<bucket>/<name>` means its LATEST), or a
pruned checkpoint directory holding `masks/` (the pipeline's prune and align outputs). Only the
config, the masks and the manifest are read, never the weights.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from loram_core.config import SPARSE
from loram_core.errors import LoramError
from loram_core.models import load_config
from loram_core.prune.masks import Masks, load_masks

MASKS = "masks/masks.safetensors"


@dataclass
class PrunedBase:
    """What recovery needs to know about a pruned base."""

    config: PretrainedConfig  # the pruned model's config, with its `loram` section
    masks: Masks
    source: str | None  # the original model's source as the manifest records it, if published
    where: str  # for messages

    @property
    def structured(self) -> bool:
        """Whether the base was pruned by a structured strategy (widths changed) rather than a sparse one."""
        return self.masks.strategy not in SPARSE


def read_base(base: str | Path) -> PrunedBase:
    """Read the config, masks and (if any) manifest of a pruned base; no weights are touched.

    Raises:
        LoramError: the directory or URI holds no pruned model or no masks.
    """
    text = str(base)
    if "://" in text:
        return _read_uri(text)
    root = Path(base)
    if (root / "model" / "config.json").is_file():  # a published version, downloaded
        model_dir, masks_file, manifest = root / "model", root / MASKS, root / "manifest.json"
    elif (root / "config.json").is_file():  # a pruned checkpoint
        model_dir, masks_file, manifest = root, root / MASKS, root / "manifest.json"
    else:
        raise LoramError(
            f"no pruned base at {text!r}: neither model/config.json (a published version) nor config.json "
            "(a pruned checkpoint) is there. Pass --base the version directory (or its URI) the adapter was "
            "trained on."
        )
    if not masks_file.is_file():
        raise LoramError(
            f"the base at {text!r} has no {MASKS}: recovery needs the masks published with the base. Pass "
            "the published version (or the prune/align step's output directory), which holds masks/."
        )
    source = json.loads(manifest.read_text())["base"].get("source") if manifest.is_file() else None
    return _base(load_config(model_dir), load_masks(masks_file), source, text)


def _read_uri(uri: str) -> PrunedBase:
    from loram_core.bucket import bucket_fs, resolve_version

    # A version may be given by a local copy under a name of its own (a pulled folder); only
    # model/config.json and the masks are read from it, by fixed names.
    version_uri, manifest = resolve_version(uri, check_uri=False)
    fs, root = bucket_fs(version_uri)
    with tempfile.TemporaryDirectory(prefix="loram-recover-") as tmp:
        for name in ("model/config.json", MASKS):
            remote = f"{root.rstrip('/')}/{name}"
            if not fs.exists(remote):
                raise LoramError(f"{version_uri} has no {name}; it is not a complete LoRAM version.")
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(Path(tmp) / name))
        config = load_config(Path(tmp) / "model")
        masks = load_masks(Path(tmp) / MASKS)
    return _base(config, masks, manifest.base.get("source"), version_uri)


def _base(config: PretrainedConfig, masks: Masks, source: str | None, where: str) -> PrunedBase:
    if not getattr(config, "loram", None):
        raise LoramError(
            f"the model at {where!r} has no `loram` section in config.json, so it is not a LoRAM base; "
            "an adapter trained on an unpruned model needs no recovery."
        )
    return PrunedBase(config, masks, source, where)


def original_config(base: PrunedBase, original: str | Path | None) -> PretrainedConfig:
    """The original model's config: read from `original` if it is a directory, else derived.

    The pruned config keeps the original's standard fields (hidden, intermediate, heads); only its
    `loram` section holds the pruned per-layer widths, so dropping it gives the original's shapes.

    Raises:
        LoramError: `original` is not the model the base was pruned from.
    """
    derived = copy.deepcopy(base.config)
    del derived.loram
    if original is None or not (Path(original) / "config.json").is_file():
        return derived
    config = AutoConfig.from_pretrained(original)
    fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")  # fmt: skip
    diff = [f"{f}: {getattr(config, f, None)} vs {getattr(derived, f, None)}" for f in fields
            if getattr(config, f, None) != getattr(derived, f, None)]  # fmt: skip
    if diff:
        raise LoramError(
            f"{str(original)!r} is not the model the base at {base.where!r} was pruned from ({'; '.join(diff)}; "
            "original vs base). Pass --original the checkpoint named in the base's manifest."
        )
    return config


def original_name(base: PrunedBase, original: str | Path | None) -> str:
    """What the recovered adapter's `base_model_name_or_path` says: `original`, else the manifest's source."""
    if original is not None:
        return str(original)
    if base.source:
        return base.source
    raise LoramError(
        f"the base at {base.where!r} has no manifest naming its original model, so the recovered adapter could "
        "not say which model it is for. Pass --original (the original checkpoint directory or its hub id)."
    )
