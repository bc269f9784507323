"""Hub datasets and `corpus.mix`, offline: from a datasets cache built on disk and from parquet files.

Two sources of different text ("web" prose and "math" equations): a mix draws each to its share
of the token budget, interleaved by its seed; a run with a mix of two cached datasets records the
tokens drawn from each in its manifest; `hf://datasets/ORG/NAME` works as a corpus and a calibration
source; a dataset the cache does not hold is one preflight error.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from loram_core import steps
from loram_core.checks import preflight
from loram_core.config import CorpusMix, load_config, parse_config
from loram_core.corpus_mix import draw
from loram_core.errors import LoramError
from tests.hub_cache import add_to_datasets_cache, paragraphs, write_original

REPO = Path(__file__).resolve().parents[2]


def _equations(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(
            f"let x{j} = {rng.randint(1, 99)} + {rng.randint(1, 99)} * y{j};"
            for j in range(rng.randint(4, 12))
        )
        for _ in range(n)
    ]


def _parquet(path: Path, texts: list[str]) -> Path:
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mix")
    web = _parquet(root / "web.parquet", paragraphs(300, 10))
    math = _parquet(root / "math.parquet", _equations(200, 11))
    small = _parquet(root / "small.parquet", _equations(5, 12))
    cache = root / "datasets-cache"
    add_to_datasets_cache(cache, "acme/tiny-web", [web])
    add_to_datasets_cache(cache, "acme/tiny-math", [math])
    base = write_original(root / "base")
    return {"root": root, "web": web, "math": math, "small": small, "cache": cache, "base": base,
            "tokenizer": AutoTokenizer.from_pretrained(base)}  # fmt: skip


@pytest.fixture
def offline(data: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(data["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return data


def _mix(**kw) -> CorpusMix:
    return parse_config({"corpus": {"mix": kw}}).corpus.mix


def test_a_mix_draws_each_source_to_its_token_share_interleaved_by_its_seed(
    offline: dict, tmp_path: Path
) -> None:
    tok = offline["tokenizer"]
    mix = _mix(tokens=8000, seed=3, sources=[
        {"dataset": {"name": "acme/tiny-web", "streaming": True}, "weight": 3},
        {"paths": [str(offline["math"])], "weight": 1}])  # fmt: skip
    docs, origin, record = draw(mix, tok, tmp_path)
    again = draw(mix, tok, tmp_path)
    assert (docs, origin) == again[:2]  # deterministic
    other = draw(mix.model_copy(update={"seed": 4}), tok, tmp_path)
    assert other[1] != origin and other[2]["sources"][0]["target_tokens"] == 6000
    longest = max(len(tok(d, add_special_tokens=False).input_ids) for d in docs)
    for i, (src, target) in enumerate(zip(record["sources"], (6000, 2000), strict=True)):
        counted = sum(
            len(tok(d, add_special_tokens=False).input_ids)
            for d, o in zip(docs, origin, strict=True)
            if o == i
        )
        assert src["tokens"] == counted and src["target_tokens"] == target
        assert target <= counted < target + longest  # the document that crosses the share is kept whole
        assert src["documents"] == origin.count(i) and src["passes"] == 1
    assert record["sources"][0]["source"] == "acme/tiny-web:train" and record["drawn_tokens"] == sum(
        s["tokens"] for s in record["sources"])  # fmt: skip
    assert {0, 1} <= set(origin[:10])  # interleaved, not one source after the other
    web_share = sum(1 for o in origin[: len(origin) // 2] if o == 0) / (len(origin) // 2)
    assert 0.4 < web_share < 0.95  # the first half already mixes both (weights 3:1 in tokens)


def test_a_source_smaller_than_its_share_starts_over_or_ends_the_mix(offline: dict, tmp_path: Path) -> None:
    tok = offline["tokenizer"]
    sources = [{"paths": [str(offline["web"])], "weight": 1}, {"paths": [str(offline["small"])], "weight": 1}]
    over = draw(_mix(tokens=4000, sources=sources, stopping="all_exhausted"), tok, tmp_path)[2]
    assert over["sources"][1]["passes"] > 1 and over["sources"][1]["tokens"] >= 2000
    assert over["stopped_by"] is None
    first = draw(_mix(tokens=4000, sources=sources, stopping="first_exhausted"), tok, tmp_path)[2]
    assert first["stopped_by"] == str(offline["small"]) and first["sources"][1]["documents"] == 5
    assert first["sources"][1]["tokens"] < 2000


def _cfg(data: dict, tmp: Path, *extra: str):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"base.source={data['base']}", "corpus.seq_len=64", "corpus.eval_blocks=2", "calibration.samples=2",
        "until=prune", f"workdir={tmp / 'work'}", f"base.cache_dir={tmp / 'cache'}", "device=cpu",
        "prune.keep_first=1", "prune.keep_last=1", f"publish.uri=file://{tmp / 'bucket'}", "publish.version=v1",
        *extra,
    ])  # fmt: skip


MIX_OF_TWO = (
    "corpus.mix={tokens: 9000, seed: 1, sources: ["
    "{dataset: {name: acme/tiny-web, streaming: true}, weight: 0.5, label: web}, "
    "{dataset: {name: acme/tiny-math}, weight: 0.5, label: math}]}"
)


def test_a_run_with_a_mix_of_two_cached_datasets_records_the_tokens_of_each(
    offline: dict, tmp_path: Path
) -> None:
    from loram_core.bucket import verify_version

    cfg = _cfg(offline, tmp_path, MIX_OF_TWO)
    preflight(cfg)
    base = steps.prepare_base(cfg)
    blocks = steps.prepare_corpus(cfg, base)
    pruned = steps.prune(cfg.prune, cfg.context, base, steps.prepare_calibration(cfg, base, blocks))
    evaluation = steps.evaluate(cfg, base, pruned, pruned, None, blocks)
    steps.publish(cfg, base, blocks, pruned, None, evaluation)
    manifest = verify_version(f"file://{tmp_path / 'bucket'}/demo-llama/v1")
    mix = manifest.corpus["mix"]
    web, math = mix["sources"]
    assert (web["source"], math["source"]) == ("web", "math")
    assert (
        web["tokens"] >= 4500
        and math["tokens"] >= 4500
        and mix["drawn_tokens"] == web["tokens"] + math["tokens"]
    )
    assert manifest.corpus["documents"] == web["documents"] + math["documents"]
    assert manifest.corpus["train_tokens"] + manifest.corpus["heldout_tokens"] <= mix["drawn_tokens"] + manifest.corpus[
        "documents"]  # every drawn token (and one EOS per document) at most  # fmt: skip
    # The same settings read the drawn mix back instead of drawing it again.
    assert steps.prepare_corpus(cfg, base) == blocks


def test_hf_datasets_uris_are_a_corpus_and_a_calibration_source(offline: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from loram_core.data import read_documents, resolve_patterns

    (file,) = resolve_patterns(["hf://datasets/acme/tiny-web"], tmp_path, "corpus.paths")
    assert file.endswith(".parquet") and Path(file).parent == tmp_path / "datasets"
    assert [d.text() for d in read_documents([file], "auto", "text")] == paragraphs(300, 10)  # a record each
    assert resolve_patterns(["hf://datasets/acme/tiny-web"], tmp_path, "corpus.paths") == [
        file
    ]  # written once
    cfg = _cfg(offline, tmp_path, "corpus.paths=hf://datasets/acme/tiny-web",
               "calibration.source=hf://datasets/acme/tiny-math")  # fmt: skip
    preflight(cfg)
    base = steps.prepare_base(cfg)
    blocks = steps.prepare_corpus(cfg, base)
    calib = load_file(steps.prepare_calibration(cfg, base, blocks))["blocks"]
    assert calib.shape == (2, 64)
    text = offline["tokenizer"].decode(calib[0].tolist())
    assert "let x" in text and "+" in text  # calibration text came from the math dataset


def test_a_dataset_the_cache_does_not_hold_is_one_preflight_error(offline: dict, tmp_path: Path) -> None:
    cfg = _cfg(offline, tmp_path, "corpus.mix={tokens: 100, sources: [{dataset: {name: acme/tiny-web}, weight: 1}, "
               "{dataset: {name: acme/not-cached, streaming: true}, weight: 1}]}")  # fmt: skip
    with pytest.raises(
        LoramError, match=r"corpus.mix.sources\[1\]: dataset 'acme/not-cached'.*datasets cache"
    ) as err:
        preflight(cfg)
    assert "load_dataset('acme/not-cached')" in str(err.value)
    column = _cfg(offline, tmp_path, "corpus.mix={tokens: 100, sources: [{dataset: {name: acme/tiny-web, "
                  "text_field: body}, weight: 1}]}")  # fmt: skip
    with pytest.raises(LoramError, match=r"text_field='body' is not a column .*\['id', 'text'\]"):
        preflight(column)


def test_mix_settings_are_checked_when_the_config_loads() -> None:
    with pytest.raises(LoramError, match="either `paths`"):
        _mix(tokens=10, sources=[{"weight": 1}])
    with pytest.raises(LoramError, match="corpus.paths=.*and corpus.mix"):
        parse_config(
            {"corpus": {"paths": ["a.txt"], "mix": {"tokens": 10, "sources": [{"paths": "b", "weight": 1}]}}}
        )
    with pytest.raises(LoramError, match="weight"):
        _mix(tokens=10, sources=[{"paths": "b", "weight": 0}])


def test_the_paper_mix_preset_names_the_reference_sources_and_shares() -> None:
    cfg = load_config(REPO / "configs" / "loram-alignment-mix.yaml")
    mix = cfg.corpus.mix
    assert [(s.dataset.name, s.weight) for s in mix.sources] == [
        ("HuggingFaceFW/fineweb", 0.5), ("open-web-math/open-web-math", 0.5)]  # fmt: skip
    assert all(s.dataset.streaming for s in mix.sources) and mix.stopping == "all_exhausted"
    assert mix.tokens == 105_000_000 and cfg.base.source == "meta-llama/Llama-3.1-8B"
