"""The verification flow: the provider pipeline with the LoRA ablation on, so the version carries it.

Every step before it is keyed by its inputs, so on a config that already ran only the ablation and
the publication are new. The ablation runs before publish, so the evidence is part of the version
(its model card and manifest); a published version is never rewritten. Run it with:
    loram verify configs/demo.yaml
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from loram_core.config import parse_config
from loram_core.verify import require_alignment
from loram_provider.flows.provider import provider


@flow(name="loram-verify")
def verify(config: dict[str, Any]) -> dict[str, Any]:
    """Run the provider steps (cached) plus the LoRA ablation and publish; `config` is a `PipelineConfig` dict."""
    cfg = parse_config(config)
    cfg.verify.enabled = True
    require_alignment(cfg)
    return provider.fn(cfg.model_dump(mode="json"))
