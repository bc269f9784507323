"""Layer-wise, sequential sparse pruning that streams the checkpoint one decoder layer at a time.

Only the embeddings, final norm and head stay resident; decoder layer `i` is read from the
memory-mapped safetensors, calibrated on the outputs of the already pruned layers `< i`, pruned,
written to its own output shard and dropped. Peak memory is about one layer, its Hessians and the
calibration activations, not the whole model.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from loram_core.config import PruneConfig
from loram_core.models import build_model, decoder_layers, family_of, layer_linears, load_config
from loram_core.prune.masks import Masks
from loram_core.prune.sparse import magnitude, sparsegpt, wanda


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

    def read(self, prefix: str, exclude: bool = False) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with `prefix` (or, with `exclude`, all others), prefix removed.

        Only the selected tensors are read from disk: the rest of the file stays unmapped.
        """
        out = {}
        for name, path in self.files.items():
            if name.startswith(prefix) != exclude:
                with safe_open(str(path), framework="pt") as f:
                    out[name if exclude else name[len(prefix) :]] = f.get_tensor(name)
        return out


class ShardWriter:
    """Writes a checkpoint shard by shard, then the standard `model.safetensors.index.json`."""

    def __init__(self, out_dir: Path, n_shards: int) -> None:
        self.out_dir, self.n_shards = out_dir, n_shards
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"
        save_file(
            {n: t.contiguous() for n, t in tensors.items()},
            str(self.out_dir / name),
            metadata={"format": "pt"},
        )
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


@contextlib.contextmanager
def heap_returns_memory():
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

    The rotary frequencies (buffers no checkpoint stores) are built for real. `load_rest` and
    `drop_rest` bring the embeddings, final norm and head in and out; `load_layer(i)` reads one
    decoder layer from the memory-mapped safetensors and `drop_layer(i)` returns it to meta.
    Tensors are cast to `dtype` when it is given.
    """

    def __init__(self, base_dir: Path, dtype: torch.dtype | None = None) -> None:
        self.config = load_config(base_dir)
        self.family = family_of(self.config)
        self.reader = CheckpointReader(base_dir)
        self.dtype = dtype
        self.model = build_model(self.config, "meta")
        rotary = self.model.model.rotary_emb
        with torch.device("cpu"):
            self.model.model.rotary_emb = type(rotary)(config=self.config)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.layers = decoder_layers(self.model)

    def _read(self, prefix: str, exclude: bool = False) -> dict[str, torch.Tensor]:
        tensors = self.reader.read(prefix, exclude)
        return tensors if self.dtype is None else {k: v.to(self.dtype) for k, v in tensors.items()}

    def rest(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder layers, by checkpoint name."""
        return self._read(self.family.layers + ".", exclude=True)

    def load_rest(self) -> None:
        self.model.load_state_dict(self.rest(), strict=False, assign=True)
        if self.tied:
            self.model.tie_weights()

    def drop_rest(self) -> None:
        # The rotary buffers go too: layers get their position embeddings from captured kwargs.
        self.model.to("meta")

    def load_layer(self, i: int) -> nn.Module:
        layer = self.layers[i]
        layer.load_state_dict(self._read(f"{self.family.layers}.{i}."), strict=True, assign=True)
        return layer

    def drop_layer(self, i: int) -> None:
        self.layers[i].to("meta")  # its weights (and gradients) are freed


def stream_layers(
    base_dir: Path,
    out_dir: Path,
    process_layer: Callable[[int, nn.Module], None],
    prepare: Callable[[nn.Module], None] | None = None,
    progress=None,
    dtype: torch.dtype | None = None,
) -> PretrainedConfig:
    """Rewrite a checkpoint one decoder layer at a time.

    `prepare(model)` may first run the embeddings, final norm and head (e.g. to capture the
    calibration inputs); then each layer is read from the memory-mapped safetensors,
    passed to `process_layer(i, layer)` (which may prune or resize it in place), written to its
    own shard and dropped; `dtype`, when given, is the checkpoint's new dtype. Returns the base
    config (the caller records what it did in it).
    """
    stream = StreamedModel(base_dir, dtype)
    if prepare is not None:
        # Only `prepare` uses the embeddings, norm and head: they are not resident while streaming.
        stream.load_rest()
        prepare(stream.model)
        stream.drop_rest()
    n_layers = stream.config.num_hidden_layers
    writer = ShardWriter(out_dir, n_layers + 1)
    with heap_returns_memory() as trim:
        for i in range(n_layers):
            layer = stream.load_layer(i)
            process_layer(i, layer)
            prefix = f"{stream.family.layers}.{i}."
            writer.write(i, {prefix + k: v for k, v in layer.state_dict().items()})
            stream.drop_layer(i)  # only one layer is resident at a time
            trim()
            if progress is not None:
                progress("prune", i + 1, n_layers)
    rest = stream.rest()
    writer.write(n_layers, {k: v for k, v in rest.items() if not (stream.tied and k == "lm_head.weight")})
    writer.finish()
    if dtype is not None:
        stream.config.dtype = dtype
    return stream.config


