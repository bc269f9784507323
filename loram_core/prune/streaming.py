"""Layer streaming: read a checkpoint one decoder layer at a time, compute on one device, write shards.

Every streamed strategy (SparseGPT, Wanda, magnitude, Taylor scoring, the structured cut) runs on
this machinery. The checkpoint stays memory-mapped on the host; one decoder layer at a time is
read, moved to the compute device (the next one is read into pinned memory by a background thread
while the current one computes, and copied without blocking), processed, moved back and written to
its own shard. The GPU holds about one layer plus the calibration activations, whatever the size
of the model; the activations move to pinned host memory when they would not fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from loram_core.device import free_memory
from loram_core.models import build_model, decoder_layers, family_of, load_config

# Calibration samples per forward pass through a layer: the MLP's intermediate activations of a
# batch are among the largest transients of a streamed prune, and smaller batches cost little time.
CALIB_BATCH = 4

# Activations stay on the GPU while they take at most this share of its free memory (the layer,
# its Hessians and the solver's buffers need the rest).
ACTIVATIONS_SHARE = 0.4


class CheckpointReader:
    """Reads tensors by name from a (possibly sharded) safetensors checkpoint, memory-mapped."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / f for name, f in weight_map.items()}
        else:
            path = directory / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                self.files = {name: path for name in f.keys()}  # noqa: SIM118

    def read(self, prefix: str, exclude: bool = False, pin: bool = False) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with `prefix` (or, with `exclude`, all others), prefix removed.

        Only the selected tensors are read from disk: the rest of the file stays unmapped. With
        `pin`, each is copied into page-locked memory, so a copy to the GPU can run asynchronously.
        """
        out = {}
        for name, path in self.files.items():
            if name.startswith(prefix) != exclude:
                with safe_open(str(path), framework="pt") as f:
                    tensor = f.get_tensor(name)
                out[name if exclude else name[len(prefix) :]] = tensor.pin_memory() if pin else tensor
        return out


class ShardWriter:
    """Writes a checkpoint shard by shard, then the standard `model.safetensors.index.json`."""

    def __init__(self, out_dir: Path, n_shards: int) -> None:
        self.out_dir, self.n_shards = out_dir, n_shards
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard `k` (0-based) holding `tensors` (on any device; written from host memory)."""
        name = f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"
        save_file(
            {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()},
            str(self.out_dir / name),
            metadata={"format": "pt"},
        )
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        """Write the index file that names every tensor's shard."""
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


