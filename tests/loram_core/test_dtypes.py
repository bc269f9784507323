"""The published dtype: 16-bit (the base's bf16/fp16, else bf16; `publish.dtype` overrides), and the
sizes and perplexities the version reports are those of the files it publishes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loram_core import steps
from loram_core.config import load_config
from loram_core.dtypes import cast_checkpoint, config_dtype, published_dtype, save_pretrained_as
from loram_core.evaluate import perplexity
from loram_core.models import load_model
from loram_core.sizes import stored_sizes
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "flows"))
from test_provider_flow import TINY  # noqa: E402


@pytest.mark.parametrize(
    ("base", "setting", "expected"),
    [
        ("float32", "auto", torch.bfloat16),
        (None, "auto", torch.bfloat16),
        ("bfloat16", "auto", torch.bfloat16),
        ("float16", "auto", torch.float16),
        ("float16", "bfloat16", torch.bfloat16),
        ("bfloat16", "float16", torch.float16),
        ("bfloat16", "float32", torch.float32),
    ],
)
def test_published_dtype_rule(base: str | None, setting: str, expected: torch.dtype) -> None:
    assert published_dtype({"dtype": base} if base else {}, setting) == expected
    assert published_dtype({"torch_dtype": base} if base else {}, setting) == expected  # older configs


def test_published_dtype_refuses_an_unknown_setting() -> None:
    with pytest.raises(ValueError, match=r"publish.dtype='int8': expected one of auto, bfloat16"):
        published_dtype({}, "int8")


def _header_dtypes(model_dir: Path) -> set[str]:
    out = set()
    for file in model_dir.glob("*.safetensors"):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        out |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return out


def test_save_and_cast_write_the_dtype_and_declare_it(tmp_path: Path) -> None:
    model = tiny_model()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained_as(model, tmp_path / "one", torch.bfloat16)
    assert _header_dtypes(tmp_path / "one") == {"BF16"}
    assert config_dtype(json.loads((tmp_path / "one" / "config.json").read_text())) == "bfloat16"
    loaded = load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in reference.items())

    tiny_model().save_pretrained(tmp_path / "sharded", max_shard_size="50KB")  # float32, several files
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert cast_checkpoint(tmp_path / "sharded", torch.float16)
    assert _header_dtypes(tmp_path / "sharded") == {"F16"}
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == stored_sizes(tmp_path / "sharded", False)["tensor_bytes"]
    assert config_dtype(json.loads((tmp_path / "sharded" / "config.json").read_text())) == "float16"
    assert not cast_checkpoint(tmp_path / "sharded", torch.float16)  # already there: nothing rewritten
    reloaded = load_model(tmp_path / "sharded", dtype=torch.float32)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, reference[name].to(torch.float16).float()), name


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dtypes")


def _run(root: Path, name: str, *overrides: str) -> tuple[Path, dict, Path]:
    """The pipeline's own steps (no Prefect); returns the published version's folder, its manifest,
    and the evaluation blocks."""
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY + [
        f"workdir={root / 'work'}", f"base.cache_dir={root / 'cache'}", "device=cpu",
        f"publish.uri=file://{root / 'bucket'}", f"publish.version={name}", "base.demo.pretrain_steps=30",
        "align.steps=4", "quantize.enabled=false", "verify.enabled=false", *overrides,
    ])  # fmt: skip
    base = steps.prepare_base(cfg)
    blocks = steps.prepare_corpus(cfg, base)
    pruned = steps.prune(cfg.prune, cfg.context, base, steps.prepare_calibration(cfg, base, blocks))
    aligned = steps.align(cfg.align, cfg.context, pruned, blocks) if cfg.runs("align") else pruned
    evaluation = steps.evaluate(cfg, base, pruned, aligned, None, blocks)
    published = steps.publish(cfg, base, blocks, aligned, None, evaluation)
    version = Path(published["uri"].removeprefix("file://"))
    manifest = json.loads((version / "manifest.json").read_text())
    return version, manifest, Path(steps.prepare_eval(cfg, base, blocks))


def _fp16_base(root: Path) -> Path:
    """The demo base (float32) stored as float16, as a checkpoint directory."""
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY + [
        f"base.cache_dir={root / 'cache'}", "base.demo.pretrain_steps=30"])  # fmt: skip
    demo = Path(steps.prepare_base(cfg))
    out = root / "fp16-base"
    shutil.copytree(demo, out)
    load_model(demo).to(torch.float16).save_pretrained(out)
    assert _header_dtypes(out) == {"F16"}
    return out


def _assert_sizes_are_the_files(version: Path, manifest: dict, dtype: str) -> None:
    files = {f["path"]: f["size"] for f in manifest["files"]}
    weights = {p: s for p, s in files.items() if p.startswith("model/") and p.endswith(".safetensors")}
    params = manifest["params"]
    assert (
        params["stored_bytes"] == sum(weights.values()) == sum((version / p).stat().st_size for p in weights)
    )
    assert params["stored_dtype"] == dtype
    assert params["tensor_bytes"] == 2 * params["stored_params"]  # every tensor 16-bit
    assert params["hbm_gb"] * 2**30 == pytest.approx(params["tensor_bytes"], rel=1e-12)
    card = (version / "README.md").read_text()
    assert f"| stored bytes ({dtype} safetensors) | {params['stored_bytes']:,} |" in card
    assert "| memory, 16-bit as stored |" in card


def test_fp32_base_publishes_bf16_and_reports_the_files(root: Path) -> None:
    """At HEAD 07d12f4 `model/` was float32 (twice the bytes) under a card that said 16-bit."""
    version, manifest, eval_file = _run(root, "semi-fp32", "prune.strategy=semi")
    assert _header_dtypes(version / "model") == {"BF16"}
    assert json.loads((version / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_sizes_are_the_files(version, manifest, "bfloat16")
    heldout = load_file(eval_file)["blocks"]
    published = perplexity(load_model(version / "model"), heldout, 8)
    assert manifest["metrics"]["aligned_ppl"] == published  # scored on the files as published


def test_prune_only_version_publishes_the_rule_dtype_too(root: Path) -> None:
    version, manifest, eval_file = _run(root, "prune-only", "prune.strategy=random", "until=prune")
    assert "aligned_ppl" not in manifest["metrics"]
    assert _header_dtypes(version / "model") == {"BF16"}
    _assert_sizes_are_the_files(version, manifest, "bfloat16")
    heldout = load_file(eval_file)["blocks"]
    assert manifest["metrics"]["pruned_ppl"] == perplexity(load_model(version / "model"), heldout, 8)


def test_fp16_base_publishes_fp16_and_the_setting_overrides(root: Path) -> None:
    base = _fp16_base(root)
    version, manifest, _ = _run(root, "fp16", f"base.source={base}", "prune.strategy=random")
    assert _header_dtypes(version / "model") == {"F16"}
    _assert_sizes_are_the_files(version, manifest, "float16")
    version, manifest, _ = _run(
        root, "fp32", f"base.source={base}", "prune.strategy=random", "publish.dtype=float32"
    )
    assert _header_dtypes(version / "model") == {"F32"}
    assert manifest["params"]["tensor_bytes"] == 4 * manifest["params"]["stored_params"]
    assert "| memory at 16 bits (stored as float32) |" in (version / "README.md").read_text()
