"""A published variant in the Hugging Face layout: weights in shards, the original's tokenizer files.

`save_pretrained` conventions, applied to a checkpoint already on disk without loading a model:
safetensors shards of at most `publish.max_shard_size` (split by huggingface_hub's own rule, so
names and index are what `save_pretrained(max_shard_size=...)` writes: `model.safetensors` when one
shard holds it all, else `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`), and
the original's tokenizer files, chat template and `generation_config.json` byte for byte, in place
of what the steps re-serialized along the way.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from loram_core.errors import ConfigError

INDEX = "model.safetensors.index.json"
# Files a consumer's tokenizer and `generate` read; carried from the original unchanged.
ORIGINAL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
ORIGINAL_DIRS = ("additional_chat_templates",)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str, key: str = "publish.max_shard_size") -> int:
    """Bytes in `size`: an int, or `"5GB"` / `"500MB"` (decimal, as save_pretrained) / `"4GiB"` (binary).

    Raises:
        ConfigError: anything else, naming `key` and the accepted forms.
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SIZE.match(size) if isinstance(size, str) else None
    if match is None or float(match[1]) <= 0:
        raise ConfigError(
            f"{key}={size!r} is not a size; write bytes (an integer > 0) or a number with KB, MB, GB, TB "
            "(decimal, as save_pretrained's max_shard_size) or KiB, MiB, GiB, TiB, e.g. 5GB."
        )
    return int(float(match[1]) * _UNITS[match[2].upper()])


def weight_entries(model_dir: Path) -> dict[str, tuple[Path, dict]]:
    """Every tensor of a checkpoint: name -> (its file, its header entry), headers read only."""
    from loram_core.checks import safetensors_header

    index = model_dir / INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    entries: dict[str, tuple[Path, dict]] = {}
    for name in files:
        header = safetensors_header(model_dir / name)
        # In file order, as the writer laid them out: shards then follow the layers.
        for tensor, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            entries[tensor] = (model_dir / name, entry)
    return entries


def write_shards(src: Path, dst: Path, max_shard_size: int | str) -> list[str]:
    """Copy the weights of checkpoint `src` into `dst` as shards of at most `max_shard_size` bytes.

    One shard is in memory at a time (its tensors read from the memory-mapped source files); a
    tensor larger than the limit gets a shard of its own, as in save_pretrained. Tensors are
    written as they are (dtype, shape, name); the files' `format=pt` metadata is kept.

    Returns:
        The weight files written, in order.
    """
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors import safe_open
    from safetensors.torch import save_file

    entries = weight_entries(src)
    split = split_state_dict_into_shards_factory(
        {name: entry for name, (_, entry) in entries.items()},
        get_storage_size=lambda e: e["data_offsets"][1] - e["data_offsets"][0],
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=parse_size(max_shard_size),
    )
    dst.mkdir(parents=True, exist_ok=True)
    for filename, names in split.filename_to_tensors.items():
        tensors = {}
        for name in names:
            with safe_open(str(entries[name][0]), framework="pt") as f:
                tensors[name] = f.get_tensor(name)
        save_file(tensors, str(dst / filename), metadata={"format": "pt"})
        del tensors
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (dst / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


def copy_variant(src: Path, dst: Path, max_shard_size: int | str, skip: tuple[str, ...] = ()) -> None:
    """`dst` = checkpoint `src` with its weights re-sharded (`write_shards`) and its other files copied.

    Args:
        src: a step's checkpoint directory (config, weights, tokenizer).
        dst: the variant's folder in the version being staged (created).
        max_shard_size: the largest shard, bytes or `"5GB"`.
        skip: file names not to copy (e.g. a step's training log).
    """
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        weights = f.suffix == ".safetensors" or f.name == INDEX
        if f.is_file() and not weights and f.name not in skip:
            shutil.copy2(f, dst / f.name)
    write_shards(src, dst, max_shard_size)


def carry_original_files(base_dir: Path, variant: Path) -> list[str]:
    """Replace the variant's tokenizer files, chat template and generation config by the original's.

    The steps re-save the tokenizer (transformers may write other files than it read, e.g. a
    `tokenizer.json` for a slow-only original); a consumer should get exactly the original's. Of
    these files, the variant keeps only those the original has; `generation_config.json` is the
    exception, kept as written when the original has none.

    Returns:
        The names carried from the original.
    """
    originals = [n for n in ORIGINAL_FILES if (base_dir / n).is_file()]
    if not originals:  # an original without tokenizer files (the tests' bare checkpoints): leave as is
        return []
    for name in ORIGINAL_FILES:
        if name != "generation_config.json" or name in originals:
            (variant / name).unlink(missing_ok=True)
    for name in originals:
        shutil.copyfile(base_dir / name, variant / name)  # follows hub-cache links: a plain file
    for folder in ORIGINAL_DIRS:
        shutil.rmtree(variant / folder, ignore_errors=True)
        if (base_dir / folder).is_dir():
            shutil.copytree(base_dir / folder, variant / folder)
            originals.append(folder)
    return originals
