import pytest
import torch

from loram_core.config import PruneConfig
from loram_core.models import load_model
from loram_core.prune import load_masks, plan, prune_checkpoint, save_masks
from loram_core.prune.structured import apply_structured, kept_query_rows
from loram_core.prune.taylor import group_scores
from tests.conftest import tiny_model


def _zeroed_reference(model, layer_idx, kept_channels, kept_kv, group, hd):
    """The original model with the removed groups' output paths zeroed: must equal the pruned one."""
    layer = model.model.layers[layer_idx]
    with torch.no_grad():
        drop_ch = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
        drop_ch[kept_channels] = False
        layer.mlp.down_proj.weight[:, drop_ch] = 0
        drop_q = torch.ones(layer.self_attn.o_proj.in_features, dtype=torch.bool)
        drop_q[kept_query_rows(kept_kv, group, hd)] = False
        layer.self_attn.o_proj.weight[:, drop_q] = 0
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_layer_equals_original_with_removed_groups_zeroed(family: str) -> None:
    model = tiny_model(family)
    reference = _zeroed_reference(
        tiny_model(family), 1, torch.tensor([3, 17, 64, 100]), torch.tensor([1]), 2, 16
    )
    apply_structured(
        model.model.layers[1], _family(), model.config, torch.tensor([3, 17, 64, 100]), torch.tensor([1])
    )
    assert model.model.layers[1].self_attn.q_proj.weight.shape == (32, 64)
    assert model.model.layers[1].self_attn.k_proj.weight.shape == (16, 64)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 4)
    if family == "qwen2":
        assert model.model.layers[1].self_attn.k_proj.bias.shape == (16,)
    x = torch.randint(0, 128, (2, 24))
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def _family():
    from loram_core.models import FAMILIES

    return FAMILIES["llama"]


def test_plain_multi_head_attention_keeps_int_n_times_one_minus_r_heads(tmp_path) -> None:
    tiny_model(num_key_value_heads=4, num_hidden_layers=4).save_pretrained(tmp_path / "b")
    cfg = PruneConfig(strategy="random", ratio=0.3, keep_first=1, keep_last=1)
    masks = prune_checkpoint(tmp_path / "b", tmp_path / "p", cfg, torch.randint(0, 128, (4, 16)))
    model = load_model(tmp_path / "p")
    assert [len(masks.kept_kv_heads[i]) for i in (1, 2)] == [2, 2]  # int(4 * 0.7) = 2
    assert model.model.layers[1].self_attn.q_proj.out_features == 32
    assert model.model.layers[1].mlp.gate_proj.out_features == 128 - 39  # ceil(128 * 0.3) removed
    assert model.model.layers[0].mlp.gate_proj.out_features == 128


@pytest.mark.parametrize("strategy", ["random", "structured"])
def test_structured_checkpoint_matches_plan_and_masks_round_trip(tiny_checkpoint, tmp_path, strategy) -> None:
    cfg = PruneConfig(strategy=strategy, ratio=0.5, keep_first=1, keep_last=1, calib_samples=4)
    masks = prune_checkpoint(tiny_checkpoint, tmp_path / "p", cfg, torch.randint(0, 128, (4, 32)))
    save_masks(masks, tmp_path / "m.safetensors")
    loaded = load_masks(tmp_path / "m.safetensors")
    model = load_model(tmp_path / "p")
    expected = plan(model.config, cfg)
    assert sum(p.numel() for p in model.parameters()) == expected.pruned_params
    assert sorted(loaded.kept_channels) == [1, 2]
    for i in (1, 2):
        assert torch.equal(loaded.kept_channels[i], masks.kept_channels[i].int())
        assert loaded.kept_channels[i].dtype == torch.int32 and len(loaded.kept_channels[i]) == 64
        assert torch.all(loaded.kept_channels[i][1:] > loaded.kept_channels[i][:-1])  # sorted, unique
    assert model.config.loram["intermediate_sizes"] == [128, 64, 64, 128]


def test_group_scores_sum_over_coupled_weights() -> None:
    config = tiny_model().config
    sal = {
        n: torch.zeros(s)
        for n, s in {
            "q": (64, 64),
            "k": (32, 64),
            "v": (32, 64),
            "o": (64, 64),
            "gate": (128, 64),
            "up": (128, 64),
            "down": (64, 128),
        }.items()
    }
    sal["down"][:, 5] = 1.0  # channel 5 via down's column
    sal["gate"][7] = 2.0  # channel 7 via gate's row
    sal["o"][:, 40] = 3.0  # o column 40 = query head 2 = KV head 1 (group of 2, head_dim 16)
    channel, kv = group_scores(sal, config)
    assert channel[5] == 64 and channel[7] == 128 and channel.sum() == 192
    assert kv.tolist() == [0.0, 192.0]


