"""Entry point of one alignment process under torchrun (several GPUs of a node, or several nodes).

    torchrun --standalone --nproc_per_node 8 -m loram_core.align_worker \\
        --config align-config.json --pruned PRUNED_DIR --blocks blocks.safetensors --workdir WORK --out OUT \\
        --dtype bfloat16

`config` is the `align` section (`AlignConfig`) as JSON. Rank 0 prints one JSON line per
progress report (`{"progress": {...}}`) for the launching task, and saves the final model to OUT
in `--dtype` (the published dtype: `loram_core.dtypes`).
Multi-node: replace `--standalone` by `--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    """One torchrun worker: train this rank's share of the alignment and (rank 0) save the model."""
    # argparse, not typer: this is an internal launcher interface, not a user CLI.
    parser = argparse.ArgumentParser(prog="loram_core.align_worker")
    for flag in ("--config", "--pruned", "--blocks", "--workdir", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    from loram_core.launch import die_with_parent

    die_with_parent()  # torchrun's agent starts workers in sessions of their own: go when it goes

    from loram_core import distributed
    from loram_core.align import train_causal_lm
    from loram_core.config import AlignConfig
    from loram_core.data import load_blocks
    from loram_core.dtypes import save_pretrained_as
    from loram_core.models import load_model
    from loram_core.prune import load_masks

    cfg = AlignConfig.model_validate_json(Path(args.config).read_text())
    info = distributed.setup()
    model = load_model(args.pruned).to(info.device)
    masks = load_masks(Path(args.pruned) / "masks" / "masks.safetensors").keep_masks() or None

    def report(event: dict) -> None:
        if info.main:
            print(json.dumps({"progress": event}), flush=True)

    result = train_causal_lm(
        model, load_blocks(args.blocks).train, cfg, checkpoint_dir=args.workdir, masks=masks, progress=report,
        dist_info=info,
    )  # fmt: skip
    model_sd = distributed.full_model_state(model) if info.world > 1 else None
    if info.main:
        final = load_model(args.pruned)  # a plain (unwrapped) copy to save from
        final.load_state_dict(model_sd if model_sd is not None else model.state_dict())
        save_pretrained_as(final, args.out, getattr(torch, args.dtype))
        (Path(args.out) / "train_result.json").write_text(json.dumps(result.to_dict()))
    if info.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
