"""Every step on the configured device, and the same results as on the CPU.

Each test runs for `cpu` everywhere (the logic: a device run compared with a CPU reference) and for
`cuda` where a GPU is present (marked `gpu`; `pytest -m gpu` on a GPU machine). Agreement bounds:
magnitude masks identical (the scores are exact in fp32); SparseGPT perplexity within 1% (fp32
Hessians, TF32 and reduction order differ on a GPU); alignment losses within 1e-2 after 6 steps
(bf16 autocast on the GPU, fp32 on the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loram_core import steps
from loram_core.align import train_causal_lm
from loram_core.config import AlignConfig, PruneConfig, load_config
from loram_core.evaluate import perplexity
from loram_core.models import load_model
from loram_core.prune import load_masks, prune_checkpoint, save_masks
from loram_core.steps import alignment, evaluation, pruning, quantization
from tests.conftest import REPO, tiny_model, tiny_tokenizer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine, they say.\n\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 4-layer tiny checkpoint with a tokenizer, as a pipeline's base.source."""
    path = tmp_path_factory.mktemp("base")
    tiny_model(num_hidden_layers=4, intermediate_size=128).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _calib(n: int = 8, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 30, (n, seq), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def _prune(base: Path, out: Path, device: str, **kw) -> tuple[Path, object]:
    cfg = PruneConfig(calib_samples=8, dtype="float32", **kw)
    masks = prune_checkpoint(base, out, cfg, _calib(), device=device)
    return out, masks


@pytest.mark.parametrize("device", DEVICES)
def test_magnitude_masks_are_identical_on_the_device(base: Path, tmp_path: Path, device: str) -> None:
    _, ref = _prune(
        base, tmp_path / "cpu", "cpu", strategy="unstructured", ratio=0.5, sparse_method="magnitude"
    )
    _, got = _prune(
        base, tmp_path / device, device, strategy="unstructured", ratio=0.5, sparse_method="magnitude"
    )
    ref_masks, got_masks = ref.keep_masks(), got.keep_masks()
    assert ref_masks.keys() == got_masks.keys() and len(ref_masks) == 4 * 7
    for name, mask in ref_masks.items():
        assert torch.equal(mask, got_masks[name]), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["semi", "unstructured"])
def test_sparsegpt_on_the_device_matches_the_cpu_perplexity(
    base: Path, tmp_path: Path, device: str, strategy: str
) -> None:
    heldout = _calib(8, 32, seed=1)
    ppl = {}
    for where in ("cpu", device):
        out, masks = _prune(base, tmp_path / f"{where}-x", where, strategy=strategy, ratio=0.5)
        model = load_model(out)
        for name, mask in masks.keep_masks().items():  # the pattern holds exactly
            assert not model.get_parameter(name)[~mask].any(), name
        ppl[where] = perplexity(model, heldout)
    assert ppl[device] == pytest.approx(ppl["cpu"], rel=0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_taylor_on_the_device_keeps_the_same_groups(base: Path, tmp_path: Path, device: str) -> None:
    kw = dict(strategy="structured", ratio=0.5, keep_first=1, keep_last=1)
    _, ref = _prune(base, tmp_path / "cpu", "cpu", **kw)
    _, got = _prune(base, tmp_path / device, device, **kw)
    for i in (1, 2):
        assert torch.equal(ref.kept_kv_heads[i], got.kept_kv_heads[i])
        # Channels: at most one swap at a near-tie of fp32 scores summed in another order.
        assert len(set(ref.kept_channels[i].tolist()) ^ set(got.kept_channels[i].tolist())) <= 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["adamw", "flora"])
