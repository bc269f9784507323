"""LLM-Pruner's Taylor estimators and group reductions, pinned to a transcription of its code.

The reference is `LLMPruner/pruner/hf_llama_pruner.py` (`TaylorImportance.__call__`, `_reduce`),
the gradient loop of `hf_prune.py` / `llama3.py` (per-example `acc_grad`, then one batch
backward) and `MetaPruner`'s `consecutive_groups` sum over a head's `head_dim` positions.
"""

from __future__ import annotations

import pytest
import torch

from loram_core.prune.taylor import channel_scores, reduce_group, salience, taylor_group_scores
from tests.conftest import tiny_model

ESTIMATORS = ["param_first", "vector", "param_second", "param_mix"]
REDUCTIONS = ["sum", "mean", "max", "prod", "first"]


def _llm_pruner_gradients(model, examples: torch.Tensor, taylor: str) -> None:
    """hf_prune.py's loop: `.acc_grad` from one example at a time, then `.grad` of the whole batch."""
    n = examples.shape[0]
    for p in model.parameters():
        p.requires_grad_(True)
    if taylor in ("param_mix", "param_second"):
        for j in range(n):
            batch_input = examples[j].unsqueeze(0)
            model(batch_input, labels=batch_input).loss.backward()
            for p in model.parameters():
                p.grad = p.grad * p.grad / n
                if hasattr(p, "acc_grad"):
                    p.acc_grad += p.grad
                else:
                    p.acc_grad = p.grad.clone()
            model.zero_grad()
    model(examples, labels=examples).loss.backward()


def _llm_pruner_importance(members, taylor: str, reduction: str, head_dim: int | None) -> torch.Tensor:
    """TaylorImportance.__call__ for a group of linears: `members` are (linear, "out" | "in"), root first."""
    group_imp = []
    for layer, kind in members:
        sal = layer.weight * layer.weight.grad
        if taylor == "param_second":
            sal = layer.weight * layer.weight.acc_grad * layer.weight
        elif taylor == "param_mix":
            sal = sal - 0.5 * layer.weight * layer.weight.acc_grad * layer.weight
        dim = 1 if kind == "out" else 0
        local_norm = sal.sum(dim).abs() if taylor == "vector" else sal.abs().sum(dim)
        group_imp.append(local_norm.double())
    min_imp_size = min(len(imp) for imp in group_imp)
    assert all(len(imp) == min_imp_size for imp in group_imp)  # plain MHA: every member has n*hd channels
    group_imp = torch.stack(group_imp, dim=0)
    group_imp = {
        "sum": lambda t: t.sum(dim=0),
        "mean": lambda t: t.mean(dim=0),
        "max": lambda t: t.max(dim=0)[0],
        "prod": lambda t: torch.prod(t, dim=0),
        "first": lambda t: t[0],
    }[reduction](group_imp)
    if head_dim is not None:  # MetaPruner: consecutive_groups = head_dim
        group_imp = group_imp.view(-1, head_dim).sum(1)
    return group_imp


