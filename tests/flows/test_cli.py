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
    ok = loram("inspect", f"file://{tmp_path}/b/n", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["version"] == "v"
    summary = loram(
        "inspect", f"file://{tmp_path}/b/n"
    )  # a short summary a person reads, not 290 lines of JSON
    assert summary.returncode == 0 and len(summary.stdout.splitlines()) <= 12, summary.stdout
    assert "n/v" in summary.stdout and "every size and sha256 matches the manifest" in summary.stdout
    assert f"loram pull file://{tmp_path}/b/n/v ./n-v" in summary.stdout
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


def test_plan_shows_round_to_and_says_when_owl_decides_its_ratios(tmp_path: Path) -> None:
    llama3 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(llama3))
    rounded = loram("plan", str(tmp_path), "--ratio", "0.65", "--round-to", "128")
    assert rounded.returncode == 0, rounded.stderr
    assert "rounded down to multiples of 128 (prune.round_to): 5,017 -> 4,992 channels" in " ".join(
        rounded.stdout.split()
    )
    (tmp_path / "owl.yaml").write_text("prune:\n  strategy: unstructured\n  layerwise: owl\n")
    owl = loram("plan", str(tmp_path / "owl.yaml"))
    assert owl.returncode == 0, owl.stderr
    text = " ".join(owl.stdout.split())
    assert "OWL (prune.owl_m=5, prune.owl_lambda=0.08) decides them at prune time" in text
    assert "0.42..0.58 and averaging 0.5" in text and "loram.layer_ratios" in text


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
    out = " ".join(result.stdout.split())
    # The publish note says why LATEST stayed (an unaligned version); nothing else speaks of alignment.
    why = ("LATEST was left where it was (publish.latest=auto moves LATEST only for an aligned and "
           "NF4-quantized version, and this one has not aligned and no NF4 variant; set "
           "publish.latest=true to move it anyway)")  # fmt: skip
    assert why in out
    out = out.replace(why, "")
    assert "original" in out and "pruned" in out and "non-zero weights" in out and "weights memory" in out
    assert "reduction with a sparse kernel only" in out and "reduction as stored" in out and "1.00x" in out
    assert "aligned" not in out and "alignment" not in out and "NF4," not in out
    assert not (
        bucket / "demo-llama" / "LATEST"
    ).exists()  # publish.latest=auto: not for a prune-only version
    manifest = verify_version(f"file://{bucket}/demo-llama/v1")
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


