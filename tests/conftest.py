"""Shared fixtures: tiny models built from config (2 layers, 64 dims) and the demo's pretrained base."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's flow runs (in-process and `loram` subprocesses) use their own Prefect home, so they neither
# read nor lock the user's ~/.prefect database, and two suites on one machine do not share one.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="loram-tests-prefect-"))
REPO = Path(__file__).resolve().parents[1]
# The S3 server fixtures (moto on loopback) for the bucket tests.
pytest_plugins = ["tests.s3_server"]


def tiny_config(family: str = "llama", **overrides) -> LlamaConfig | Qwen2Config:
    """A 2-layer, 64-dim GQA model config (4 heads, 2 KV heads, 128 channels)."""
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return (Qwen2Config if family == "qwen2" else LlamaConfig)(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> LlamaForCausalLM | Qwen2ForCausalLM:
    """A seeded, untrained tiny model of `tiny_config` (Qwen2 biases made non-zero), in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = (Qwen2ForCausalLM if family == "qwen2" else LlamaForCausalLM)(config)
    if family == "qwen2":  # stock init leaves biases at zero; make them matter in the tests
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.02)
    return model.eval()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A 4-layer tiny model saved with save_pretrained (weights and config, no tokenizer)."""
    path = tmp_path / "base"
    tiny_model(num_hidden_layers=4).save_pretrained(path)
    return path


@pytest.fixture
def pinned_threads():
    """One torch thread for the test: quality numbers then do not depend on OMP_NUM_THREADS or cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_base() -> Path:
    """The demo's pretrained base model (built once per machine, then cached; a few minutes)."""
    from loram_core.config import load_config
    from loram_core.demo import build_demo_base

    cfg = load_config(REPO / "configs" / "demo.yaml")
    return build_demo_base(cfg.base, cfg.corpus)


@pytest.fixture(scope="session")
def demo_blocks(demo_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo corpus packed with the demo tokenizer: (train, heldout) int32 blocks."""
    from loram_core import steps
    from loram_core.config import load_config
    from loram_core.data import load_blocks

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"workdir={tmp_path_factory.mktemp('work')}"])
    return load_blocks(steps.prepare_corpus(cfg, str(demo_base)))


def tiny_tokenizer():
    """A character-level fast tokenizer (vocab < 128) so that checkpoints in tests are complete."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["</s>", *"abcdefghijklmnopqrstuvwxyz .,"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def bare_manifest(staging: Path, name: str = "m", version: str = "v1"):
    """A manifest listing every file under `staging`, with empty settings: for storage tests."""
    from loram_core.manifest import Manifest, list_files

    empty: dict = {}
    return Manifest(name=name, version=version, created_at="2026-01-01T00:00:00+00:00", base=empty, corpus=empty,
                    prune=empty, align=empty, quantize=empty, params=empty, metrics=empty,
                    files=list_files(staging), code_version="test")  # fmt: skip
