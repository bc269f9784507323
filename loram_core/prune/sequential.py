"""Layer-wise, sequential sparse pruning (SparseGPT, Wanda, magnitude), streamed one decoder layer at a time.

Decoder layer `i` is read from the memory-mapped safetensors onto the compute device, calibrated
on the outputs of the already pruned layers `< i`, pruned, written to its own output shard and
dropped (`loram_core.prune.streaming`). Hessians accumulate in float32 on the device, one per
distinct input (q/k/v share one, gate/up another). Peak memory is about one layer, its Hessians
and the calibration activations, not the whole model. Within a layer every linear calibrates on
the dense layer's inputs, or, with `prune.true_sequential`, on inputs recomputed through the
linears pruned before it (SparseGPT's order). `unstructured` prunes each layer at `prune.ratio`,
or at the layer's own OWL ratio (`prune.layerwise=owl`, `loram_core.prune.owl`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loram_core.config import PruneConfig
from loram_core.device import default_dtype
from loram_core.models import LINEAR_NAMES, Family, family_of, layer_linears, load_config
from loram_core.prune.masks import Masks
from loram_core.prune.owl import dense_outlier_ratios, owl_layer_ratios
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


# SparseGPT's `--true-sequential` order: each group is calibrated after the groups before it are pruned.
TRUE_SEQUENTIAL: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def _solve(
    weight: torch.Tensor, hessian: torch.Tensor, cfg: PruneConfig, ratio: float, owned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    n_m = tuple(cfg.n_m) if cfg.strategy == "semi" else None
    if cfg.sparse_method == "sparsegpt":
        return sparsegpt(
            weight,
            hessian,
            ratio,
            n_m,
            damp=cfg.damp,
            blocksize=cfg.blocksize,
            overwrite_hessian=owned,
            overwrite_weight=True,
        )
    if cfg.sparse_method == "wanda":
        return wanda(weight, hessian, ratio, n_m)
    return magnitude(weight, ratio, n_m)


def prune_layer(
    layer: nn.Module, family: Family, inputs: Activations, cfg: PruneConfig, ratio: float
) -> dict[str, torch.Tensor]:
    """Prune one decoder layer's linears in place, calibrated on `inputs`; returns keep-masks by module path.

    By default every linear is calibrated on the layer's dense forward pass (one pass); with
    `cfg.true_sequential` the groups of `TRUE_SEQUENTIAL` are pruned in turn, each calibrated by
    a pass through the layer whose earlier groups are already pruned (four passes).
    """
    groups = TRUE_SEQUENTIAL if cfg.true_sequential else (LINEAR_NAMES,)
    keep: dict[str, torch.Tensor] = {}
    for names in groups:
        by_name = layer_linears(layer, family)
        linears = {getattr(family, n): by_name[n] for n in names}
        shared = tuple(
            tuple(getattr(family, n) for n in group if n in names) for group in family.shared_inputs
        )
        hessians = _hessians(layer, linears, inputs, tuple(g for g in shared if g))
        for path, lin in linears.items():
            hessian = hessians.pop(path)
            owned = all(h is not hessian for h in hessians.values())  # no other linear still needs it
            new_w, keep[path] = _solve(lin.weight.data, hessian, cfg, ratio, owned)
            del hessian
            lin.weight.data.copy_(new_w)
    return keep


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
    `from_pretrained` loads it. With `prune.layerwise=owl` a first streamed pass over the dense
    model decides each layer's ratio (`loram_core.prune.owl`); the ratios are recorded in the
    checkpoint's `loram` section (`layer_ratios`, in `pruned_layers` order) and in the masks.
    """
    device = torch.device(device)
    config = load_config(base_dir)
    family = family_of(config)
    dtype = default_dtype(device, cfg.dtype)
    calib = calib[: cfg.calib_samples]
    start, stop = cfg.layer_range(config.num_hidden_layers)
    ratios, outliers, scan = _layer_ratios(base_dir, calib, cfg, range(start, stop), dtype, device, progress)
    masks = Masks(strategy=cfg.strategy, layer_ratios=dict(ratios), layerwise=cfg.layerwise)
    state: dict = {}

    def capture(model: nn.Module) -> None:
        state["inputs"] = Activations(capture_layer_inputs(model, calib, CALIB_BATCH), device)

    def process(i: int, layer: nn.Module) -> None:
        inputs = state["inputs"]
        if i in ratios:
            for path, keep in prune_layer(layer, family, inputs, cfg, ratios[i]).items():
                masks.add_sparse(f"{family.layers}.{i}.{path}.weight", keep)
        # The next layer is calibrated on what this (pruned) layer now outputs.
        inputs.run(layer, replace=True)

    total = scan + config.num_hidden_layers
    report = None if progress is None else (lambda what, done, _n: progress(what, scan + done, total))
    config = stream_layers(
        base_dir, out_dir, process, prepare=capture, progress=report, dtype=dtype, device=device
    )
    config.loram = {
        "strategy": cfg.strategy,
        "ratio": cfg.ratio if cfg.strategy == "unstructured" else cfg.n_m[0] / cfg.n_m[1],
        "method": cfg.sparse_method,
        "n_m": list(cfg.n_m) if cfg.strategy == "semi" else None,
        "pruned_layers": list(range(start, stop)),
        "layerwise": cfg.layerwise,
        "layer_ratios": [ratios[i] for i in range(start, stop)],
        "true_sequential": cfg.true_sequential,
    }
    if cfg.layerwise == "owl":
        config.loram.update(owl_m=cfg.owl_m, owl_lambda=cfg.owl_lambda, owl_outlier_ratios=outliers)
    config.save_pretrained(out_dir)
    return masks


def _layer_ratios(
    base_dir: Path, calib: torch.Tensor, cfg: PruneConfig, layers: range, dtype: torch.dtype,
    device: torch.device, progress,
) -> tuple[dict[int, float], list[float] | None, int]:  # fmt: skip
    """Each pruned layer's ratio, OWL's outlier ratios (percent, `layers` order), and its scan's progress steps."""
    if cfg.strategy == "semi":
        return dict.fromkeys(layers, cfg.n_m[0] / cfg.n_m[1]), None, 0
    if cfg.layerwise == "uniform":
        return dict.fromkeys(layers, cfg.ratio), None, 0
    total = layers.stop + load_config(base_dir).num_hidden_layers
    report = None if progress is None else (lambda done, _n: progress("owl", done, total))
    found = dense_outlier_ratios(base_dir, calib, layers, cfg.owl_m, dtype, device, report)
    outliers = [found[i] for i in layers]
    ratios = owl_layer_ratios(outliers, cfg.ratio, cfg.owl_lambda)
    return dict(zip(layers, ratios, strict=True)), outliers, layers.stop
