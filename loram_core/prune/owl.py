"""OWL, outlier-weighted layer-wise sparsity (Yin et al. 2023), for `unstructured` pruning.

Layers whose Wanda scores hold more outliers lose fewer weights. Three pure steps, as the
reference (`luuyin/OWL`, `lib/prune_all.py`) computes them on the dense model:
- Wanda scores of every linear of a layer, `|W_ij| * ||x_j||` (`wanda_scores`);
- the layer's outlier ratio: the share, in percent, of those scores (all linears of the layer
  together) above `M` times their mean (`outlier_ratio`, the reference's `check_outlier_mean`);
- the layer ratios (`owl_layer_ratios`): the outlier ratios min-max normalised and scaled to a
  range of `2 * lambda`, centred on the mean, subtracted from the target ratio.
`dense_outlier_ratios` streams the dense model one decoder layer at a time to gather them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from loram_core.models import layer_linears
from loram_core.prune.streaming import CALIB_BATCH, Activations, StreamedModel, capture_layer_inputs


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda's score `|W| * ||x||` per weight.

    Args:
        weight: `[rows, cols]`.
        input_sq_sum: `[cols]`, the sum (or any fixed multiple of it) over calibration tokens of
            each input's square; OWL's `scaler_row` is this sum divided by the number of sequences.

    Returns:
        float32 `[rows, cols]`.
    """
    return weight.float().abs() * input_sq_sum.float().sqrt()[None, :]


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Percent of all `scores` (one layer's linears, together) strictly above `m` times their mean."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > flat.mean() * m).sum().item()) / flat.numel() * 100


def owl_layer_ratios(outlier_ratios: list[float], ratio: float, lam: float) -> list[float]:
    """Each pruned layer's sparsity ratio from its outlier ratio, averaging exactly `ratio`.

    The reference's formula: `a = (o - min o) / (max o - min o) * 2 lambda`, the layer's density
    `a - mean(a) + (1 - ratio)`, so its sparsity is `ratio + mean(a) - a`. That spans `2 lambda`
    but is centred on the mean, so a layer can move by up to `2 lambda`; the paper bounds each
    layer to `ratio +- lambda`, so where one would leave that band every deviation is scaled by
    the same factor until the farthest sits on its edge (the mean is unchanged). Equal outlier
    ratios (or one layer) give `ratio` everywhere.
    """
    o = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = (o.max() - o.min()).item()
    if spread == 0:
        return [ratio] * len(outlier_ratios)
    a = (o - o.min()) / spread * lam * 2
    deviation = a.mean() - a
    farthest = deviation.abs().max().item()
    if farthest > lam:
        deviation = deviation * (lam / farthest)
    return (ratio + deviation).tolist()


@torch.no_grad()
def dense_outlier_ratios(
    base_dir: Path,
    calib: torch.Tensor,
    layers: range,
    m: float,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, float]:
    """The outlier ratio of every layer in `layers`, on the dense model's calibration activations.

    One decoder layer at a time is read, its linears' input squares summed by forward hooks while
    it runs on the calibration hidden states, which it then replaces with its outputs; nothing is
    written. Layers past `layers.stop` are not read.

    Args:
        calib: int `[n, seq_len]` calibration blocks.
        progress: called with (layers done, `layers.stop`).
    """
    device = torch.device(device)
    stream = StreamedModel(base_dir, dtype, device)
    family = stream.family
    ratios: dict[int, float] = {}
    try:
        stream.prefetch(0)
        stream.load_rest()
        inputs = Activations(capture_layer_inputs(stream.model, calib, CALIB_BATCH), device)
        stream.drop_rest()
        for i in range(layers.stop):
            layer = stream.load_layer(i, prefetch_next=i + 1 if i + 1 < layers.stop else None)
            if i in layers:
                linears = layer_linears(layer, family)
                sums = _run_summing_input_squares(layer, linears, inputs)
                ratios[i] = outlier_ratio(
                    [wanda_scores(lin.weight, sums[n]) for n, lin in linears.items()], m
                )
            else:
                inputs.run(layer, replace=True)
            stream.drop_layer(i)
            if progress is not None:
                progress(i + 1, layers.stop)
    finally:
        stream.close()
    return ratios


def _run_summing_input_squares(
    layer: torch.nn.Module, linears: dict[str, torch.nn.Linear], inputs: Activations
) -> dict[str, torch.Tensor]:
    """Run `layer` on `inputs` (replacing them with its outputs); each linear's input squares summed, `[in]`."""
    sums = {name: torch.zeros(lin.in_features, device=lin.weight.device) for name, lin in linears.items()}

    def make_hook(name: str):
        def hook(_module, args) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x * x).sum(0)

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        inputs.run(layer, replace=True)
    finally:
        for h in handles:
            h.remove()
    return sums