def test_alignment_on_the_device_follows_the_cpu(device: str, optimizer: str) -> None:
    blocks = _calib(32, 32, seed=2)
    cfg = AlignConfig(
        steps=6, batch_size=4, log_every=1, warmup_steps=0, lr=3e-3, optimizer=optimizer, flora_rank=4
    )
    losses, heads = {}, {}
    for where in ("cpu", device):
        model = tiny_model().to(where)
        head = model.lm_head.weight.detach().clone()
        losses[where] = [loss for _, loss in train_causal_lm(model, blocks, cfg).losses]
        heads[where] = torch.equal(model.lm_head.weight.detach(), head)  # frozen head stays put
    assert losses[device] == pytest.approx(losses["cpu"], abs=1e-2)
    assert losses["cpu"][-1] < losses["cpu"][0] and heads[device] and heads["cpu"]


@pytest.mark.parametrize("device", DEVICES)
def test_every_step_computes_on_the_configured_device(
    base: Path, tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, set[str]] = {}

    def spy(module, name, where):
        fn = getattr(module, name)

        def wrapped(*args, **kwargs):
            seen.setdefault(name, set()).add(str(where(args, kwargs)))
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    param_device = lambda args, kw: next(args[0].parameters()).device.type  # noqa: E731
    kw_device = lambda args, kw: torch.device(kw["device"]).type  # noqa: E731
    spy(pruning, "prune_checkpoint", kw_device)
    computed: list[str] = []
    cast = pruning.cast_checkpoint  # called on the pruned checkpoint as prune_checkpoint wrote it

    def cast_spy(model_dir, dtype):
        computed.append(json.loads((Path(model_dir) / "config.json").read_text())["dtype"])
        return cast(model_dir, dtype)

    monkeypatch.setattr(pruning, "cast_checkpoint", cast_spy)
    spy(alignment, "train_causal_lm", param_device)
    spy(quantization, "quantize_checkpoint", kw_device)
    spy(evaluation, "perplexity", param_device)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i} {TEXT}" for i in range(200)))  # distinct documents: some held out
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"device={device}", f"workdir={tmp_path / 'work'}", f"base.source={base}", f"corpus.paths=[{corpus}]",
        "corpus.seq_len=32", "corpus.eval_blocks=4", "prune.calib_samples=4", "align.steps=2",
        "align.batch_size=2", "prune.strategy=semi",
    ])  # fmt: skip
    steps.preflight(cfg)
    blocks = steps.prepare_corpus(cfg, str(base))
    pruned = steps.prune(cfg.prune, cfg.context, str(base), steps.prepare_calibration(cfg, str(base), blocks))
    aligned = steps.align(cfg.align, cfg.context, pruned, blocks)
    nf4 = steps.quantize(cfg.quantize, cfg.context, aligned)
    result = steps.evaluate(cfg, str(base), pruned, aligned, nf4, blocks)
    assert seen == {
        k: {device} for k in ("prune_checkpoint", "train_causal_lm", "quantize_checkpoint", "perplexity")
    }
    assert result["compute"]["device"].startswith(device)
    assert set(result["compute"]["eval_seconds"]) == {
        "original_ppl",
        "pruned_ppl",
        "aligned_ppl",
        "aligned_nf4_ppl",
    }
    # prune.dtype=auto computes in float32 on the CPU, bfloat16 on a GPU; what is written is the
    # published dtype either way (bfloat16 from this float32 base), and so is the aligned model.
    assert computed == ["float32" if device == "cpu" else "bfloat16"]
    for out in (pruned, aligned):
        assert json.loads((Path(out) / "config.json").read_text())["dtype"] == "bfloat16"
    save_masks(load_masks(Path(pruned) / "masks" / "masks.safetensors"), tmp_path / "again.safetensors")


@pytest.mark.gpu
def test_nf4_quantized_on_the_gpu_reloads_there(base: Path, tmp_path: Path) -> None:
    from loram_core.config import QuantizeConfig
    from loram_core.quantize import quantize_checkpoint

    quantize_checkpoint(base, tmp_path / "nf4", QuantizeConfig(), device="cuda")
    model = load_model(tmp_path / "nf4", device_map="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    heldout = _calib(8, 32, seed=3)
    dense = perplexity(load_model(base).to("cuda"), heldout)
    assert perplexity(model, heldout) == pytest.approx(dense, rel=0.05)
