"""OWL layer-wise sparsity, pinned to a transcription of luuyin/OWL's `prune_sparsegpt_outlier`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loram_core.config import PruneConfig, load_config
from loram_core.errors import ConfigError
from loram_core.models import load_model
from loram_core.prune import load_masks, plan, prune_checkpoint, save_masks
from loram_core.prune.owl import owl_layer_ratios
from tests.conftest import REPO, tiny_config, tiny_model


def _model_with_outliers(path):
    """4 tiny layers with planted large weights (more in layer 2, some in 1): their outlier ratios differ."""
    model = tiny_model(num_hidden_layers=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, count in ((1, 40), (2, 160), (3, 10)):
            w = model.model.layers[i].mlp.up_proj.weight
            idx = torch.randperm(w.numel(), generator=g)[:count]
            w.view(-1)[idx] *= 12
    model.save_pretrained(path)
    return model


def _owl_reference(model, calib: torch.Tensor, sparsity: float, lamda: float, hyper_m: float):
    """prune_sparsegpt_outlier's first half: WrappedGPT statistics on the dense model, one sample at a time.

    Returns (each layer's outlier ratio in percent, each layer's sparsity ratio).
    """
    stats = {}

    def add_batch(lin):
        def tmp(_, inp, out):
            inp = inp[0].data
            if len(inp.shape) == 2:
                inp = inp.unsqueeze(0)
            n = inp.shape[0]
            inp = inp.reshape((-1, inp.shape[-1])).t()
            s = stats.setdefault(lin, {"scaler_row": torch.zeros(inp.shape[0]), "nsamples": 0})
            s["scaler_row"] *= s["nsamples"] / (s["nsamples"] + n)
            s["nsamples"] += n
            s["scaler_row"] += torch.norm(inp.type(torch.float32), p=2, dim=1) ** 2 / s["nsamples"]

        return tmp

    linears = [[m for m in layer.modules() if isinstance(m, torch.nn.Linear)] for layer in model.model.layers]
    handles = [lin.register_forward_hook(add_batch(lin)) for layer in linears for lin in layer]
    with torch.no_grad():
        for j in range(calib.shape[0]):  # the dense layers' outputs feed the next: a dense forward
            model(calib[j].unsqueeze(0))
    for h in handles:
        h.remove()
    all_layer_ratio = []
    for subset in linears:
        layer_wmetric = [torch.abs(lin.weight.data) * torch.sqrt(stats[lin]["scaler_row"].reshape((1, -1)))
                         for lin in subset]  # fmt: skip
        w = torch.cat([torch.flatten(x.cpu()) for x in layer_wmetric])
        count = (w > torch.mean(w) * hyper_m).sum().item()
        all_layer_ratio.append(float(count) / w.numel() * 100)
    outliers = list(all_layer_ratio)
    all_layer_ratio = np.array(all_layer_ratio)
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (
        1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lamda * 2
    )
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity)
    return outliers, [1 - d for d in all_layer_ratio]  # layer_sparsity_ratio = 1 - all_layer_ratio[i]


def _calib() -> torch.Tensor:
    return torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(3))


def test_owl_ratios_equal_the_reference_on_a_tiny_model(tmp_path) -> None:
    model = _model_with_outliers(tmp_path / "base")
    outliers, reference = _owl_reference(model, _calib(), sparsity=0.6, lamda=0.08, hyper_m=5)
    cfg = PruneConfig(strategy="unstructured", ratio=0.6, layerwise="owl", calib_samples=8)
    masks = prune_checkpoint(tmp_path / "base", tmp_path / "p", cfg, _calib())
    loram = load_model(tmp_path / "p").config.loram
    ours = loram["layer_ratios"]
    np.testing.assert_allclose(loram["owl_outlier_ratios"], outliers, rtol=1e-9, atol=0)
    assert np.argsort(outliers).tolist() == [0, 1, 3, 2]  # ~0.5% unplanted, then the planted ones count
    # Here the reference's layer 2 leaves ratio +- lambda (0.094 from 0.6): our documented deviation
    # scales every deviation by the same factor until it sits on the edge.
    deviation = np.array(reference) - 0.6
    assert np.abs(deviation).max() > 0.08
    np.testing.assert_allclose(ours, 0.6 + deviation * 0.08 / np.abs(deviation).max(), rtol=0, atol=1e-9)
    assert ours[2] == min(ours) and ours[0] == max(ours)  # most outliers, least pruned; fewest, most
    # Each layer is pruned at its own ratio (SparseGPT's per-block rounding: within 1%).
    pruned = load_model(tmp_path / "p")
    for i, r in enumerate(ours):
        zeros = sum(int((lin.weight == 0).sum()) for lin in pruned.model.layers[i].modules()
                    if isinstance(lin, torch.nn.Linear))  # fmt: skip
        total = sum(
            lin.weight.numel() for lin in pruned.model.layers[i].modules() if isinstance(lin, torch.nn.Linear)
        )
        assert zeros / total == pytest.approx(r, abs=0.01)
    # The masks file records them too.
    save_masks(masks, tmp_path / "m.safetensors")
    loaded = load_masks(tmp_path / "m.safetensors")
    assert loaded.layerwise == "owl" and loaded.layer_ratios == dict(enumerate(ours))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "np") as f:  # readable without our code
        assert json.loads(f.metadata()["layer_ratios"])["2"] == ours[2]


def test_owl_ratios_equal_the_reference_unscaled_on_two_layers(tmp_path) -> None:
    """Two layers: the reference's band is exactly ratio +- lambda, so ours are its numbers as they are."""
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, :4] *= 10
    model.save_pretrained(tmp_path / "base")
    _, reference = _owl_reference(model, _calib(), sparsity=0.5, lamda=0.05, hyper_m=3)
    cfg = PruneConfig(strategy="unstructured", ratio=0.5, layerwise="owl", owl_m=3, owl_lambda=0.05,
                      calib_samples=8)  # fmt: skip
    prune_checkpoint(tmp_path / "base", tmp_path / "p", cfg, _calib())
    ours = load_model(tmp_path / "p").config.loram["layer_ratios"]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours, [0.55, 0.45], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_owl_ratios_average_to_ratio_and_stay_within_lambda(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    outliers = (torch.rand(12, generator=g) ** 4 * 3).tolist()  # skewed: most low, a few high
    ratios = owl_layer_ratios(outliers, 0.7, 0.08)
    assert np.mean(ratios) == pytest.approx(0.7, abs=1e-12)
    assert all(0.7 - 0.08 - 1e-12 <= r <= 0.7 + 0.08 + 1e-12 for r in ratios)
    assert max(abs(r - 0.7) for r in ratios) == pytest.approx(0.08)  # the farthest sits on the edge
    # The order follows the outlier ratios: more outliers, lower sparsity.
    assert np.argsort(ratios).tolist() == np.argsort([-o for o in outliers], kind="stable").tolist()


def test_owl_ratios_where_the_reference_would_leave_the_band() -> None:
    """One high layer among equal ones: the reference gives that layer ratio - 2 lambda (1 - 1/n); scaled to lambda."""
    ratios = owl_layer_ratios([1.0, 1.0, 1.0, 5.0], 0.5, 0.1)
    # Reference: a = [0, 0, 0, 0.2], sparsity 0.5 + 0.05 - a = [0.55, 0.55, 0.55, 0.35]; 0.35 is 0.15 away.
    np.testing.assert_allclose(
        ratios, [0.5 + 0.05 / 1.5, 0.5 + 0.05 / 1.5, 0.5 + 0.05 / 1.5, 0.4], atol=1e-12
    )
    assert owl_layer_ratios([2.0, 2.0], 0.5, 0.1) == [0.5, 0.5]  # no spread: uniform


def test_owl_is_refused_with_semi_and_structured_naming_the_key() -> None:
    demo = REPO / "configs" / "demo.yaml"
    for strategy in ("semi", "structured", "random"):
        with pytest.raises(ConfigError, match=r"prune.layerwise=owl.*prune.strategy='" + strategy):
            load_config(demo, [f"prune.strategy={strategy}", "prune.layerwise=owl"])
    with pytest.raises(ConfigError, match="prune.owl_lambda"):
        load_config(demo, ["prune.strategy=unstructured", "prune.ratio=0.95", "prune.layerwise=owl"])
    assert load_config(demo, ["prune.strategy=unstructured", "prune.layerwise=owl"]).prune.owl_m == 5


def test_plan_says_owl_ratios_are_decided_at_prune_time() -> None:
    config = tiny_config()
    assert plan(config, PruneConfig(strategy="unstructured", ratio=0.6)).layer_ratios == [0.6, 0.6]
    owl = plan(config, PruneConfig(strategy="unstructured", ratio=0.6, layerwise="owl"))
    assert owl.layer_ratios is None and owl.layerwise == "owl"
