"""Every published variant loads with stock transformers (or refuses loudly) and trains a peft LoRA.

A tiny demo base (3 layers, 64 wide; the middle layer pruned, so a structured base has per-layer
widths) is published once per strategy through the pipeline's own steps, without Prefect, and
pulled back from the bucket with `loram_core.bucket.pull` (verified), as a consumer gets it.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loram_core import steps
from loram_core.bucket import pull
from loram_core.config import load_config
from loram_core.models import load_model
from loram_core.stock import MODELING_FILE, cpu_unpackable, needs_modeling_code

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "flows"))
from test_provider_flow import TINY  # noqa: E402

STRATEGIES = ("random", "structured", "semi")
VARIANTS = ("model", "model-nf4")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One published version per strategy (16-bit and NF4), from one short-trained tiny base."""
    root = tmp_path_factory.mktemp("stock")
    versions = {}
    for strategy in STRATEGIES:
        cfg = load_config(REPO / "configs" / "demo.yaml", TINY + [
            f"workdir={root / 'work'}", f"base.cache_dir={root / 'cache'}", "device=cpu",
            f"publish.uri=file://{root / 'bucket'}", f"publish.version={strategy}",
            f"prune.strategy={strategy}", "base.demo.pretrain_steps=30", "align.steps=4",
        ])  # fmt: skip
        base = steps.prepare_base(cfg)
        blocks = steps.prepare_corpus(cfg, base)
        pruned = steps.prune(cfg.prune, cfg.context, base, steps.prepare_calibration(cfg, base, blocks))
        aligned = steps.align(cfg.align, cfg.context, pruned, blocks)
        nf4 = steps.quantize(cfg.quantize, cfg.context, aligned)
        evaluation = steps.evaluate(cfg, base, pruned, aligned, nf4, blocks)
        published = steps.publish(cfg, base, blocks, aligned, nf4, evaluation)
        dest = root / "pulled" / strategy
        pull(published["uri"], dest, cache=False)
        versions[strategy] = dest
    versions["original"] = Path(base)
    return versions