def _calib() -> torch.Tensor:
    return torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_scores_equal_llm_pruner_on_a_multi_head_model(estimator: str, reduction: str) -> None:
    ours = taylor_group_scores(tiny_model(num_key_value_heads=4), range(0, 2), _calib(), estimator,
                               reduction=reduction)  # fmt: skip
    ref_model = tiny_model(num_key_value_heads=4)
    _llm_pruner_gradients(ref_model, _calib(), estimator)
    for i, layer in enumerate(ref_model.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        # hf_prune.py: roots q_proj (attention, consecutive head_dim) and gate_proj (MLP).
        heads = _llm_pruner_importance(
            [(att.q_proj, "out"), (att.k_proj, "out"), (att.v_proj, "out"), (att.o_proj, "in")],
            estimator, reduction, head_dim=16,
        )  # fmt: skip
        channels = _llm_pruner_importance(
            [(mlp.gate_proj, "out"), (mlp.up_proj, "out"), (mlp.down_proj, "in")], estimator, reduction, None
        )
        torch.testing.assert_close(ours[i][0], channels, rtol=2e-4, atol=0)
        torch.testing.assert_close(ours[i][1], heads, rtol=2e-4, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gqa_group_scores_sum_query_heads_onto_the_kv_head_they_read(estimator: str, reduction: str) -> None:
    """GQA (4 query heads, 2 KV heads): the q rows and o columns of query heads 2h, 2h+1 align onto KV head h."""
    ours = taylor_group_scores(tiny_model(), range(0, 2), _calib(), estimator, reduction=reduction)
    ref_model = tiny_model()
    _llm_pruner_gradients(ref_model, _calib(), estimator)
    for i, layer in enumerate(ref_model.model.layers):
        att = layer.self_attn
        per = []
        for lin, dim in ((att.k_proj, 1), (att.v_proj, 1), (att.q_proj, 1), (att.o_proj, 0)):
            sal = salience(lin.weight, lin.weight.grad, getattr(lin.weight, "acc_grad", None), estimator)
            per.append(channel_scores(sal, dim, estimator))
        k, v, q, o = per
        # repeat_kv: query head j reads KV head j // 2; positions d of its head_dim align with d.
        q_on_kv = torch.stack([q[(2 * h) * 16 : (2 * h + 1) * 16] + q[(2 * h + 1) * 16 : (2 * h + 2) * 16]
                               for h in range(2)]).flatten()  # fmt: skip
        o_on_kv = torch.stack([o[(2 * h) * 16 : (2 * h + 1) * 16] + o[(2 * h + 1) * 16 : (2 * h + 2) * 16]
                               for h in range(2)]).flatten()  # fmt: skip
        # llama3.py's root is k_proj.
        expected = reduce_group(torch.stack([k, v, q_on_kv, o_on_kv]), reduction).view(2, 16).sum(1)
        torch.testing.assert_close(ours[i][1], expected, rtol=2e-4, atol=0)


def test_second_order_term_is_the_mean_of_per_block_squared_gradients() -> None:
    """Not the square of a batch gradient: on 6 blocks the two differ by far more than rounding."""
    calib = _calib()
    model = tiny_model()
    _llm_pruner_gradients(model, calib, "param_second")
    w = model.model.layers[1].mlp.down_proj.weight
    batch = tiny_model()
    batch(calib, labels=calib).loss.backward()
    g_batch = batch.model.layers[1].mlp.down_proj.weight.grad
    assert (w.acc_grad.sum() / (g_batch**2).sum()).item() > 2  # per-block squares sum to more
    ours = taylor_group_scores(tiny_model(), range(1, 2), calib, "param_second", batch_size=4)
    from_acc = channel_scores(w.detach() ** 2 * w.acc_grad, 0, "param_second")
    # down's in-channels are one member of the MLP group; with `first` only gate counts, so check via sum.
    gate = model.model.layers[1].mlp.gate_proj.weight
    up = model.model.layers[1].mlp.up_proj.weight
    expected = (
        channel_scores(gate.detach() ** 2 * gate.acc_grad, 1, "param_second")
        + channel_scores(up.detach() ** 2 * up.acc_grad, 1, "param_second")
        + from_acc
    )
    torch.testing.assert_close(ours[1][0], expected, rtol=2e-4, atol=0)


def test_reductions_on_a_small_group() -> None:
    members = torch.tensor([[1.0, 4.0], [3.0, 2.0], [2.0, 0.5]], dtype=torch.float64)
    assert reduce_group(members, "sum").tolist() == [6.0, 6.5]
    assert reduce_group(members, "mean").tolist() == [2.0, 6.5 / 3]
    assert reduce_group(members, "max").tolist() == [3.0, 4.0]
    assert reduce_group(members, "prod").tolist() == [6.0, 4.0]
    assert reduce_group(members, "first").tolist() == [1.0, 4.0]


def test_vector_takes_the_absolute_value_per_linear_and_channel() -> None:
    """`vector` sums signed W*g along each channel of one linear, then takes |.|: opposite signs cancel there."""
    sal = torch.tensor([[1.0, -1.0], [2.0, 3.0]])
    assert channel_scores(sal, 1, "vector").tolist() == [0.0, 5.0]
    assert channel_scores(sal, 1, "param_first").tolist() == [2.0, 5.0]
    assert channel_scores(sal, 0, "vector").tolist() == [3.0, 2.0]
    w, g, acc = torch.tensor([[2.0]]), torch.tensor([[0.5]]), torch.tensor([[3.0]])
    assert salience(w, g, acc, "param_second").item() == 12.0  # W acc W, no 1/2 (LLM-Pruner)
    assert salience(w, g, acc, "param_mix").item() == 1.0 - 6.0  # W g - W acc W / 2
