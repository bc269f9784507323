"""Hugging Face caches built locally: the hub cache of a model repo, the datasets cache of a dataset.

`add_to_hub_cache` writes the `models--ORG--NAME/{blobs,refs,snapshots,trees}` layout.

What `huggingface_hub.snapshot_download` leaves behind, written without a network: each file's
content once in `blobs/` (named by its sha256 for LFS files, its git blob sha1 for the others, as
the hub's ETags are), `snapshots/<commit>/<path>` a relative symlink to it, `refs/<revision>`
holding the commit, and `trees/<commit>.json` (the tree listing huggingface_hub >= 2 caches, written
with its own writer). huggingface_hub's `scan_cache_dir` and `snapshot_download(local_files_only=True)`
read it as their own; the tests check that they do.

`add_to_datasets_cache` writes what `datasets.load_dataset("ORG/NAME")` leaves in
`HF_DATASETS_CACHE` for a parquet dataset repo (`ORG___NAME/default/0.0.0/<commit>/` with
`dataset_info.json` and `NAME-train.arrow`), built by datasets' own parquet builder; offline
`load_dataset("ORG/NAME")` then reads it back, as it would after an online load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LFS_SUFFIXES = (".safetensors", ".bin", ".model")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
WORDS = (
    "model layer prune align token weight matrix head channel gradient loss data text block shard cache hub"
)


def paragraphs(n: int, seed: int) -> list[str]:
    """`n` seeded paragraphs of 20-60 words from a small vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS.split()) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


def write_original(path: Path) -> Path:
    """A tiny Llama-3.x-like checkpoint as a hub repo holds it: tied head, llama3 rope scaling,
    a chat template, a generation config, a card with a license; config.json as written upstream."""
    from loram_core.demo import train_tokenizer

    path.mkdir(parents=True)
    tokenizer = train_tokenizer(paragraphs(200, 1), 384)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    # Upstream Llama-3.x configs name it rope_scaling (+ rope_theta); transformers 5 reads that form.
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "do_sample": True, "temperature": 0.6, "top_p": 0.9}  # fmt: skip
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (path / "README.md").write_text("---\nlicense: llama3.1\nlanguage: [en]\n---\n\n# tiny\n")
    (path / "pytorch_model.bin").write_bytes(b"pickled weights are never fetched")  # excluded
    return path


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's object id


def add_to_hub_cache(cache: Path, repo_id: str, src: Path, revision: str = "main") -> str:
    """Put every file under `src` into `cache` as commit `<hash>` of `repo_id`, named by `revision`.

    Returns:
        The commit hash (40 hex digits).
    """
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    entries: dict[str, TreeCacheEntry] = {}
    etags: dict[str, str] = {}
    for f in files:
        data = f.read_bytes()
        rel = f.relative_to(src).as_posix()
        blob_id = _git_blob_sha1(data)
        if f.suffix in LFS_SUFFIXES:
            sha = hashlib.sha256(data).hexdigest()
            entries[rel] = TreeCacheEntry(size=len(data), blob_id=blob_id, lfs_sha256=sha, lfs_size=len(data))
            etags[rel] = sha
        else:
            entries[rel] = TreeCacheEntry(size=len(data), blob_id=blob_id)
            etags[rel] = blob_id
        blob = storage / "blobs" / etags[rel]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
    commit = hashlib.sha1("".join(f"{k}:{v}" for k, v in sorted(etags.items())).encode()).hexdigest()  # noqa: S324
    snap = storage / "snapshots" / commit
    for rel, etag in etags.items():
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(storage / "blobs" / etag, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    write_tree_cache(str(storage), commit, entries)
    return commit


def add_to_datasets_cache(
    cache: Path, repo_id: str, parquet_files: list[Path], commit: str | None = None
) -> Path:
    """Put a parquet dataset into a datasets cache as `load_dataset(repo_id)` would have; returns its folder."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()  # noqa: S324 - a commit-like id
    builder = Parquet(cache_dir=str(cache), dataset_name=repo_id.split("/")[1], config_name="default",
                      config_id="default", hash=commit, data_files={"train": [str(p) for p in parquet_files]})  # fmt: skip
    # A hub load names the folder ORG___NAME from its repo id (datasets refuses local data files for a
    # repo id at construction, so the id is set after it, as the hub factory's build would have it).
    builder.repo_id = repo_id
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    return Path(builder.cache_dir)
