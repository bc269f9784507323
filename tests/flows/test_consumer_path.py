"""The consumer's path end to end, as the version's own card tells it, and what `loram run` prints.

One tiny demo version is published by `loram run` (a subprocess, as a user runs it); then the
card's commands run verbatim in a fresh folder: pull, the LoRA training script, `recover` (no
`--original`: the manifest says where the original is), peft's `AutoPeftModelForCausalLM`, and
`merge`. The same bucket then gets a `--until prune` run (LATEST stays) and a fully cached re-run
(`unchanged`, nothing published).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flows.test_provider_flow import REPO, TINY

# The demo's verification, tiny: it trains a few LoRA steps (and its libraries warn while doing so).
TINY_VERIFY = ["verify.steps=4", "verify.train_examples=32", "verify.heldout_examples=8", "verify.batch_size=4",
               "verify.reference=false"]  # fmt: skip


def _env() -> dict[str, str]:
    """The environment a user has after activating the venv: `loram` on PATH, ephemeral Prefect."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # A fresh database on a busy machine takes what it takes: no limit of ours (CI's catches a hang).
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(10**9)
    env["COLUMNS"] = "200"  # rich wraps at the terminal's width; keep each table row on one line
    return env


def loram(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # No timeout: a busy machine may take minutes (a demo base pretrains); CI's own limit catches a hang.
    return subprocess.run(["loram", *args], capture_output=True, text=True, cwd=cwd, env=_env())


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> dict:
    """A tiny demo version published to a file:// bucket by `loram run` (its output kept)."""
    root = tmp_path_factory.mktemp("consumer")
    common = [*TINY, f"workdir={root / 'work'}", f"base.cache_dir={root / 'cache'}",
              f"publish.uri=file://{root / 'bucket'}"]  # fmt: skip
    run = loram("run", "configs/demo.yaml", *common, *TINY_VERIFY)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    latest = (root / "bucket" / "demo-llama" / "LATEST").read_text().strip()
    return {"root": root, "common": common, "run": run, "version": latest,
            "uri": f"file://{root / 'bucket'}/demo-llama"}  # fmt: skip


def _blocks(card: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", card, flags=re.S)


def _shell(lines: str, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Each command line of a ```bash block, as typed (comments after `#` are the shell's)."""
    done = []
    for line in lines.strip().splitlines():
        result = subprocess.run(line, shell=True, capture_output=True, text=True, cwd=cwd, env=_env())
        assert result.returncode == 0, (line, result.stderr[-3000:])
        done.append(result)
    return done


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_cards_commands_walk_the_consumer_path_with_no_flag_beyond_the_uri(
    bucket, tmp_path: Path
) -> None:
    """pull, train a LoRA, recover (original found by itself), AutoPeftModelForCausalLM, merge."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    version_dir = bucket["root"] / "bucket" / "demo-llama" / bucket["version"]
    card = (version_dir / "README.md").read_text()
    assert "ORIGINAL_DIR" not in card and "--original" not in _blocks(card, "bash")[1]
    get, recover, merge = _blocks(card, "bash")[:3]
    load, train, use = (_blocks(card, "python")[i] for i in (0, 1, 2))
    assert f"loram pull file://{bucket['root'] / 'bucket'}/demo-llama/{bucket['version']}" in get

    _shell(get, tmp_path)
    pulled = tmp_path / f"demo-llama-{bucket['version']}"
    assert (pulled / "model" / "config.json").is_file() and (pulled / "manifest.json").is_file()
    _python(load, tmp_path)
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", _python(train, tmp_path).stdout)]
    assert len(losses) == 10 and losses[-1] < losses[0]  # ten steps on two sentences: it learns them
    (result,) = _shell(recover, tmp_path)
    assert result.stderr == "" and result.stdout.startswith("recovered (zeroA)")  # no library's line
    config = json.loads((tmp_path / "my-lora-full" / "adapter_config.json").read_text())
    (original,) = [
        d for d in (bucket["root"] / "cache").glob("demo-base-*") if (d / "model.safetensors").is_file()
    ]
    assert config["base_model_name_or_path"] == str(original)  # the demo base, found by the manifest
    assert config["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                      "parent_library": "transformers.models.llama.modeling_llama"}  # fmt: skip
    assert "fingerprint" in result.stdout and "matches" in result.stdout

    _python(use, tmp_path)  # the card's own lines
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "my-lora-full")).eval()
    (merging,) = _shell(merge, tmp_path)
    assert merging.stderr == "" and merging.stdout.startswith("merged ")  # no "Loading weights" bar
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "my-model", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        lora, full, base = (m(input_ids=ids).logits for m in (peft_model, merged, plain))
    effect = (lora - base).abs().max().item()
    assert effect > 1e-3  # the recovered LoRA changes the original's output ...
    assert (full - lora).abs().max().item() < 0.1 * effect  # ... and the bf16 merge makes the same change


def test_loram_run_prints_only_its_own_lines_and_the_log_file_has_the_rest(bucket) -> None:
    """Prefect's lines, Python warnings and libraries' bars go to the run's log file, not the terminal."""
    run = bucket["run"]
    assert run.stderr == "", run.stderr[-3000:]
    lines = [line.rstrip() for line in run.stdout.splitlines() if line.strip()]
    table = re.compile(r"^\s*[┏┓┃┡┩│└┘┗┛┌┐├┤━─╇╈┳┻┬┴┼╭╮╰╯]")
    ours = [
        re.compile(r"^(prune|align|quantize|evaluate|pretrain-demo-base|publish|verify) +[━╸╺ ]+ \d+/\d+"),
        re.compile(
            r"^(prune|align|quantize|evaluate|publish): (done in \S+( \S+)? on cpu \(.+\)|reused .+)$"
        ),
        re.compile(r"^pretrain-demo-base: done in \S+( \S+)?: \S+/demo-base-[0-9a-f]{16}$"),
        re.compile(  # the publish note: what was sent, what the bucket had already
            r"^publish: (published|unchanged) file://\S+/demo-llama/\d{8}-\d{6}: \d+ files sent "
            r"\([\d,]+(\.\d+)? (B|KiB|MiB|GiB)\), \d+ already there$"
        ),
        re.compile(r"^(published|unchanged) file://\S+/demo-llama/\d{8}-\d{6}$"),  # where the version is
        re.compile(
            r"^\s+size$|^\s+LoRA trained small, inferred large \(held-out task loss, mean ± std over seeds, "
            r"lower is better\)$"
        ),
        re.compile(r"^computed on cpu \(.+\)$"),
        re.compile(r"^(alignment recovered|pruning did no measurable damage).+"),
        re.compile(r"^LATEST (now names this version|was left where it was) \(publish\.latest=.+\)$"),
        re.compile(r"^log: \S+/logs/run-\d{8}-\d{6}\.log$"),
    ]
    foreign = [line for line in lines if not table.match(line) and not any(p.match(line) for p in ours)]
    assert foreign == [], foreign
    for word in ("INFO", "WARNING", "Warning", "prefect", "Traceback", "it/s", "deprecated"):
        assert word not in run.stdout, word
    log = Path(lines[-1].removeprefix("log: ")).read_text()
    assert "Finished in state Completed()" in log  # Prefect's own lines are kept, in the file
    assert "Starting temporary server" in log
    notes = [line for line in lines if ": done in " in line]
    assert {n.split(":")[0] for n in notes} >= {"prune", "align", "quantize", "evaluate"}


def test_a_prune_only_run_leaves_latest_and_a_cached_rerun_publishes_nothing(bucket) -> None:
    root, common = bucket["root"], bucket["common"]
    versions = root / "bucket" / "demo-llama"
    latest = (versions / "LATEST").read_text().strip()
    before = sorted(p.name for p in versions.iterdir() if p.is_dir())

    prune_only = loram("run", "configs/demo.yaml", *common, "prune.strategy=structured", "--until", "prune")
    assert prune_only.returncode == 0, prune_only.stderr[-3000:]
    assert (versions / "LATEST").read_text().strip() == latest  # consumers still get the aligned version
    out = " ".join(prune_only.stdout.split())
    assert "LATEST was left where it was (publish.latest=auto moves LATEST only for an aligned and" in out
    (new,) = sorted(set(p.name for p in versions.iterdir() if p.is_dir()) - set(before))
    card = (versions / new / "README.md").read_text()
    assert "aligned pruned model" not in card and "the pruned model (not aligned)" in card
    assert "model-nf4" not in card and "as NF4 stores it" not in card
    manifest = json.loads((versions / new / "manifest.json").read_text())
    assert not any(f["path"].startswith("model-nf4/") for f in manifest["files"])
    from loram_core.config import PublishConfig

    if "max_shard_size" in PublishConfig.model_fields:  # the key arrives with the hub branch's re-sharding
        shards = [
            f["path"]
            for f in manifest["files"]
            if f["path"].startswith("model/") and f["path"].endswith(".safetensors")
        ]
        assert shards == ["model/model.safetensors"], shards  # a few MiB is one shard, not one per layer

    again = loram("run", "configs/demo.yaml", *common, *TINY_VERIFY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"unchanged file://{root / 'bucket'}/demo-llama/{latest}\n" in again.stdout
    assert "nothing was published" in again.stdout
    for step in ("prune", "align", "quantize"):
        assert re.search(
            rf"^{step}: reused \S+/{step}-[0-9a-f]{{16}} \(finished earlier", again.stdout, flags=re.M
        ), step
    assert re.search(
        r"^evaluate: reused \(finished earlier with the same inputs and settings\)$", again.stdout, flags=re.M
    )
    assert sorted(p.name for p in versions.iterdir() if p.is_dir()) == sorted(
        [*before, new]
    )  # no new version
    assert (versions / "LATEST").read_text().strip() == latest

    forced = loram("run", "configs/demo.yaml", *common, "prune.strategy=structured", "--until", "prune",
                   "publish.latest=true")  # fmt: skip
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert (versions / "LATEST").read_text().strip() == new  # asked for: it moves (same content: unchanged)
    assert "LATEST now names this version (publish.latest=true)" in " ".join(forced.stdout.split())