@contextlib.contextmanager
def heap_returns_memory() -> Iterator[Callable[[], None]]:
    """While streaming, give freed memory back to the OS (glibc only; a no-op elsewhere).

    Each layer allocates and frees tens of MB (weights, Hessians, activations). glibc keeps
    such blocks in its heap and raises its mmap threshold as it goes, so the resident size creeps
    up layer after layer although the live tensors stay the same size (measured: +250 MiB over 16
    layers of a 396 MiB checkpoint). Serving blocks of 1 MiB and more from mmap returns them on
    free; `malloc_trim` after each layer returns the rest. Afterwards the threshold is set to
    glibc's own dynamic ceiling (32 MiB), where a long-running process ends up anyway.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield (lambda: libc.malloc_trim(0)) if libc is not None else (lambda: None)
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


class StreamedModel:
    """A model skeleton on the meta device whose weights are read from the checkpoint on demand.

    The rotary frequencies (buffers no checkpoint stores) are built for real on `device`.
    `load_rest` and `drop_rest` bring the embeddings, final norm and head in and out; `load_layer(i)`
    places one decoder layer on `device` and `drop_layer(i)` returns it to meta. `prefetch(i)` reads
    layer `i` into host memory in the background (pinned when the device is a GPU), so that its
    `load_layer` only waits for a copy. Tensors are cast to `dtype` when it is given.
    """

    def __init__(
        self, base_dir: Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> None:
        self.config = load_config(base_dir)
        self.family = family_of(self.config)
        self.reader = CheckpointReader(base_dir)
        self.dtype = dtype
        self.device = torch.device(device)
        self.model = build_model(self.config, "meta")
        rotary = self.model.model.rotary_emb
        with self.device:
            self.model.model.rotary_emb = type(rotary)(config=self.config)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.layers = decoder_layers(self.model)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loram-prefetch")
        self._pending: dict[int, Future] = {}

    def _place(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gpu = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=gpu).to(self.dtype or v.dtype) for k, v in tensors.items()}

    def _layer_prefix(self, i: int) -> str:
        return f"{self.family.layers}.{i}."

    def rest(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder layers, by checkpoint name, in host memory."""
        tensors = self.reader.read(self.family.layers + ".", exclude=True)
        return tensors if self.dtype is None else {k: v.to(self.dtype) for k, v in tensors.items()}

    def load_rest(self) -> None:
        """Place the embeddings, final norm and head on the device."""
        self.model.load_state_dict(
            self._place(self.reader.read(self.family.layers + ".", exclude=True)), strict=False, assign=True
        )
        if self.tied:
            self.model.tie_weights()

    def drop_rest(self) -> None:
        """Free everything outside the decoder layers (layers get position embeddings from captured kwargs)."""
        self.model.to("meta")

    def prefetch(self, i: int) -> None:
        """Start reading decoder layer `i` into host memory in the background (no-op if out of range)."""
        if 0 <= i < len(self.layers) and i not in self._pending:
            pin = self.device.type == "cuda"
            self._pending[i] = self._pool.submit(self.reader.read, self._layer_prefix(i), False, pin)

    def load_layer(self, i: int, prefetch_next: int | None = None) -> nn.Module:
        """Place decoder layer `i` on the device; then start prefetching layer `prefetch_next`."""
        future = self._pending.pop(i, None)
        tensors = future.result() if future is not None else self.reader.read(self._layer_prefix(i))
        if prefetch_next is not None:
            self.prefetch(prefetch_next)
        layer = self.layers[i]
        layer.load_state_dict(self._place(tensors), strict=True, assign=True)
        return layer

    def drop_layer(self, i: int) -> None:
        """Return decoder layer `i` to the meta device (its weights and gradients are freed)."""
        self.layers[i].to("meta")

    def close(self) -> None:
        """Stop the prefetch thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def stream_layers(
    base_dir: Path,
    out_dir: Path,
    process_layer: Callable[[int, nn.Module], None],
    prepare: Callable[[nn.Module], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> PretrainedConfig:
    """Rewrite a checkpoint one decoder layer at a time.

    `prepare(model)` may first run the embeddings, final norm and head (e.g. to capture the
    calibration inputs); then each layer is read from the memory-mapped safetensors, placed on
    `device`, passed to `process_layer(i, layer)` (which may prune or resize it in place), written
    to its own shard and dropped; `dtype`, when given, is the checkpoint's new dtype. Returns the
    base config (the caller records what it did in it).
    """
    stream = StreamedModel(base_dir, dtype, device)
    try:
        stream.prefetch(0)
        if prepare is not None:
            # Only `prepare` uses the embeddings, norm and head: they are not resident while streaming.
            stream.load_rest()
            prepare(stream.model)
            stream.drop_rest()
        n_layers = stream.config.num_hidden_layers
        writer = ShardWriter(out_dir, n_layers + 1)
        with heap_returns_memory() as trim:
            for i in range(n_layers):
                layer = stream.load_layer(i, prefetch_next=i + 1)
                process_layer(i, layer)
                prefix = stream._layer_prefix(i)
                writer.write(i, {prefix + k: v for k, v in layer.state_dict().items()})
                stream.drop_layer(i)  # only one layer is resident at a time
                trim()
                if progress is not None:
                    progress("prune", i + 1, n_layers)
        rest = stream.rest()
        writer.write(n_layers, {k: v for k, v in rest.items() if not (stream.tied and k == "lm_head.weight")})
        writer.finish()
    finally:
        stream.close()
    if dtype is not None:
        stream.config.dtype = dtype
    return stream.config


def layer_output(out: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


class Activations:
    """Calibration hidden states at one layer boundary, batch by batch, with each batch's layer kwargs.

    They live on the compute device when they fit in `ACTIVATIONS_SHARE` of its free memory, else
    in pinned host memory, moved to the device one batch at a time.
    """

    def __init__(self, batches: list[tuple[torch.Tensor, dict]], device: torch.device) -> None:
        self.device = device
        total = sum(h.numel() * h.element_size() for h, _ in batches)
        free = free_memory(device)
        self.offloaded = free is not None and total > ACTIVATIONS_SHARE * free
        self.hidden = [self._store(h) for h, _ in batches]
        self.kwargs = [kw for _, kw in batches]

    def _store(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.detach()
        if not self.offloaded:
            return hidden
        host = hidden.to("cpu")
        return host.pin_memory() if self.device.type == "cuda" else host

    def __len__(self) -> int:
        return len(self.hidden)

    def get(self, j: int) -> tuple[torch.Tensor, dict]:
        """Batch `j`'s hidden states on the compute device, and its layer kwargs."""
        return self.hidden[j].to(self.device, non_blocking=True), self.kwargs[j]

    def set(self, j: int, hidden: torch.Tensor) -> None:
        """Replace batch `j`'s hidden states (e.g. by what a layer made of them)."""
        self.hidden[j] = self._store(hidden)

    def run(self, layer: nn.Module, replace: bool = False) -> None:
        """Run `layer` on every batch; with `replace`, each batch's output takes its input's place."""
        for j in range(len(self)):
            hidden, kwargs = self.get(j)
            out = layer(hidden, **kwargs)
            if replace:
                self.set(j, layer_output(out))


class _Captured(Exception):
    pass


def capture_layer_inputs(
    model: nn.Module, calib: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments (mask, rotary embeddings) entering decoder layer 0.

    The token ids go to the device of the model's embeddings; what is captured stays there.
    """
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    device = model.get_input_embeddings().weight.device
    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calib.shape[0], batch_size):
            with contextlib.suppress(_Captured):
                ids = calib[start : start + batch_size].to(device=device, dtype=torch.long)
                model.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured
