"""Perplexity as the literature measures it: the text as written, scored by the standard windowed loop.

The references (SparseGPT's `llama_eval`/`opt_eval`, Wanda's `eval_ppl_wikitext`, HF's perplexity
guide) tokenize the held-out text as one string (WikiText's paragraphs joined by "\\n\\n") and score
it in windows of the model's context. The loops below are transcribed from that definition, not
from our code, and must give our evaluation's number.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from loram_core import steps
from loram_core.card import model_card
from loram_core.config import load_config
from loram_core.data import Document, make_blocks, pack_ids, read_documents
from loram_core.errors import ConfigError
from loram_core.evaluate import perplexity, protocol, windows
from loram_core.sources import calibration_blocks, eval_blocks
from tests.conftest import tiny_model
from tests.loram_core.test_card import _manifest

REPO = Path(__file__).resolve().parents[2]
_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "far", "away"]


def line_tokenizer():
    """A character tokenizer that has a newline (the conftest one maps "\\n" to EOS, which would hide EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz .,\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def _paragraphs(n: int, seed: int = 0) -> list[str]:
    """Paragraphs of 2-4 lines of words: single newlines inside, as prose files have."""
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(rng.randint(2, 4)))
            for _ in range(n)]  # fmt: skip


def sparsegpt_loop(model, ids: torch.Tensor, seqlen: int) -> float:
    """SparseGPT's / Wanda's WikiText loop: nsamples = numel // seqlen windows, each scored whole, mean x seqlen."""
    nsamples = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            batch = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = model(batch).logits
            shift_logits, shift_labels = logits[:, :-1, :], batch[:, 1:]
            loss = torch.nn.CrossEntropyLoss()(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1)
            )
            nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


def hf_strided_loop(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """HF's "Perplexity of fixed-length models" loop: windows every `stride`, only the last trg_len tokens as targets.

    From the definition (exp of the mean NLL over every scored token): each window's loss is the mean over its
    valid shifted labels, weighted by how many there are.
    """
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    with torch.no_grad():
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc
            input_ids = ids[:, begin_loc:end_loc]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = model(input_ids, labels=target_ids).loss
            valid = int((target_ids[:, 1:] != -100).sum())  # the labels the model's shift keeps
            nll_sum += loss.item() * valid
            n_tokens += valid
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("stride", [None, 32, 20, 7])
def test_perplexity_is_the_standard_windowed_loop(stride: int | None) -> None:
    """Our evaluation of a stream (as blocks) equals the transcribed loop: SparseGPT's without a stride, HF's with one."""
    model = tiny_model(vocab_size=40)
    ids = torch.randint(0, 40, (1, 6 * 32), generator=torch.Generator().manual_seed(0))
    blocks = ids.view(-1, 32).to(torch.int32)
    ours = perplexity(model, blocks, batch_size=4, stride=stride)
    if stride is None:
        assert ours == pytest.approx(sparsegpt_loop(model, ids, 32), rel=1e-5)
    assert ours == pytest.approx(hf_strided_loop(model, ids, 32, stride or 32), rel=1e-5)
    if stride is not None and stride < 32:  # overlapping windows see more context: another number
        assert ours != pytest.approx(perplexity(model, blocks), rel=1e-4)


def test_windows_score_every_token_but_the_first_once() -> None:
    for n, window, stride in [(192, 32, None), (192, 32, 20), (100, 32, 7), (64, 16, 16)]:
        w = windows(n, window, stride)
        assert all(e - b <= window for b, e, _ in w) and w[-1][1] == n
        covered = [t for b, e, s in w for t in range(e - s, e)]  # the scored tokens, by position
        if (stride or window) < window:
            assert covered == list(range(1, n))  # each token once, in order, every one but the first
        else:
            assert (
                len(covered) == len(set(covered)) == n - n // window
            )  # a window's first token has no context
    assert protocol(192, 32) == {"name": "windowed", "tokens": 192, "window": 32, "stride": 32, "windows": 6,
                                 "scored_tokens": 186}  # fmt: skip
    assert protocol(192, 32, 20)["scored_tokens"] == 191


def test_a_text_file_is_read_as_written_and_scored_as_the_references_score_it(tmp_path: Path) -> None:
    """The held-out file's stream is `tokenizer(file text)`: its newlines kept, no EOS inside (HEAD put one after
    every paragraph), and our evaluation of it is the SparseGPT loop's number on that tokenization."""
    text = "\n\n".join(_paragraphs(40)) + "\n"
    (tmp_path / "wiki.txt").write_text(text)
    (docs,) = read_documents([str(tmp_path / "wiki.txt")])
    assert docs.text() == text and len(docs.parts) == 40
    tok = line_tokenizer()
    tok.save_pretrained(tmp_path / "base")
    tiny_model(num_hidden_layers=4, vocab_size=40).save_pretrained(tmp_path / "base")
    (tmp_path / "corpus.txt").write_text("\n\n".join(_paragraphs(300, seed=1)))
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"base.source={tmp_path / 'base'}", f"corpus.paths={tmp_path / 'corpus.txt'}", "corpus.seq_len=32",
        f"workdir={tmp_path / 'work'}", f"eval.source={tmp_path / 'wiki.txt'}", "eval.blocks=1000",
    ])  # fmt: skip
    held = eval_blocks(cfg, tok, steps.prepare_corpus(cfg, str(tmp_path / "base")))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    n = ids.numel() // 32
    assert torch.equal(held.blocks.flatten(), ids[0, : n * 32].to(torch.int32))
    assert (
        tok.eos_token_id not in held.blocks.tolist()[0]
        and int((held.blocks == tok.encode("\n")[0]).sum()) > 40
    )
    model = tiny_model(num_hidden_layers=4, vocab_size=40)
    assert perplexity(model, held.blocks) == pytest.approx(sparsegpt_loop(model, ids, 32), rel=1e-5)
    assert held.info["protocol"] == protocol(n * 32, 32)


