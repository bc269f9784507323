"""Layer-wise, sequential sparse pruning (SparseGPT, Wanda, magnitude), streamed one decoder layer at a time.

Decoder layer `i` is read from the memory-mapped safetensors onto the compute device, calibrated
on the outputs of the already pruned layers `< i`, pruned, written to its own output shard and
dropped (`loram_core.prune.streaming`). Hessians accumulate in float32 on the device, one per
distinct input (q/k/v share one, gate/up another). Peak memory is about one layer, its Hessians
and the calibration activations, not the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loram_core.config import PruneConfig
from loram_core.device import default_dtype
from loram_core.models import family_of, layer_linears, load_config
from loram_core.prune.masks import Masks
from loram_core.prune.sparse import magnitude, sparsegpt, wanda
from loram_core.prune.streaming import CALIB_BATCH, Activations, capture_layer_inputs, stream_layers


def _hessians(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: Activations,
    shared: tuple[tuple[str, ...], ...] = (),
) -> dict[str, torch.Tensor]:
    """`2/N X^T X` of each linear's inputs over all calibration tokens (float32, on the layer's device).

    Linears listed together in `shared` read the same input (q/k/v, gate/up): their Hessian is
    computed once and the same tensor is returned for each (the solvers do not modify it).
    """
    first_of = {name: group[0] for group in shared for name in group if group[0] in linears}
    hooked = {name: lin for name, lin in linears.items() if first_of.get(name, name) == name}
    sums = {
        name: torch.zeros(lin.in_features, lin.in_features, device=lin.weight.device)
        for name, lin in hooked.items()
    }
    counts = dict.fromkeys(hooked, 0)

    def make_hook(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name].addmm_(x.T, x)
            counts[name] += x.shape[0]

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in hooked.items()]
    try:
        inputs.run(layer)
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
    base_dir: Path,
    out_dir: Path,
    cfg: PruneConfig,
    calib: torch.Tensor,
    progress=None,
    device: torch.device | str = "cpu",
) -> Masks:
    """`semi` (n:m) and `unstructured` strategies, streamed layer by layer through `device`.

    Each layer is calibrated on the outputs of the already pruned layers before it. The result has
    one safetensors shard per decoder layer plus one for the rest and the standard index, so stock
    `from_pretrained` loads it.
    """
    device = torch.device(device)
    family = family_of(load_config(base_dir))
    masks = Masks(strategy=cfg.strategy)
    state: dict = {}

    def capture(model: nn.Module) -> None:
        batches = capture_layer_inputs(model, calib[: cfg.calib_samples], CALIB_BATCH)
        state["inputs"] = Activations(batches, device)
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
        inputs.run(layer, replace=True)

    dtype = default_dtype(device, cfg.dtype)
    config = stream_layers(
        base_dir, out_dir, process, prepare=capture, progress=progress, dtype=dtype, device=device
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
