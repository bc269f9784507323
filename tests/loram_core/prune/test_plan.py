import json
from pathlib import Path

from loram_core.config import PruneConfig
from loram_core.prune.plan import plan, pruned_layer_widths, read_model_config
from tests.conftest import tiny_config

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "llama-2-13b.config.json"


def test_llama2_13b_structured_065_matches_the_paper() -> None:
    p = plan(read_model_config(FIXTURE), PruneConfig(strategy="structured", ratio=0.65))
    assert p.original_params == 13_015_864_320
    assert p.pruned_params == 6_005_662_720
    assert round(p.reduction, 2) == 2.17
    assert round(p.hbm_gb, 2) == 11.19
    assert round(p.hbm_gb_4bit, 2) == 2.80  # QLoRAM accounting: a quarter per parameter
    assert p.hbm_gb_4bit < p.hbm_gb_4bit_actual < p.hbm_gb / 3
    assert p.pruned_layers == list(range(4, 38))
    assert p.layers[4] == {"intermediate": 4838, "heads": 14, "kv_heads": 14}


def test_gqa_widths_remove_kv_heads_with_their_query_groups() -> None:
    cfg = tiny_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=128)
    assert pruned_layer_widths(cfg, 0.5) == {"intermediate": 64, "heads": 4, "kv_heads": 1}
    # At least one head and one channel always remain.
    assert pruned_layer_widths(cfg, 0.99) == {"intermediate": 1, "heads": 4, "kv_heads": 1}


def test_sparse_plan_counts_remaining_weights(tmp_path) -> None:
    cfg = tiny_config(num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    p = plan(read_model_config(tmp_path), PruneConfig(strategy="semi"))
    linear = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128)
    assert p.original_params - p.pruned_params == linear // 2


def _llama3_8b():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    )  # fmt: skip


def test_round_to_rounds_the_kept_mlp_width_down_to_a_multiple() -> None:
    config = _llama3_8b()
    # ceil(14336 * 0.65) = 9319 channels go: 5,017 stay, an odd width for tensor cores.
    assert pruned_layer_widths(config, 0.65) == {"intermediate": 5017, "heads": 12, "kv_heads": 3}
    # Torch-Pruning's round_to: 5017 - 5017 % 128 = 4992 (39 x 128); heads are whole already.
    assert pruned_layer_widths(config, 0.65, 128) == {"intermediate": 4992, "heads": 12, "kv_heads": 3}
    assert pruned_layer_widths(config, 0.65, 64)["intermediate"] == 4992
    plain = plan(config, PruneConfig(strategy="structured", ratio=0.65))
    rounded = plan(config, PruneConfig(strategy="structured", ratio=0.65, round_to=128))
    assert {w["intermediate"] for w in plain.layers[4:30]} == {5017}
    assert {w["intermediate"] for w in rounded.layers[4:30]} == {4992}
    assert plain.layers[:4] == rounded.layers[:4] and rounded.layers[0]["intermediate"] == 14336
    # 25 channels x 3 linears x 4096 x 26 pruned layers fewer.
    assert plain.pruned_params - rounded.pruned_params == 25 * 3 * 4096 * 26
    assert rounded.round_to == 128 and plain.round_to == 1


def test_round_to_never_empties_a_layer() -> None:
    cfg = tiny_config()  # 128 channels
    assert pruned_layer_widths(cfg, 0.9, 64)["intermediate"] == 64  # 12 kept -> one multiple
    assert pruned_layer_widths(cfg, 0.5, 256)["intermediate"] == 128  # narrower than round_to: all of it
    assert pruned_layer_widths(cfg, 0.3, 32)["intermediate"] == 64  # 89 -> 64


def test_llama2_13b_figures_hold_with_round_to_one() -> None:
    p = plan(read_model_config(FIXTURE), PruneConfig(strategy="structured", ratio=0.65, round_to=1))
    assert p.pruned_params == 6_005_662_720 and p.layers[4]["intermediate"] == 4838
