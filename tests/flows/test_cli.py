"""The `loram` command line as a user meets it: exit codes and one-paragraph errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "llama-2-13b.config.json"


def loram(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # No timeout: a busy machine may take minutes (a demo base pretrains); CI's own limit catches a hang.
    return subprocess.run(
        [sys.executable, "-m", "loram_provider.flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("prune.ration=0.5", "unknown key `prune.ration`"),
        ("prune.ratio=1.5", "`prune.ratio` = 1.5: Input should be less than 1"),
        ("base.source=/nonexistent/model", "no model at '/nonexistent/model': config.json is missing"),
        ("prune.keep_first=5", "leave no layer to prune"),
    ],
)
def test_run_rejects_bad_input_before_any_work(tmp_path: Path, override: str, expected: str) -> None:
    result = loram("run", str(REPO / "configs" / "demo.yaml"), override, f"workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    assert expected in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) <= 6  # one paragraph (wrapped), no stack
    assert not (tmp_path / "w").exists()  # nothing started


@pytest.fixture(scope="module")
def user_inputs(tmp_path_factory) -> Path:
    """A tiny checkpoint with tokenizer and a text corpus, as a user would bring them."""
    from tests.conftest import tiny_model, tiny_tokenizer
    from tests.loram_core.test_checks import write_corpus

    root = tmp_path_factory.mktemp("inputs")
    tiny_model(num_hidden_layers=4).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    write_corpus(root / "corpus.txt")
    return root


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-4096])
    return path


# Inputs that used to end in a traceback minutes into a run; each (setup, overrides, message).
BAD_INPUTS = {
    "empty corpus": (lambda d: (d / "empty.txt").write_text(""), ["corpus.paths=[{d}/empty.txt]"],
                     "corpus.paths=['{d}/empty.txt'] matches only empty files"),
    "truncated weights": (lambda d: _truncate(d / "base" / "model.safetensors"), [],
                          "{d}/base/model.safetensors is truncated or corrupt"),
    "ftp bucket": (None, ["publish.uri=ftp://example.invalid/models"],
                   "publish.uri='ftp://example.invalid/models': ftp:// is known to fsspec but is not a bucket"),
    "missing text field": (None, ["corpus.format=json", "corpus.paths=[{d}/rows.jsonl]"],
                           "corpus.text_field='text' is not a field of '{d}/rows.jsonl'"),
    "corpus under one block": (None, ["corpus.seq_len=1000000"], "fewer than one block of corpus.seq_len=1000000"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_run_refuses_bad_user_files_before_any_work(user_inputs: Path, tmp_path: Path, case: str) -> None:
    import shutil

    d = tmp_path / "in"
    shutil.copytree(user_inputs, d)
    (d / "rows.jsonl").write_text('{"body": "a b c"}\n')
    setup, overrides, expected = BAD_INPUTS[case]
    if setup is not None:
        setup(d)
    args = [f"base.source={d / 'base'}", f"corpus.paths=[{d / 'corpus.txt'}]", "prune.keep_first=1",
            "prune.keep_last=1", f"publish.uri=file://{tmp_path / 'bucket'}"]  # fmt: skip
    args += [o.format(d=d) for o in overrides] + [f"workdir={tmp_path / 'w'}"]
    result = loram("run", str(REPO / "configs" / "demo.yaml"), *args)
    assert result.returncode == 2, result.stderr
    assert expected.format(d=d) in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) <= 6  # one paragraph (wrapped), no stack
    assert not (tmp_path / "w").exists() and not (tmp_path / "bucket").exists()  # nothing started


def test_plan_json_reproduces_the_13b_figure() -> None:
    result = loram("plan", str(FIXTURE), "--strategy", "structured", "--ratio", "0.65", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["original_params"] == 13_015_864_320 and plan["pruned_params"] == 6_005_662_720
    assert {"reduction", "hbm_gb", "hbm_gb_4bit", "layers"} <= set(plan)
    assert len(plan["layers"]) == 40


def test_inspect_fails_on_a_tampered_version(tmp_path: Path) -> None:
    from loram_core.bucket import publish_version
    from tests.conftest import bare_manifest

    staging = tmp_path / "s"
    (staging / "model").mkdir(parents=True)
    (staging / "model" / "w.safetensors").write_bytes(b"1234")
    m = bare_manifest(staging, name="n", version="v")
    publish_version(staging, m, f"file://{tmp_path}/b")
    ok = loram("inspect", f"file://{tmp_path}/b/n")
    assert ok.returncode == 0 and json.loads(ok.stdout)["version"] == "v"
    (tmp_path / "b" / "n" / "v" / "model" / "w.safetensors").write_bytes(b"12345")
    bad = loram("inspect", f"file://{tmp_path}/b/n/v")
    assert bad.returncode == 2 and "model/w.safetensors: 5 bytes, manifest says 4" in bad.stderr


def test_plan_of_a_pipeline_config_uses_its_prune_section_and_options_override() -> None:
    demo = json.loads(loram("plan", str(REPO / "configs" / "demo.yaml"), "--json").stdout)
    assert demo["strategy"] == "random" and demo["ratio"] == 0.65 and demo["pruned_layers"] == [1, 2, 3, 4]
    assert demo["original_params"] == 1_705_600  # what the demo base really has (tests/README agree)
    semi = json.loads(
        loram("plan", str(REPO / "configs" / "demo.yaml"), "--strategy", "semi", "--json").stdout
    )
    assert semi["strategy"] == "semi" and semi["layers"][2]["intermediate"] == 384


def test_plan_table_is_titled_with_the_resolved_strategy_and_ratio() -> None:
    demo = loram("plan", str(REPO / "configs" / "demo.yaml"))
    assert demo.returncode == 0, demo.stderr
    assert "random at 0.65" in demo.stdout and "None" not in demo.stdout
    model = loram("plan", str(FIXTURE))  # a model: unset options default to structured at 0.5
    assert "structured at 0.5" in model.stdout and "None" not in model.stdout


def test_run_until_prune_prunes_evaluates_once_and_publishes_no_alignment_rows(tmp_path: Path) -> None:
    """`--until prune` on the flow test's tiny demo: two models scored, nothing aligned anywhere."""
    from loram_core.bucket import verify_version
    from loram_provider.flows.provider import summary_markdown
    from tests.flows.test_provider_flow import TINY

    bucket = tmp_path / "bucket"
    result = loram("run", str(REPO / "configs" / "demo.yaml"), *TINY, f"workdir={tmp_path / 'w'}",
                   f"base.cache_dir={tmp_path / 'cache'}", f"publish.uri=file://{bucket}", "publish.version=v1",
                   "prune.strategy=semi", "base.demo.pretrain_steps=30", "--until", "prune")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "original" in out and "pruned" in out and "non-zero weights" in out and "weights memory" in out
    assert "reduction with a sparse kernel only" in out and "reduction as stored" in out and "1.00x" in out
    assert "aligned" not in out and "alignment" not in out and "NF4," not in out
    manifest = verify_version(f"file://{bucket}/demo-llama")
    assert manifest.until == "prune"
    assert set(manifest.metrics) == {"original_ppl", "pruned_ppl", "heldout_tokens"}
    assert set(manifest.compute["eval_seconds"]) == {"original_ppl", "pruned_ppl"}  # each scored once
    assert manifest.align == {"enabled": False} and manifest.quantize == {"enabled": False}
    assert not any(f.path.startswith("model-nf4/") for f in manifest.files)
    p = manifest.params
    assert p["stored_params"] == p["original_params"] > p["nonzero_params"]  # 2:4 stores its zeros
    assert (
        p["reduction"] == 1.0 and p["sparse_kernel_reduction"] == p["original_params"] / p["nonzero_params"]
    )
    assert p["nonzero_params"] <= p["pruned_params"] < p["original_params"]  # 2:4 of layer 1's linears
    # The data sections, with hashes of what was used: 8 calibration and 8 held-out blocks of 64 tokens.
    c, e = manifest.calibration, manifest.eval
    assert (c["source"], c["samples"], c["blocks"], c["seq_len"], c["tokens"]) == ("corpus", 8, 8, 64, 512)
    assert (e["source"], e["blocks"], e["tokens"]) == ("corpus", 8, 512) and manifest.metrics[
        "heldout_tokens"
    ] == 512
    for section in (c, e):
        assert all(len(section[k]) == 64 for k in ("files_sha256", "tokens_sha256", "text_sha256"))
    assert c["tokens_sha256"] != e["tokens_sha256"]
    card = (bucket / "demo-llama" / "v1" / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("|")]
    assert not any("align" in row or "nf4_ppl" in row for row in rows)
    assert any(row.startswith("| pruned_ppl |") for row in rows)
    summary = summary_markdown(manifest.version, {"metrics": manifest.metrics, "params": p})
    assert "aligned" not in summary and "alignment" not in summary and "| pruned perplexity |" in summary


