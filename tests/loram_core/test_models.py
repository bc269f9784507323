import pytest
import torch
from transformers import AutoModelForCausalLM

from loram_core.config import QuantizeConfig
from loram_core.errors import LoramError
from loram_core.models import build_model, count_parameters, load_model
from loram_core.quantize import quantize_checkpoint
from tests.conftest import tiny_config, tiny_model


def _pruned_config():
    cfg = tiny_config()
    cfg.loram = {
        "intermediate_sizes": [128, 48],
        "num_attention_heads_per_layer": [4, 2],
        "num_key_value_heads_per_layer": [2, 1],
    }
    return cfg


def test_per_layer_widths_round_trip_through_safetensors(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(_pruned_config()).eval()
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 48)
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))
    again = load_model(tmp_path)
    x = torch.randint(0, 128, (2, 16))
    assert torch.equal(again(x).logits, model(x).logits)
    assert again.config.loram["intermediate_sizes"] == [128, 48]


def test_uniform_checkpoint_loads_with_stock_transformers(tmp_path) -> None:
    tiny_model().save_pretrained(tmp_path)
    assert count_parameters(AutoModelForCausalLM.from_pretrained(tmp_path)) == count_parameters(
        load_model(tmp_path)
    )


def test_missing_checkpoint_names_the_path_and_the_fix(tmp_path) -> None:
    with pytest.raises(LoramError, match="config.json is missing.*base.source=demo"):
        load_model(tmp_path / "nowhere")


def test_nf4_variant_of_a_pruned_model_reloads_and_stays_close(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(_pruned_config()).eval()
    model.save_pretrained(tmp_path / "src")
    quantize_checkpoint(tmp_path / "src", tmp_path / "nf4", QuantizeConfig())
    q = load_model(tmp_path / "nf4", device_map="cpu")
    import bitsandbytes as bnb

    assert isinstance(q.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    assert q.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert q.config.quantization_config.bnb_4bit_use_double_quant is True
    x = torch.randint(0, 128, (2, 16))
    ref = torch.log_softmax(model(x).logits, -1)
    with torch.no_grad():  # the inference path bitsandbytes repacks for on some CPUs
        out = torch.log_softmax(q(x).logits.float(), -1)
    assert (out - ref).abs().mean() < 0.05
    size = sum(f.stat().st_size for f in (tmp_path / "nf4").glob("*.safetensors"))
    assert size < 0.6 * sum(f.stat().st_size for f in (tmp_path / "src").glob("*.safetensors"))
