"""The provider pipeline's steps, free of any orchestrator: one module per step group.

| module | steps |
|---|---|
| `inputs` | the original checkpoint, the packed corpus, calibration and evaluation blocks |
| `pruning` | prune (with the masks) |
| `alignment`, `torchrun` | align, in-process or launched under torchrun |
| `quantization` | the NF4 variant |
| `evaluation` | held-out perplexity of every model made, sizes |
| `publishing` | the version's files, card and manifest, to the bucket |

Each step takes its inputs' paths (the model steps: their own config section and the run's
`RunContext`), writes its output into a directory of the work dir keyed by the hash of its inputs
and settings, and returns small things (paths, dicts), so Prefect tasks wrap them in a line and a
re-run skips finished work. A step writes into a temporary directory and renames it when complete:
a crash never leaves a half-written output. The preflight lives in `loram_core.checks`.
"""

from loram_core.checks import preflight
from loram_core.steps._common import Progress, compute_device
from loram_core.steps.alignment import align, train_log
from loram_core.steps.evaluation import evaluate
from loram_core.steps.heldout import reference_loss
from loram_core.steps.inputs import (
    base_fingerprint,
    base_path,
    corpus_info,
    prepare_base,
    prepare_calibration,
    prepare_corpus,
    prepare_eval,
    text_blocks_info,
)
from loram_core.steps.pruning import prune
from loram_core.steps.publishing import code_version, pin_version, publish, publish_uri
from loram_core.steps.quantization import quantize

__all__ = [
    "Progress",
    "align",
    "base_fingerprint",
    "base_path",
    "code_version",
    "compute_device",
    "corpus_info",
    "evaluate",
    "pin_version",
    "preflight",
    "prepare_base",
    "prepare_calibration",
    "prepare_corpus",
    "prepare_eval",
    "prune",
    "publish",
    "publish_uri",
    "quantize",
    "reference_loss",
    "text_blocks_info",
    "train_log",
]