# Calibration samples per forward pass through a layer: the MLP's intermediate activations of a
# batch are among the largest transients of a streamed prune, and smaller batches cost little time.
CALIB_BATCH = 4


def layer_output(out) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


class _Captured(Exception):
    pass


def capture_layer_inputs(
    model: nn.Module, calib: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments (mask, rotary embeddings) entering decoder layer 0."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calib.shape[0], batch_size):
            with contextlib.suppress(_Captured):
                model.model(input_ids=calib[start : start + batch_size].long(), use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]], replace: bool = False) -> None:
    """Run `layer` on every calibration batch; with `replace`, each batch's output takes its input's place."""
    for j, (hidden, kwargs) in enumerate(inputs):
        out = layer(hidden, **kwargs)
        if replace:
            inputs[j] = (layer_output(out), kwargs)


def _hessians(
    layer: nn.Module, linears: dict[str, nn.Linear], inputs, shared: tuple[tuple[str, ...], ...] = ()
) -> dict[str, torch.Tensor]:
    """`2/N X^T X` of each linear's inputs over all calibration tokens (float32).

    Linears listed together in `shared` read the same input (q/k/v, gate/up): their Hessian is
    computed once and the same tensor is returned for each (the solvers do not modify it).
    """
    first_of = {name: group[0] for group in shared for name in group if group[0] in linears}
    hooked = {name: lin for name, lin in linears.items() if first_of.get(name, name) == name}
    sums = {name: torch.zeros(lin.in_features, lin.in_features) for name, lin in hooked.items()}
    counts = dict.fromkeys(hooked, 0)

    def make_hook(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name].addmm_(x.T, x)
            counts[name] += x.shape[0]

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in hooked.items()]
    try:
        _run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    for name in hooked:
        sums[name].mul_(2 / max(1, counts[name]))
    return {name: sums[first_of.get(name, name)] for name in linears}


def _solve(
    weight: torch.Tensor, hessian: torch.Tensor, cfg: PruneConfig, owned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    n_m = tuple(cfg.n_m) if cfg.strategy == "semi" else None
    if cfg.sparse_method == "sparsegpt":
        return sparsegpt(
            weight,
            hessian,
            cfg.ratio,
            n_m,
            damp=cfg.damp,
            blocksize=cfg.blocksize,
            overwrite_hessian=owned,
            overwrite_weight=True,
        )
    if cfg.sparse_method == "wanda":
        return wanda(weight, hessian, cfg.ratio, n_m)
    return magnitude(weight, cfg.ratio, n_m)


@torch.no_grad()
def prune_sparse(
    base_dir: Path, out_dir: Path, cfg: PruneConfig, calib: torch.Tensor, progress=None
) -> Masks:
    """`semi` (n:m) and `unstructured` strategies, streamed layer by layer.

    Each layer is calibrated on the outputs of the already pruned layers before it. The result has
    one safetensors shard per decoder layer plus one for the rest and the standard index, so stock
    `from_pretrained` loads it.
    """
    family = family_of(load_config(base_dir))
    masks = Masks(strategy=cfg.strategy)
    state: dict = {}

    def capture(model: nn.Module) -> None:
        state["inputs"] = capture_layer_inputs(model, calib[: cfg.calib_samples], CALIB_BATCH)
        state["range"] = cfg.layer_range(model.config.num_hidden_layers)

    def process(i: int, layer: nn.Module) -> None:
        start, stop = state["range"]
        inputs = state["inputs"]
        if start <= i < stop:
            linears = {getattr(family, n): m for n, m in layer_linears(layer, family).items()}
            shared = tuple(tuple(getattr(family, n) for n in group) for group in family.shared_inputs)
            hessians = _hessians(layer, linears, inputs, shared)
            for path, lin in linears.items():
                hessian = hessians.pop(path)
                owned = all(h is not hessian for h in hessians.values())  # no other linear still needs it
                new_w, keep = _solve(lin.weight.data, hessian, cfg, owned)
                del hessian
                lin.weight.data.copy_(new_w)
                masks.add_sparse(f"{family.layers}.{i}.{path}.weight", keep)
        # The next layer is calibrated on what this (pruned) layer now outputs.
        _run_layer(layer, inputs, replace=True)

    config = stream_layers(
        base_dir, out_dir, process, prepare=capture, progress=progress, dtype=getattr(torch, cfg.dtype)
    )
    start, stop = state["range"]
    config.loram = {
        "strategy": cfg.strategy,
        "ratio": cfg.ratio if cfg.strategy == "unstructured" else cfg.n_m[0] / cfg.n_m[1],
        "method": cfg.sparse_method,
        "n_m": list(cfg.n_m) if cfg.strategy == "semi" else None,
        "pruned_layers": list(range(start, stop)),
    }
    config.save_pretrained(out_dir)
    return masks
