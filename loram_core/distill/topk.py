"""The teacher's top-k cache: its k most likely next tokens at every position of every training block.

Computed once, batch by batch with the teacher resident on the device (the teacher is then freed
before the student trains), and written as one safetensors file while it is computed (the header
first, then each batch's rows into a memory map), so neither the teacher's logits nor the cache
itself are ever whole in memory. Training reads the rows of each batch from the memory-mapped file.

    logprobs  float32 [n_blocks, seq_len - 1, k]   log p of the teacher's top-k tokens at temperature T
    indices   int32   [n_blocks, seq_len - 1, k]   their token ids
    log_tail  float32 [n_blocks, seq_len - 1]      log of the teacher's mass outside them

metadata: `format=loram-kd-topk`, `version=1`, `k`, `temperature`, `blocks` (sha256 of the
training blocks it was computed on). Position `t` of block `b` is the teacher's distribution of
token `t + 1` given tokens `0..t` (the last position predicts nothing inside the block).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loram_core.distill.kl import teacher_topk
from loram_core.errors import LoramError

FORMAT = "loram-kd-topk"
log = logging.getLogger(__name__)


def blocks_digest(blocks: torch.Tensor) -> str:
    """sha256 of int32 token blocks (their shape and bytes): what a cache was computed on."""
    data = blocks.to(torch.int32).contiguous().numpy()
    return hashlib.sha256(json.dumps(list(data.shape)).encode() + data.tobytes()).hexdigest()


def cache_bytes(n_blocks: int, seq_len: int, k: int) -> int:
    """Bytes of a cache of `n_blocks` blocks of `seq_len` tokens at `k` (4 + 4 per kept token, 4 per tail)."""
    return n_blocks * (seq_len - 1) * (8 * k + 4)


def build_topk_cache(
    teacher: nn.Module,
    blocks: torch.Tensor,
    k: int,
    temperature: float,
    out_file: str | Path,
    *,
    batch_size: int,
    chunk_tokens: int | None,
    device: torch.device,
) -> None:
    """Run the teacher over every block and write its top-k cache to `out_file` (module doc).

    Args:
        teacher: the frozen original, on `device`.
        blocks: int32 `[n_blocks, seq_len]` training blocks, in the order training indexes them.
        k: tokens kept per position.
        temperature: `T` of the stored log-probabilities.
        out_file: the safetensors file to write (complete once this returns; callers rename a
            temporary directory into place, so a kill leaves no cache that looks whole).
        batch_size: blocks per teacher forward.
        chunk_tokens: positions per head/top-k chunk (the vocabulary logits of a whole batch never
            exist at once); None: the whole batch.
        device: where the teacher computes.
    """
    n, seq = blocks.shape
    shapes = {"logprobs": ("F32", [n, seq - 1, k]), "indices": ("I32", [n, seq - 1, k]),
              "log_tail": ("F32", [n, seq - 1])}  # fmt: skip
    metadata = {"format": FORMAT, "version": "1", "k": str(k), "temperature": repr(float(temperature)),
                "blocks": blocks_digest(blocks)}  # fmt: skip
    views = _create(Path(out_file), shapes, metadata)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            ids = blocks[start : start + batch_size].to(device=device, dtype=torch.long)
            stop = start + ids.shape[0]
            logp, idx, tail = _teacher_rows(teacher, ids, k, temperature, chunk_tokens)
            views["logprobs"][start:stop] = logp.cpu().numpy()
            views["indices"][start:stop] = idx.to(torch.int32).cpu().numpy()
            views["log_tail"][start:stop] = tail.cpu().numpy()
            if (start // batch_size) % 50 == 0:
                log.info("teacher top-%d cache: %d/%d blocks", k, stop, n)
    for view in views.values():
        view.flush()
    del views
    with open(out_file, "rb") as f:
        os.fsync(f.fileno())


def _teacher_rows(
    teacher: nn.Module, ids: torch.Tensor, k: int, temperature: float, chunk_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k rows of a batch `[b, seq]`: `[b, seq-1, k]` x2 and `[b, seq-1]`, head in chunks."""
    b, seq = ids.shape
    hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    step = chunk_tokens or flat.shape[0]
    parts = [teacher_topk(teacher.lm_head(flat[c : c + step]).float(), k, temperature)
             for c in range(0, flat.shape[0], step)]  # fmt: skip
    logp, idx, tail = (torch.cat([p[i] for p in parts]) for i in range(3))
    return logp.reshape(b, seq - 1, k), idx.reshape(b, seq - 1, k), tail.reshape(b, seq - 1)


_NP = {"F32": np.float32, "I32": np.int32}


def _create(path: Path, shapes: dict[str, tuple[str, list[int]]], metadata: dict[str, str]) -> dict:
    """Write a safetensors header for `shapes`, size the file, and map each tensor's data for writing."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in shapes.items():
        size = int(np.prod(shape)) * np.dtype(_NP[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(blob)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(start + offset)
    return {
        name: np.memmap(
            path,
            dtype=_NP[dtype],
            mode="r+",
            offset=start + header[name]["data_offsets"][0],
            shape=tuple(shape),
        )  # fmt: skip
        for name, (dtype, shape) in shapes.items()
    }


class TopkCache:
    """A written top-k cache, read batch by batch from its memory-mapped file.

    Args:
        path: the cache file (`build_topk_cache`).
        blocks: the training blocks it must have been computed on (checked by digest), or None.
    """

    def __init__(self, path: str | Path, blocks: torch.Tensor | None = None) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(path), framework="pt")
        meta = self._file.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("version") != "1":
            raise LoramError(
                f"{path} is not a teacher top-k cache (format {meta.get('format')!r}); delete it."
            )
        self.k = int(meta["k"])
        self.temperature = float(meta["temperature"])
        self._slices = {name: self._file.get_slice(name) for name in ("logprobs", "indices", "log_tail")}
        self.shape = tuple(self._slices["logprobs"].get_shape())
        if blocks is not None and meta["blocks"] != blocks_digest(blocks):
            raise LoramError(
                f"the teacher top-k cache {path} was computed on other training blocks than these; "
                "delete it and run again (it is rebuilt)."
            )

    @property
    def nbytes(self) -> int:
        """The cache's size on disk."""
        return self.path.stat().st_size

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cache rows of the blocks at `positions` (int `[b]`): `[b, seq-1, k]` x2 and `[b, seq-1]`.

        Returns:
            `(log_p float32, indices int64, log_tail float32)` on the CPU.
        """
        parts = {name: [s[int(i) : int(i) + 1] for i in positions] for name, s in self._slices.items()}
        logp, idx, tail = (torch.cat(parts[name]) for name in ("logprobs", "indices", "log_tail"))
        return logp, idx.long(), tail