def test_every_command_prints_its_help() -> None:
    """`--help` of every registered command renders (rich once read `[/<version>]` as markup and crashed)."""
    import typer
    from typer.testing import CliRunner

    from loram_provider.flows.cli import app

    commands = typer.main.get_command(app).commands
    assert {"run", "inspect", "plan", "recover", "merge"} <= set(commands)
    for args in [["--help"]] + [[name, "--help"] for name in commands]:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0 and result.exception is None, (args, result.output)
        assert "Usage" in result.output
    assert "<bucket>/<name>[/<version>]" in CliRunner().invoke(app, ["inspect", "--help"]).output


def test_unreachable_prefect_api_is_one_paragraph_before_any_work(tmp_path: Path) -> None:
    import os

    url = "http://127.0.0.1:9/api"  # the discard port: nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "loram_provider.flows.cli", "run", str(REPO / "configs" / "demo.yaml"), f"workdir={tmp_path / 'w'}"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PREFECT_API_URL": url},
    )  # fmt: skip
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert f"the Prefect API at PREFECT_API_URL={url} does not answer" in message
    assert "unset PREFECT_API_URL" in message and "prefect server start" in message
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "w").exists()  # nothing started


# `loram run` with a step that fails with a handled error (the code names the value and the fix).
FAILING_STEP = """
import sys
import loram_core.steps
from loram_core.errors import LoramError

def fail(*args, **kwargs):
    raise LoramError("the base went away: point base.source at it again.")

loram_core.steps.prepare_base = fail
from loram_provider.flows.cli import app
app(sys.argv[1:], prog_name="loram")
"""


