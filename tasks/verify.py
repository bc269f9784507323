"""The `verify` step as a Prefect task: the LoRA ablation, and its table as an artifact."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from loram_core import verify as v
from loram_core.config import PipelineConfig
from loram_provider.tasks._gpu import gpu_slots


@task(cache_policy=NO_CACHE)
def verify(cfg: PipelineConfig, base_dir: str, pruned_dir: str, aligned_dir: str, blocks_file: str) -> dict:
    """Train a LoRA on the published base, recover it, score it on the original; publish the table as an artifact."""
    with gpu_slots(cfg) as leased:
        result = v.verify(leased, base_dir, pruned_dir, aligned_dir, blocks_file)
    create_table_artifact(
        key="lora-verification",
        table=ablation_table(result),
        description="LoRAM ablation: held-out task loss of a LoRA trained small and run large (mean ± std over seeds; "
        "lower is better; vs LoRAM: beyond the spread when larger than the two stds summed)",
    )
    loram = next(r for r in result["rows"] if r["key"] == "loram")
    original = next(r for r in result["rows"] if r["key"] == "original")
    get_run_logger().info("verify: task loss %.3f on the original, %.3f with the recovered LoRA",
                          original["loss"], loram["loss"])  # fmt: skip
    return result


def ablation_table(result: dict) -> list[dict]:
    """The artifact's rows: one per ablation setting, loss as mean ± std over seeds, the difference to LoRAM.

    The UI renders each cell as markdown, where a lone "-" is a bullet: the row without a LoRA says
    so, and LoRAM's own difference to itself is an en dash.
    """
    from loram_core.verify.report import table_rows

    def cell(column: str, value: str) -> str:
        if value != "-":
            return value
        return "no LoRA" if column == "LoRA trained on" else "\u2013"

    return [{col: cell(col, value) for col, value in row.items()} for row in table_rows(result)]