def test_random_selection_is_seeded(tiny_checkpoint, tmp_path) -> None:
    cfg = PruneConfig(strategy="random", ratio=0.5, keep_first=1, keep_last=1, seed=3)
    calib = torch.randint(0, 128, (2, 16))
    a = prune_checkpoint(tiny_checkpoint, tmp_path / "a", cfg, calib)
    b = prune_checkpoint(tiny_checkpoint, tmp_path / "b", cfg, calib)
    c = prune_checkpoint(tiny_checkpoint, tmp_path / "c", cfg.model_copy(update={"seed": 4}), calib)
    assert torch.equal(a.kept_channels[1], b.kept_channels[1])
    assert not torch.equal(a.kept_channels[1], c.kept_channels[1])


@pytest.mark.parametrize("estimator", ["param_first", "vector", "param_second", "param_mix"])
def test_taylor_scores_are_the_same_with_gradient_checkpointing(estimator: str) -> None:
    from loram_core.prune.taylor import taylor_group_scores

    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    plain = taylor_group_scores(tiny_model(), range(0, 2), calib, estimator, batch_size=4)
    ckpt = taylor_group_scores(
        tiny_model(), range(0, 2), calib, estimator, batch_size=4, gradient_checkpointing=True
    )
    for i in (0, 1):
        torch.testing.assert_close(plain[i][0], ckpt[i][0])
        torch.testing.assert_close(plain[i][1], ckpt[i][1])
        assert plain[i][0].shape == (128,) and plain[i][1].shape == (2,) and (plain[i][0] >= 0).all()
    model = tiny_model()
    taylor_group_scores(model, range(0, 2), calib, estimator)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # leaves the model as found


@pytest.mark.parametrize(
    ("family", "estimator", "overrides"),
    [
        ("llama", "param_first", {}),
        ("llama", "vector", {}),
        ("qwen2", "param_second", {"tie_word_embeddings": True}),  # q/k/v biases, tied head
        ("llama", "param_mix", {"num_key_value_heads": 4}),  # plain multi-head
    ],
)
def test_streamed_taylor_scores_equal_the_whole_model_backward(
    tmp_path, family, estimator, overrides
) -> None:
    from loram_core.prune.taylor import taylor_group_scores, taylor_group_scores_streamed

    model = tiny_model(family, num_hidden_layers=4, **overrides)
    model.save_pretrained(tmp_path / "base")
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    whole = taylor_group_scores(model, range(1, 3), calib, estimator, batch_size=4)
    events = []
    streamed = taylor_group_scores_streamed(
        tmp_path / "base", range(1, 3), calib, estimator, batch_size=4, progress=lambda *e: events.append(e)
    )
    assert sorted(streamed) == [1, 2]
    for i in (1, 2):
        torch.testing.assert_close(streamed[i][0], whole[i][0], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(streamed[i][1], whole[i][1], rtol=1e-4, atol=1e-9)
    assert events[-1] == ("taylor", 7, 7)  # 4 layers forward, layers 3..1 backward


def test_structured_prune_is_the_same_streamed_or_whole_and_refuses_offloaded_scoring(
    tiny_checkpoint, tmp_path
) -> None:
    from loram_core.errors import ConfigError

    cfg = PruneConfig(strategy="structured", ratio=0.5, keep_first=1, keep_last=1, calib_samples=4)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    events = []
    streamed = prune_checkpoint(tiny_checkpoint, tmp_path / "s", cfg, calib, lambda *e: events.append(e))
    # One progress for the whole prune: 4 layers forward + 3 backward scored, then 4 cut.
    assert [done for _, done, _ in events] == list(range(1, 12)) and {t for *_, t in events} == {11}
    assert events[6][0] == "taylor" and events[-1] == ("prune", 11, 11)
    whole = prune_checkpoint(
        tiny_checkpoint, tmp_path / "w", cfg.model_copy(update={"device_map": "cpu"}), calib
    )
    for i in (1, 2):
        assert torch.equal(streamed.kept_channels[i], whole.kept_channels[i])
        assert torch.equal(streamed.kept_kv_heads[i], whole.kept_kv_heads[i])
    offload = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    offload.update({f"model.layers.{i}": "disk" if i == 2 else "cpu" for i in range(4)})
    with pytest.raises(ConfigError, match="offloads part of the model"):
        prune_checkpoint(
            tiny_checkpoint, tmp_path / "o", cfg.model_copy(update={"device_map": offload}), calib
        )