@pytest.mark.parametrize("debug", [False, True])
def test_handled_error_in_a_task_prints_one_paragraph_and_logs_the_traceback(
    tmp_path: Path, debug: bool
) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # ephemeral mode
    # A fresh database on a busy machine takes what it takes: no limit of ours (CI's catches a hang).
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(10**9)
    args = ["run", str(REPO / "configs" / "demo.yaml"), f"workdir={tmp_path / 'w'}"] + (
        ["--debug"] if debug else []
    )
    result = subprocess.run([sys.executable, "-c", FAILING_STEP, *args], capture_output=True, text=True,
                            cwd=REPO, env=env)  # fmt: skip
    assert result.returncode == 2, result.stderr
    if debug:  # Prefect's own logging, tracebacks included, and the paragraph last
        assert result.stderr.count("Traceback (most recent call last)") == 2
        assert "error: the base went away" in result.stderr and not (tmp_path / "w" / "logs").exists()
        return
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("the base went away") == 1  # the error paragraph only
    logs = list((tmp_path / "w" / "logs").glob("run-*.log"))
    assert len(logs) == 1 and f"full log with tracebacks: {logs[0]}" in " ".join(result.stderr.split())
    text = logs[0].read_text()
    assert text.count("Traceback (most recent call last)") == 2  # the task run's and the flow run's
    assert "LoramError: the base went away" in text
