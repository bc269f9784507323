"""Steps chosen per run, without Prefect: alignment off, the 4-bit variant of the pruned model, written locally."""

from __future__ import annotations

from pathlib import Path

from loram_core import steps
from loram_core.bucket import verify_version
from loram_core.config import load_config
from loram_provider.flows.provider import summary_markdown
from tests.conftest import tiny_model, tiny_tokenizer
from tests.loram_core.test_checks import write_corpus

REPO = Path(__file__).resolve().parents[2]


def test_alignment_off_scores_each_model_once_and_names_the_nf4_variant_pruned(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_model(num_hidden_layers=4).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    write_corpus(tmp_path / "corpus.txt", docs=400)
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"base.source={base}", f"corpus.paths={tmp_path / 'corpus.txt'}", "corpus.seq_len=32",
         "corpus.eval_blocks=4", "calibration.samples=4", f"workdir={tmp_path / 'work'}",
         f"base.cache_dir={tmp_path / 'cache'}", "prune.keep_first=1", "prune.keep_last=1",
         "prune.strategy=random", "align.enabled=false", "publish.enabled=false", "publish.version=v1",
         "publish.uri=s3://not-used/when-off"],
    )  # fmt: skip
    steps.preflight(cfg)  # publishing off: the bucket is not checked
    assert not cfg.runs("align") and cfg.runs("quantize")
    blocks = steps.prepare_corpus(cfg, str(base))
    pruned = steps.prune(cfg.prune, cfg.context, str(base), steps.prepare_calibration(cfg, str(base), blocks))
    nf4 = steps.quantize(cfg.quantize, cfg.context, pruned)
    evaluation = steps.evaluate(cfg, str(base), pruned, pruned, nf4, blocks)
    m = evaluation["metrics"]
    assert set(m) == {"original_ppl", "pruned_ppl", "pruned_nf4_ppl", "heldout_tokens"}
    assert set(evaluation["compute"]["eval_seconds"]) == {"original_ppl", "pruned_ppl", "pruned_nf4_ppl"}
    p = evaluation["params"]
    assert p["stored_params"] == p["pruned_params"] == p["nonzero_params"] < p["original_params"]
    assert p["reduction"] == p["original_params"] / p["stored_params"] and "sparse_kernel_reduction" not in p
    published = steps.publish(cfg, str(base), blocks, pruned, nf4, evaluation)
    uri = published["uri"]
    assert published["status"] == "published"
    local = tmp_path / "work" / "local-bucket"
    assert uri == f"file://{local.absolute()}/demo-llama/v1"
    assert not (local / "demo-llama" / "LATEST").exists()  # publish.latest=auto: not for an unaligned version
    manifest = verify_version(f"file://{local}/demo-llama/v1")
    assert manifest.align == {"enabled": False} and manifest.quantize["enabled"] is True
    assert {"model/config.json", "model-nf4/config.json", "masks/masks.safetensors"} <= {
        f.path for f in manifest.files
    }
    summary = summary_markdown(uri, evaluation)
    assert "| pruned NF4 perplexity |" in summary and "aligned" not in summary and "recovered" not in summary
    assert "| stored parameters |" in summary and "non-zero" not in summary


def test_a_prune_only_run_with_its_own_calibration_and_eval_text_never_reads_the_corpus(
    tmp_path: Path,
) -> None:
    base = tmp_path / "base"
    tiny_model(num_hidden_layers=4).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    write_corpus(tmp_path / "calib.txt", docs=200)
    write_corpus(tmp_path / "eval.txt", docs=200)
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"base.source={base}", f"corpus.paths={tmp_path / 'no-such-corpus.txt'}", "corpus.seq_len=32",
         f"calibration.source={tmp_path / 'calib.txt'}", "calibration.samples=4",
         f"eval.source={tmp_path / 'eval.txt'}", "eval.blocks=4", f"workdir={tmp_path / 'work'}",
         f"base.cache_dir={tmp_path / 'cache'}", "prune.strategy=semi", "until=prune",
         "publish.enabled=false", "publish.version=v1"],
    )  # fmt: skip
    assert not cfg.reads_corpus()
    steps.preflight(cfg)  # the corpus file does not even exist: nothing reads it, so nothing checks it
    pruned = steps.prune(cfg.prune, cfg.context, str(base), steps.prepare_calibration(cfg, str(base), None))
    evaluation = steps.evaluate(cfg, str(base), pruned, pruned, None, None)
    assert set(evaluation["metrics"]) == {"original_ppl", "pruned_ppl", "heldout_tokens"}
    steps.publish(cfg, str(base), None, pruned, None, evaluation)
    assert not list((tmp_path / "work").glob("corpus-*"))  # no corpus step ran
    manifest = verify_version(f"file://{tmp_path / 'work' / 'local-bucket'}/demo-llama/v1")
    assert manifest.corpus == {"used": False} and manifest.until == "prune"
    for flag in ("align", "corpus"):  # with alignment, or evaluation on the corpus, it is read again
        other = (
            cfg.model_copy(update={"until": "quantize"})
            if flag == "align"
            else cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"source": "corpus"})})
        )
        assert other.reads_corpus()