def _linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.startswith("model.layers.") and hasattr(m, "in_features")
    }


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stock_from_pretrained_matches_load_model_and_trains_lora(
    published: dict[str, Path], strategy: str, variant: str, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    path = published[strategy] / variant
    structured = strategy != "semi"
    # Structured bases ship their modeling code; sparse ones keep the stock architecture.
    assert (path / MODELING_FILE).is_file() == structured
    assert ("auto_map" in json.loads((path / "config.json").read_text())) == structured
    stock = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=structured, dtype=torch.bfloat16)
    if variant == "model-nf4" and not structured:
        from loram_core.card import CPU_NF4_RECIPE

        assert CPU_NF4_RECIPE in (published[strategy] / "README.md").read_text()
        _card_cpu_recipe(stock)  # what the card tells a stock load to do before it trains on a CPU
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=structured)
    assert tokenizer("def f(x):").input_ids  # the variant is complete: its tokenizer ships with it
    ours = load_model(path, dtype=torch.bfloat16)
    assert type(stock).__name__ == ("LoramLlamaForCausalLM" if structured else "LlamaForCausalLM")
    assert _linear_shapes(stock) == _linear_shapes(ours)
    if structured:  # the pruned layer really is narrower than its neighbours
        assert _linear_shapes(stock)["model.layers.1.mlp.gate_proj"] == (64, 44)
        assert _linear_shapes(stock)["model.layers.0.mlp.gate_proj"] == (64, 128)
    if variant == "model-nf4":
        assert type(stock.model.layers[1].mlp.gate_proj).__name__ == "Linear4bit"
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    stock.eval()
    with torch.no_grad():  # an inference call first: bitsandbytes repacks NF4 weights here where it can
        a, b = stock(ids).logits.float(), ours(ids).logits.float()
    # Same weights, same kernels: bf16 (and NF4 dequantized to bf16) rounding is the only slack.
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2), (a - b).abs().max()

    lora = get_peft_model(stock, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))  # fmt: skip
    lora.train()
    params = [p for p in lora.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    b_before = lora.base_model.model.model.layers[1].mlp.gate_proj.lora_B["default"].weight.clone()
    assert b_before.shape == ((44 if structured else 128), 4)
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = lora(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    b_after = lora.base_model.model.model.layers[1].mlp.gate_proj.lora_B["default"].weight
    assert not torch.equal(b_before, b_after)  # the step reached the pruned layer's adapter
    if structured and variant == "model":  # the adapter recovers onto the original, from the bucket URI
        from peft import PeftModel

        from loram_core.recover import recover

        adapter, full = tmp_path / "lora", tmp_path / "lora-full"
        lora.save_pretrained(adapter)
        recover(f"file://{published[strategy]}", adapter, full, original=published["original"])
        original = AutoModelForCausalLM.from_pretrained(published["original"])
        recovered = PeftModel.from_pretrained(original, full)
        grown = recovered.base_model.model.model.layers[1].mlp.gate_proj.lora_B["default"].weight
        assert grown.shape == (128, 4) and torch.count_nonzero(grown.abs().sum(1)) <= 44


def _card_cpu_recipe(model: torch.nn.Module) -> None:
    """Run the model card's lines for training a stock-loaded NF4 model on a CPU, as a consumer would."""
    from loram_core.card import CPU_NF4_RECIPE

    exec(CPU_NF4_RECIPE, {"model_4bit": model})  # the card's own text, so the two cannot drift apart


def _trains_through_nf4(model: torch.nn.Module, ids: torch.Tensor) -> bool:
    """After an inference call, does one LoRA backward reach every layer's gate_proj (before down_proj)?"""
    from peft import LoraConfig, get_peft_model

    model.eval()
    with torch.no_grad():
        model(ids)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"]))
    lora.train()
    lora(input_ids=ids, labels=ids).loss.backward()
    grads = [
        layer.mlp.gate_proj.lora_B["default"].weight.grad for layer in lora.base_model.model.model.layers
    ]
    return all(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("strategy", ["semi", "structured"])
def test_nf4_trains_through_our_loader_after_an_inference_call(
    published: dict[str, Path], strategy: str
) -> None:
    """`load_model` (and the shipped modeling code) route a forward with gradients enabled through
    bitsandbytes' differentiable path, even once an inference call repacked the weights for its
    AVX512-BF16 kernel, whose output has no backward (on such a CPU, HEAD 07d12f4 passed no gradient)."""
    from bitsandbytes.functional import has_avx512bf16

    model = load_model(published[strategy] / "model-nf4", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()(ids)
    packed = [m for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None
              and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]  # fmt: skip
    assert bool(packed) == has_avx512bf16()  # where the kernel exists (odd widths excepted)
    assert _trains_through_nf4(model, ids)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())


@pytest.mark.skipif("not __import__('bitsandbytes').functional.has_avx512bf16()", reason="needs AVX512-BF16")
def test_stock_nf4_needs_the_card_recipe_to_train_on_an_avx512_cpu(published: dict[str, Path]) -> None:
    """Why the card has its CPU lines: bitsandbytes 0.50's repacked weights pass no gradient. When this
    fails, bitsandbytes has fixed it and the card's lines can go."""
    path = published["semi"] / "model-nf4"
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    assert not _trains_through_nf4(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), ids)
    followed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    _card_cpu_recipe(followed)
    assert _trains_through_nf4(followed, ids)


@pytest.mark.parametrize("variant", VARIANTS)
def test_structured_without_trust_remote_code_fails_with_what_to_do(
    published: dict[str, Path], variant: str
) -> None:
    path = published["structured"] / variant
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(path)
    card = (published["structured"] / "README.md").read_text()
    assert "trust_remote_code=True" in card and "contains custom code" in card


def test_nf4_cpu_guard_follows_bitsandbytes_packing_rule(published: dict[str, Path]) -> None:
    """The guard leaves bitsandbytes' AVX512-BF16 repacking on exactly where bitsandbytes accepts the widths."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    stock = AutoModelForCausalLM.from_pretrained(
        published["structured"] / "model-nf4", trust_remote_code=True
    )
    quantized = [m for m in stock.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for m in quantized:  # as on a CPU with AVX512-BF16, whatever this machine has
        m.support_avx512bf16_for_cpu = True
    guard = sys.modules[type(stock).__module__].keep_bnb_cpu_path_safe
    switched = guard(stock)
    assert 0 < switched < len(quantized)  # the pruned layer's odd widths, not the dense layers
    for m in quantized:
        try:
            _convert_weight_packed_for_cpu(m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
            packs = True
        except (AssertionError, RuntimeError):
            packs = False
        assert m.support_avx512bf16_for_cpu == packs, (m.in_features, m.out_features)


def test_nf4_forward_survives_the_avx512_path_for_odd_widths(published: dict[str, Path]) -> None:
    """As a consumer's AVX512-BF16 CPU does, mark the odd-width NF4 linears for repacking: without the
    guard bitsandbytes fails with "N must be divisible by block_n"; with it, forward and generate run."""
    import inspect

    stock = AutoModelForCausalLM.from_pretrained(
        published["structured"] / "model-nf4", trust_remote_code=True
    )
    odd = [m for m in stock.modules() if hasattr(m, "support_avx512bf16_for_cpu") and m.out_features % 32]
    assert odd
    for m in odd:
        m.support_avx512bf16_for_cpu = True
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(stock.eval()(ids).logits).all()
    assert not any(m.support_avx512bf16_for_cpu for m in odd)
    assert stock.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 12)
    assert "input_ids" in inspect.signature(stock.forward).parameters  # Trainer keeps the dataset's columns


def test_modeling_code_is_shipped_only_where_stock_classes_would_fail() -> None:
    dense = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_hidden_layers": 2}  # fmt: skip
    nf4 = {"quantization_config": {"load_in_4bit": True}}
    assert not needs_modeling_code(dense) and not needs_modeling_code({**dense, **nf4})
    sparse = {**dense, "loram": {"strategy": "semi", "ratio": 0.5, "pruned_layers": [0, 1]}}
    assert not needs_modeling_code(sparse)
    widths = {"intermediate_sizes": [128, 44], "num_attention_heads_per_layer": [4, 2],
              "num_key_value_heads_per_layer": [2, 1]}  # fmt: skip
    assert needs_modeling_code({**dense, "loram": widths})
    # Uniform but odd widths: stock classes build them, but NF4 would crash bitsandbytes' CPU kernel.
    odd = {**dense, "intermediate_size": 44}
    assert not needs_modeling_code(odd)
    assert needs_modeling_code({**odd, **nf4})
    assert cpu_unpackable({**odd, **nf4}) == [(44, 64), (64, 44)]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_shipped_code_builds_each_family_with_per_layer_widths(tmp_path: Path, family: str) -> None:
    """Qwen2's q/k/v biases and Mistral's class load through the same shipped file, logits equal."""
    from transformers import MistralConfig

    from loram_core.config import parse_config
    from loram_core.models import build_model
    from loram_core.prune.plan import structured_config
    from loram_core.stock import ship_modeling_code
    from tests.conftest import tiny_config

    config = tiny_config("qwen2" if family == "qwen2" else "llama", num_hidden_layers=3)
    if family == "mistral":
        config = MistralConfig(
            **{k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
        )
    prune = parse_config(
        {"prune": {"strategy": "random", "ratio": 0.5, "keep_first": 1, "keep_last": 1}}
    ).prune
    torch.manual_seed(0)
    model = build_model(structured_config(config, prune)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # stock init zeroes biases; make Qwen2's matter
    model.save_pretrained(tmp_path)
    assert ship_modeling_code(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == f"loram_{family}"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert _linear_shapes(stock) == _linear_shapes(model)
    assert stock.model.layers[1].mlp.gate_proj.out_features == 64
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits)
