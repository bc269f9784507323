"""Calibration and eval sections: where their blocks come from, their shapes, hashes and the token split."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from loram_core import steps
from loram_core.config import load_config
from loram_core.data import (
    Document,
    heldout_by_tokens,
    is_heldout,
    load_blocks,
    make_blocks,
    pack_ids,
    tokenize,
)
from loram_core.errors import ConfigError
from loram_core.sizes import size_rows, size_summary, stored_sizes
from loram_core.sources import block_hashes, calibration_blocks, eval_blocks
from tests.conftest import tiny_model, tiny_tokenizer
from tests.loram_core.test_checks import WORDS, write_corpus

REPO = Path(__file__).resolve().parents[2]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _skewed_docs() -> list[str]:
    """400 paragraphs of 12 words and one of 3,000 words that the documents rule holds out at 0.05."""
    rng = random.Random(1)
    small = [_words(rng, 12) for _ in range(400)]
    big = next(d for d in (_words(rng, 3000) for _ in range(200)) if is_heldout(d, 0.05))
    return small[:200] + [big] + small[200:]


def test_heldout_fraction_in_tokens_holds_out_that_share_of_tokens() -> None:
    """A share of documents is no share of text: with one long paragraph among them, the documents rule at
    0.05 holds out 4.2% of the paragraphs and 40.9% of the tokens; the token rule holds out 4.996% of
    the tokens (at most 5%, short of it by less than one small paragraph). On the demo corpus the
    documents rule holds out 3.76% of the tokens, the token rule 4.999%."""
    tok = tiny_tokenizer()
    docs = _skewed_docs()
    records = [Document((d,)) for d in docs]
    by_docs = make_blocks(records, tok, 16, 0.05)
    by_tokens = make_blocks(records, tok, 16, 0.05, heldout_unit="tokens")

    def share(b) -> float:
        return b.heldout.numel() / (b.heldout.numel() + b.train.numel())

    counts = [len(r) + 1 for r in tokenize(docs, tok)]
    held_docs = sum(n for d, n in zip(docs, counts, strict=True) if is_heldout(d, 0.05)) / sum(counts)
    assert held_docs > 0.35  # the bug: 5% of the paragraphs, 35-40% of the tokens
    assert share(by_docs) > 0.35
    flags = heldout_by_tokens(docs, counts, 0.05)
    held = sum(n for n, f in zip(counts, flags, strict=True) if f) / sum(counts)
    assert 0.05 - max(counts[:200]) / sum(counts) <= held <= 0.05  # within one small paragraph of 5%
    assert not flags[200]  # the long paragraph does not fit in the share
    assert 0.045 <= share(by_tokens) <= 0.05 + 16 / (by_tokens.train.numel() + by_tokens.heldout.numel())


def test_token_split_depends_on_content_only_and_keeps_duplicates_together() -> None:
    rng = random.Random(2)
    docs = [_words(rng, rng.randint(3, 60)) for _ in range(300)]
    docs += docs[:20]  # duplicated paragraphs must never straddle the split
    counts = [len(d) + 1 for d in docs]
    flags = heldout_by_tokens(docs, counts, 0.1)
    order = list(range(len(docs)))
    random.Random(3).shuffle(order)
    shuffled = heldout_by_tokens([docs[i] for i in order], [counts[i] for i in order], 0.1)
    assert [flags[i] for i in order] == shuffled
    assert all(flags[i] == flags[300 + i] for i in range(20))
    assert sum(n for n, f in zip(counts, flags, strict=True) if f) <= 0.1 * sum(counts)


@pytest.fixture
def user_run(tmp_path: Path):
    """A tiny checkpoint with tokenizer, a corpus, and its packed blocks; returns a config factory."""
    base = tmp_path / "base"
    tiny_model(num_hidden_layers=4).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    write_corpus(tmp_path / "corpus.txt", docs=400)

    def make(*overrides: str):
        cfg = load_config(
            REPO / "configs" / "demo.yaml",
            [f"base.source={base}", f"corpus.paths={tmp_path / 'corpus.txt'}", "corpus.seq_len=32",
             "corpus.eval_blocks=6", f"workdir={tmp_path / 'work'}", f"base.cache_dir={tmp_path / 'cache'}",
             "prune.keep_first=1", "prune.keep_last=1", *overrides],
        )  # fmt: skip
        return cfg, str(base), steps.prepare_corpus(cfg, str(base))

    return make


def test_default_sections_are_the_corpus_blocks_as_before(user_run) -> None:
    cfg, base, blocks_file = user_run("calibration.samples=5")
    blocks = load_blocks(blocks_file)
    calib = calibration_blocks(cfg, tiny_tokenizer(), blocks_file)
    held = eval_blocks(cfg, tiny_tokenizer(), blocks_file)
    assert torch.equal(calib.blocks, blocks.train[:5])  # what prune.calib_samples took from the corpus
    assert torch.equal(held.blocks, blocks.heldout) and held.blocks.shape == (6, 32)
    assert calib.info["source"] == "corpus" and calib.info["tokens"] == 5 * 32
    assert held.info["heldout"] == {"fraction": 0.05, "of": "documents"}


def test_calibration_length_seed_and_count_of_its_own(user_run) -> None:
    cfg, _, blocks_file = user_run("calibration.samples=7", "calibration.seq_len=48", "calibration.seed=3")
    tok = tiny_tokenizer()
    calib = calibration_blocks(cfg, tok, blocks_file)
    assert calib.blocks.shape == (7, 48) and calib.info["seed"] == 3
    again = calibration_blocks(cfg, tok, blocks_file)
    assert torch.equal(calib.blocks, again.blocks)
    other, _, _ = user_run("calibration.samples=7", "calibration.seq_len=48", "calibration.seed=4")
    assert not torch.equal(calibration_blocks(other, tok, blocks_file).blocks, calib.blocks)
    # Never the held-out text: every calibration block comes from training documents.
    held = {tuple(r) for r in load_blocks(blocks_file).heldout.tolist()}
    assert not held & {tuple(r[:32]) for r in calib.blocks.tolist()}


def test_calibration_from_a_file_takes_its_first_tokens_in_order(user_run, tmp_path: Path) -> None:
    calib_file = tmp_path / "calib.jsonl"
    rng = random.Random(5)
    rows = [_words(rng, 30) for _ in range(40)]
    calib_file.write_text("\n".join(json.dumps({"body": r}) for r in rows))
    cfg, _, blocks_file = user_run(f"calibration.source={calib_file}", "calibration.text_field=body",
                                   "calibration.samples=10", "calibration.seq_len=64")  # fmt: skip
    tok = tiny_tokenizer()
    calib = calibration_blocks(cfg, tok, blocks_file)
    assert cfg.calibration.source == [str(calib_file)]  # one path, given bare
    assert torch.equal(calib.blocks, pack_ids(tokenize(rows, tok), tok.eos_token_id, 64)[:10])
    assert calib.info["source"] == ["calib.jsonl"]
    assert calib.info["files_sha256"] == hashlib.sha256(calib_file.read_bytes()).hexdigest()
    assert calib.info == {**calib.info, **block_hashes(calib.blocks, tok)}
    text = "".join(tok.decode(r) for r in calib.blocks.tolist())
    assert calib.info["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    too_many, _, _ = user_run(f"calibration.source={calib_file}", "calibration.text_field=body",
                              "calibration.samples=1000", "calibration.seq_len=64")  # fmt: skip
    n = (sum(len(r) for r in tokenize(rows, tok)) + len(rows) - 1) // 64  # EOS between the records
    with pytest.raises(
        ConfigError, match=rf"calibration.samples=1000 blocks of 64 tokens asked, but .* holds {n};"
    ):
        calibration_blocks(too_many, tok, blocks_file)


def test_eval_from_its_own_files_or_a_token_share_of_the_corpus(user_run, tmp_path: Path) -> None:
    write_corpus(tmp_path / "eval.txt", docs=30)
    cfg, _, blocks_file = user_run(f"eval.source={tmp_path / 'eval.txt'}", "eval.blocks=4", "eval.seq_len=40")
    tok = tiny_tokenizer()
    own = eval_blocks(cfg, tok, blocks_file)
    assert own.blocks.shape == (4, 40) and own.info["source"] == ["eval.txt"] and "heldout" not in own.info
    share, _, share_blocks = user_run("eval.heldout_fraction=0.2", "corpus.eval_blocks=100000")
    b = load_blocks(share_blocks)  # every held-out block (eval_blocks caps what is scored, not the split)
    held = b.heldout.numel() / (b.heldout.numel() + b.train.numel())
    assert 0.19 <= held <= 0.2
    info = eval_blocks(share, tok, share_blocks).info
    assert info["heldout"] == {"fraction": 0.2, "of": "tokens"} and info["tokens"] == b.heldout.numel()


def test_preflight_refuses_missing_calibration_and_eval_files(user_run, tmp_path: Path) -> None:
    cfg, _, _ = user_run(f"calibration.source={tmp_path / 'nope*.jsonl'}")
    with pytest.raises(ConfigError, match=r"calibration.source entry '.*nope\*.jsonl' matches no file"):
        steps.preflight(cfg)
    (tmp_path / "empty.txt").write_text("")
    cfg, _, _ = user_run(f"eval.source={tmp_path / 'empty.txt'}")
    with pytest.raises(ConfigError, match=r"eval.source=\['.*empty.txt'\] matches only empty files"):
        steps.preflight(cfg)


def test_size_summary_of_a_sparse_checkpoint_says_what_is_stored(tmp_path: Path) -> None:
    model = tiny_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.view(-1, 2)[:, 0] = 0  # half of every linear's weights
    model.save_pretrained(tmp_path / "m")
    total = sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    sizes = stored_sizes(tmp_path / "m", count_nonzero=True)
    assert sizes["stored_params"] == total and sizes["nonzero_params"] == total - linear // 2
    assert sizes["stored_bytes"] == (tmp_path / "m" / "model.safetensors").stat().st_size > 4 * total
    plan = {"original_params": total, "pruned_params": total - linear // 2, "hbm_gb_4bit_actual": 0.5,
            "pruned_layers": [0, 1]}  # fmt: skip
    s = size_summary(plan, tmp_path / "m", sparse=True)
    assert s["reduction"] == 1.0 and s["sparse_kernel_reduction"] == pytest.approx(
        total / (total - linear // 2)
    )
    assert s["hbm_gb"] == pytest.approx(total * 2 / 2**30)  # zeros are stored: a dense 16-bit footprint
    rows = dict(size_rows(s))
    assert rows["reduction as stored"] == "1.00x"
    assert rows["reduction with a sparse kernel only"].startswith(f"{total / (total - linear // 2):.2f}x")
    assert rows["stored parameters (original shapes, zeros stored)"] == total
    dense = dict(size_rows(size_summary(plan, tmp_path / "m", sparse=False)))
    assert "non-zero weights" not in dense and "reduction with a sparse kernel only" not in dense


def test_preflight_names_the_calibration_text_field(user_run, tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text('{"body": "a b c"}\n')
    cfg, _, _ = user_run(f"calibration.source={tmp_path / 'c.jsonl'}")
    with pytest.raises(
        ConfigError, match=r"calibration.text_field='text' is not a field of .*Set calibration.text_field"
    ):
        steps.preflight(cfg)
