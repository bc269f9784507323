"""Peer side: torch-pruning (the engine under LLM-Pruner) doing Taylor group pruning of a Llama.

Runs in the peers' venv (bench/.peers-venv), never imports loram_core. Prints one
`BENCH_RESULT {json}` line.

What torch-pruning does here, and what it cannot:
- MLP channels: its DependencyGraph finds the coupled group (gate/up rows, down columns) and
  `GroupTaylorImportance(group_reduction="sum", normalizer=None)` scores it with `sum |W * dL/dW|`,
  LLM-Pruner's `param_first`; `BasePruner` removes `I - int(I * (1 - r))` channels per layer.
- Attention heads: on transformers 5's GQA Llama the dependency search from q/k/v_proj never ends
  (`_fix_dependency_graph_non_recursive` keeps re-adding the RoPE slice/cat and repeat_kv nodes with
  new index sets; upstream: VainF/Torch-Pruning#527), and its GQA head mode would remove query heads
  inside every KV group, not whole KV groups as LLM-Pruner/LoRAM do. So `--heads none` leaves the
  attention dense (torch-pruning's own result), and `--heads manual` removes whole KV-head groups
  with torch-pruning's `prune_linear_out/in_channels` at the indices of the lowest group Taylor
  scores (LLM-Pruner's rule, computed in this script), to reach the same widths as ours.

    python bench/_peer_tp.py --base DIR --data FILE --importance taylor --heads manual --first 1 --last 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peer_common import Passes, Timer, emit, load_data, perplexity  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--importance", choices=["taylor", "random"], default="taylor")
    p.add_argument("--heads", choices=["none", "manual"], default="manual")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--first", type=int, default=1, help="leading layers left dense")
    p.add_argument("--last", type=int, default=1, help="trailing layers left dense")
    p.add_argument("--batch", type=int, default=4, help="calibration blocks per backward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="pruning passes (a fresh model each)")
    args = p.parse_args()

    import warnings

    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    # It warns that it would prune the RMSNorm weights' last dim: the hidden size is never pruned here.
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
    calib, heldout = load_data(args.data)

    def prune_once():
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        cfg = model.config
        layers = model.model.layers
        n = len(layers)
        pruned = range(args.first, n - args.last)
        # Only the MLP groups of the pruned layers may be roots: the hidden size stays (o/down
        # outputs, embeddings, head ignored), and the attention is handled below.
        ignored = [model.lm_head, model.model.embed_tokens]
        for i, layer in enumerate(layers):
            a = layer.self_attn
            ignored += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.down_proj]
            if i not in pruned:
                ignored += [layer.mlp.gate_proj, layer.mlp.up_proj]

        if args.importance == "taylor":
            want = {id(q) for i in pruned for q in layers[i].parameters() if q.dim() == 2}
            for q in model.parameters():
                q.requires_grad_(id(q) in want)
            model.zero_grad(set_to_none=True)
            for s in range(0, calib.shape[0], args.batch):
                batch = calib[s : s + args.batch].long()
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            importance = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
        else:
            importance = tp.importance.RandomImportance()

        example = {"input_ids": calib[:1].long(), "use_cache": False}
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs=example,
            importance=importance,
            pruning_ratio=args.ratio,
            ignored_layers=ignored,
            output_transform=lambda out: out.logits,
        )
        pruner.step()

        if args.heads == "manual":
            kv = cfg.num_key_value_heads
            group = cfg.num_attention_heads // kv
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            n_remove = int(kv * args.ratio)
            gen = torch.Generator().manual_seed(args.seed)
            for i in pruned:
                a = layers[i].self_attn
                if args.importance == "taylor":

                    def sal(lin):
                        return (lin.weight.detach() * lin.weight.grad).abs()

                    per_kv = (sal(a.k_proj).sum(1) + sal(a.v_proj).sum(1)).view(kv, hd).sum(1)
                    per_q = (sal(a.q_proj).sum(1) + sal(a.o_proj).sum(0)).view(kv, group * hd).sum(1)
                    drop = torch.topk(per_kv + per_q, n_remove, largest=False).indices
                else:
                    drop = torch.randperm(kv, generator=gen)[:n_remove]
                drop = drop.sort().values
                kv_rows = (drop[:, None] * hd + torch.arange(hd)).flatten().tolist()
                q_heads = (drop[:, None] * group + torch.arange(group)).flatten()
                q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten().tolist()
                tp.prune_linear_out_channels(a.k_proj, kv_rows)
                tp.prune_linear_out_channels(a.v_proj, kv_rows)
                tp.prune_linear_out_channels(a.q_proj, q_rows)
                tp.prune_linear_in_channels(a.o_proj, q_rows)
                # num_key_value_groups (q heads per kv head) is unchanged; the head count is
                # inferred from the projections' widths in forward.
        model.zero_grad(set_to_none=True)
        for q in model.parameters():
            q.requires_grad_(False)
        return model

    passes = Passes()
    for _ in range(args.repeat):
        torch.manual_seed(args.seed)
        with Timer() as t:
            model = prune_once()
        passes.add(t)
    cfg = model.config
    layers = model.model.layers

    widths = [
        {
            "intermediate": layer.mlp.gate_proj.out_features,
            "kv_heads": layer.self_attn.k_proj.out_features // (cfg.hidden_size // cfg.num_attention_heads),
        }
        for layer in layers
    ]
    ppl = perplexity(model, heldout)
    import importlib.metadata as md

    emit(
        {
            **passes.result(),
            "ppl": ppl,
            "params": sum(q.numel() for q in model.parameters()),
            "widths": widths,
            "version": f"torch-pruning {md.version('torch-pruning')}",
            "note": "heads: "
            + (
                "dense (torch-pruning cannot group GQA heads)"
                if args.heads == "none"
                else "KV groups removed by hand"
            ),
        }
    )


if __name__ == "__main__":
    main()