def test_eos_only_between_documents_and_none_in_a_text_files_calibration(tmp_path: Path) -> None:
    """A text file's paragraphs are joined by their blank line, records by EOS: calibration of a one-file corpus
    holds no EOS at all (HEAD: one after every paragraph, 194 of the demo's 16,384 calibration tokens)."""
    tok = line_tokenizer()
    paragraphs = _paragraphs(300, seed=2)
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs))
    tok.save_pretrained(tmp_path / "base")
    tiny_model(num_hidden_layers=4, vocab_size=40).save_pretrained(tmp_path / "base")
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"base.source={tmp_path / 'base'}", f"corpus.paths={tmp_path / 'corpus.txt'}", "corpus.seq_len=32",
        f"workdir={tmp_path / 'work'}", "calibration.samples=16",
    ])  # fmt: skip
    blocks_file = steps.prepare_corpus(cfg, str(tmp_path / "base"))
    calib = calibration_blocks(cfg, tok, blocks_file)
    held = eval_blocks(cfg, tok, blocks_file)
    eos = tok.eos_token_id
    assert calib.blocks.shape == (16, 32) and eos not in calib.blocks.flatten().tolist()
    assert eos not in held.blocks.flatten().tolist()
    # the held-out stream is the held-out paragraphs joined by the blank line they had, tokenized whole
    from loram_core.data import is_heldout

    joined = "\n\n".join(p for p in paragraphs if is_heldout(p, 0.05))
    n = held.blocks.numel()
    assert held.blocks.flatten().tolist() == tok(joined, add_special_tokens=False)["input_ids"][:n]
    # records (jsonl, parquet, or Documents of one part): EOS between them, none after the last
    assert pack_ids([[5, 6], [7], [8, 9]], eos, 2).tolist() == [[5, 6], [eos, 7], [eos, 8]]
    records = make_blocks([Document((p,)) for p in paragraphs], tok, 32, 0.05)
    assert int((records.train == eos).sum()) > 0


def test_stride_longer_than_the_window_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"eval\.stride=300 is longer than the window .*128.*at most 128"):
        load_config(REPO / "configs" / "demo.yaml", ["eval.stride=300"])
    assert (
        load_config(REPO / "configs" / "demo.yaml", ["eval.stride=64", "eval.seq_len=64"]).eval.stride == 64
    )


def test_the_card_names_the_protocol_and_its_token_counts() -> None:
    m = _manifest()
    m.eval = {
        "source": "corpus",
        "heldout": {"fraction": 0.05, "of": "documents"},
        "protocol": protocol(4096, 128),
    }
    card = model_card(m, "s3://bucket")
    assert "standard windowed protocol" in card
    assert "one stream of 4,096 tokens, 32 non-overlapping windows of 128 tokens; 4,064 tokens scored" in card
    assert "held-out split (0.05 of its paragraphs and records, never trained on)" in card
    m.eval = {"source": ["wiki.test.txt"], "protocol": protocol(4096, 128, 64)}
    card = model_card(m, "s3://bucket")
    assert "63 windows of 128 tokens starting every 64 tokens" in card and "`wiki.test.txt`" in card


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_model_is_scored_in_the_evaluation_dtype_the_nf4_one_too(
    tmp_path: Path, monkeypatch, dtype
) -> None:
    """The NF4 model's embeddings, norms and head load in the dtype they are stored in (bfloat16 since model/ is
    published in 16 bits), whatever dtype from_pretrained is given, while the others load in `evaluate.dtype`
    (float32 on the CPU): HEAD's table mixed precisions. Every model is now scored with them in that dtype."""
    from loram_core.steps import evaluation
    from tests.conftest import tiny_tokenizer

    base = tmp_path / "base"
    tiny_model(num_hidden_layers=4).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    (tmp_path / "corpus.txt").write_text(
        "\n\n".join(" ".join(random.Random(i).choices(_WORDS, k=30)) for i in range(200))
    )
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"base.source={base}", f"corpus.paths={tmp_path / 'corpus.txt'}", "corpus.seq_len=32", "corpus.eval_blocks=4",
        "calibration.samples=4", "align.steps=2", "align.batch_size=2", f"evaluate.dtype={dtype}",
        f"workdir={tmp_path / 'work'}", f"base.cache_dir={tmp_path / 'cache'}",
    ])  # fmt: skip
    seen: list[set[torch.dtype]] = []
    score = evaluation.perplexity

    def spy(model, *args, **kwargs):
        seen.append({p.dtype for p in model.parameters() if p.is_floating_point()})
        return score(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "perplexity", spy)
    blocks = steps.prepare_corpus(cfg, str(base))
    pruned = steps.prune(cfg.prune, cfg.context, str(base), steps.prepare_calibration(cfg, str(base), blocks))
    aligned = steps.align(cfg.align, cfg.context, pruned, blocks)
    nf4 = steps.quantize(cfg.quantize, cfg.context, aligned)
    result = steps.evaluate(cfg, str(base), pruned, aligned, nf4, blocks)
    assert seen == [{getattr(torch, dtype)}] * 4  # original, pruned, aligned, aligned NF4
    assert result["compute"]["eval_dtype"] == dtype and math.isfinite(result["metrics"]["aligned_nf4_ppl"])