def test_a_bad_key_in_the_file_is_blamed_on_the_file_with_a_suggestion(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  strategy: random\n  ration: 0.3\n")
    result = loram("run", str(bad), f"workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert f"unknown key `prune.ration` (in {bad}); did you mean `prune.ratio`?" in message
    assert "command line" not in message


def test_pull_never_replaces_another_version_silently(tmp_path: Path) -> None:
    from loram_core.bucket import publish_version
    from tests.conftest import bare_manifest

    for version in ("v1", "v2"):
        staging = tmp_path / f"s-{version}"
        (staging / "model").mkdir(parents=True)
        (staging / "model" / "w.safetensors").write_bytes(version.encode() * 100)
        manifest = bare_manifest(staging, name="n", version=version)
        manifest.created_at = f"2026-01-0{version[1]}T00:00:00+00:00"
        publish_version(staging, manifest, f"file://{tmp_path}/b")
    dest = tmp_path / "dest"
    assert loram("pull", f"file://{tmp_path}/b/n/v1", str(dest)).returncode == 0
    again = loram("pull", f"file://{tmp_path}/b/n/v1", str(dest))  # the same version: pulled again in place
    assert again.returncode == 0, again.stderr
    other = loram("pull", f"file://{tmp_path}/b/n", str(dest))  # LATEST is v2
    assert other.returncode == 2
    message = " ".join(other.stderr.split())
    assert f"'{dest}' holds n/v1 (an earlier pull); pulling n/v2 would replace it. Pass --force" in message
    assert json.loads((dest / "manifest.json").read_text())["version"] == "v1"  # untouched
    forced = loram("pull", f"file://{tmp_path}/b/n", str(dest), "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((dest / "manifest.json").read_text())["version"] == "v2"


def test_run_summary_keeps_sentences_out_of_table_cells_and_links_absolute(
    tmp_path: Path, monkeypatch
) -> None:
    """The UI clipped the alignment sentence inside a table cell and the link was `file://./bucket/...`."""
    from loram_provider.flows.provider import summary_markdown

    monkeypatch.chdir(tmp_path)
    metrics = {"original_ppl": 60.2, "pruned_ppl": 68.74, "aligned_ppl": 57.0}
    params = {"original_params": 1_705_600, "pruned_params": 1_223_296, "stored_params": 1_223_296,
              "stored_bytes": 4_900_000, "reduction": 1.39, "hbm_gb": 0.0023, "hbm_gb_4bit": 0.0006,
              "hbm_gb_4bit_actual": 0.0013, "pruned_layers": [1, 2]}  # fmt: skip
    latest = {"moved": False, "reason": "publish.latest=auto moves LATEST only for an aligned and NF4-quantized "
                                        "version, and this one has no NF4 variant"}  # fmt: skip
    text = summary_markdown(
        "file://./bucket/demo-llama/v1", {"metrics": metrics, "params": params}, "published", latest
    )
    assert text.startswith(f"## Published `file://{tmp_path.resolve()}/bucket/demo-llama/v1`")
    cells = [line for line in text.splitlines() if line.startswith("|")]
    assert not any("alignment recovered" in c or "LATEST" in c for c in cells)
    assert "\nAlignment recovered 137% of the pruning damage" in text
    assert "`LATEST` was left where it was (publish.latest=auto moves LATEST only" in text
    assert "| memory, 16-bit as stored | 2.36 MiB |" in text and "as NF4 stores it" not in text  # no NF4 made
    assert not any(c.startswith("| -") for c in cells)


def test_loram_original_rebuilds_the_demo_base_with_the_fingerprint_the_manifest_records(
    tmp_path: Path,
) -> None:
    """The demo base is not on the consumer's machine: `loram original` says so and names `--build`,
    which pretrains it from the manifest's settings to the same bytes (one machine, same threads)."""
    import shutil

    from loram_core.config import BaseConfig, CorpusConfig
    from loram_core.data import demo_corpus_file
    from loram_core.demo import build_demo_base
    from loram_core.steps.inputs import base_fingerprint
    from tests.conftest import bare_manifest

    demo = BaseConfig(demo={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "seq_len": 32,
                            "pretrain_steps": 3, "batch_size": 4}, cache_dir=str(tmp_path / "publisher"))  # fmt: skip
    built = build_demo_base(demo, CorpusConfig())  # on the publisher's machine
    consumer = tmp_path / "consumer"
    consumer.mkdir()  # the stdlib corpus is byte-identical for a Python version: copied, not rebuilt
    shutil.copy(demo_corpus_file(demo.cache_dir), consumer / demo_corpus_file(demo.cache_dir).name)
    version = tmp_path / "version"
    version.mkdir()
    manifest = bare_manifest(version, name="demo-llama", version="v1")
    manifest.base = {"source": "demo", "fingerprint": base_fingerprint(str(built)), "original": {
        "kind": "demo", "path": str(consumer / built.name), "cache_dir": str(consumer),
        "demo": demo.demo.model_dump(mode="json"), "heldout_fraction": 0.05, "heldout_unit": "documents"}}  # fmt: skip
    (version / "manifest.json").write_text(manifest.model_dump_json())
    missing = loram("original", str(version))
    assert missing.returncode == 2
    assert f"Rebuild it with `loram original --build {version}`" in " ".join(missing.stderr.split())
    rebuilt = loram("original", "--build", str(version))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.strip() == str(consumer / built.name)
    assert f"fingerprint {base_fingerprint(str(built))} matches" in rebuilt.stderr
    other = version.parent / "other"
    other.mkdir()
    manifest.base = {"source": "/models/llama", "original": {"kind": "path", "path": "/models/llama"}}
    (other / "manifest.json").write_text(manifest.model_dump_json())
    refused = loram("original", "--build", str(other))
    assert refused.returncode == 2 and "--build rebuilds only the demo base" in " ".join(
        refused.stderr.split()
    )
