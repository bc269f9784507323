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
