"""Verification (LoRAM's Fig. 6 ablation): the task, its loss, the refusals, and the done-when test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loram_core.config import load_config
from loram_core.errors import ConfigError, LoramError
from loram_core.verify import check_aligned, check_verify, encode, make_task, require_alignment, task_loss
from loram_core.verify.task import IGNORE, Example, TaskSource, make_example
from tests.conftest import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _letters(n: int) -> str:
    return chr(97 + n // 26) + chr(97 + n % 26)


# 300 documents of 12 words each; every word names its document (letters only, as the task reads words).
DOCS = [f"Doc {i}: " + " ".join(f"w{_letters(i)}q{chr(97 + j)}" for j in range(12)) for i in range(300)]


def _source(docs: list[str], fraction: float) -> TaskSource:
    """The task's text when paragraphs are held out by content hash (the documents rule) and training saw the rest."""
    from loram_core.data import is_heldout

    train = [d for d in docs if not is_heldout(d, fraction)]
    return TaskSource(train, [d for d in docs if is_heldout(d, fraction)], train)


def test_task_is_deterministic_split_by_document_hash_and_its_response_reverses_the_prompt() -> None:
    from loram_core.data import is_heldout

    train, heldout, counts = make_task(_source(DOCS, 0.2), 4, 40, 8, seed=0)
    again = make_task(_source(DOCS, 0.2), 4, 40, 8, seed=0)
    assert (train, heldout, counts) == again and len(train) == 40 and len(heldout) == 8
    assert make_task(_source(DOCS, 0.2), 4, 40, 8, seed=1)[0] != train  # the seed picks which examples
    assert counts["heldout_seen_in_training"] == 0  # every word names its document: nothing repeats
    words = {e.prompt: e.prompt.split(": ")[1].split("\n")[0].split() for e in train + heldout}
    for e in train + heldout:
        assert e.response == " " + " ".join(reversed(words[e.prompt])) and len(words[e.prompt]) == 4
    held_docs = [d for d in DOCS if is_heldout(d, 0.2)]
    held_words = {w for d in held_docs for w in d.split()}
    assert all(set(words[e.prompt]) <= held_words for e in heldout)  # held-out prompts: held-out documents
    assert not any(set(words[e.prompt]) <= held_words for e in train)
    with pytest.raises(
        LoramError, match=r"verify\.heldout_examples=500.*yield only \d+ .*lower verify\.heldout_examples"
    ):
        make_task(_source(DOCS, 0.2), 4, 40, 500, seed=0)
    # `continue`: the prompt quotes words of a paragraph, the response is the words that follow them
    train, heldout, _ = make_task(_source(DOCS, 0.2), 5, 40, 8, seed=0, task="continue", response_words=3)
    for e in train + heldout:
        prompt = e.prompt.removeprefix("Continue the text: ").removesuffix("\nContinuation:")
        assert any(f"{prompt}{e.response}" in d for d in DOCS) and len(e.response.split()) == 3


def test_labels_cover_exactly_the_response_and_eos_and_the_loss_skips_prompt_and_padding() -> None:
    tok = tiny_tokenizer()
    examples = [Example("ab c", " de"), make_example(["abc", "de", "f"])]
    enc = encode(examples, tok)
    assert enc.input_ids.shape == (2, max(len(e.prompt) + len(e.response) + 1 for e in examples))
    response = tok(" de", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.labels[0][enc.labels[0] != IGNORE].tolist() == response
    assert enc.input_ids[0, 4:8].tolist() == response  # right after the 4 prompt tokens
    assert int(enc.attention_mask[0].sum()) == len("ab c de") + 1  # the rest is padding
    model = tiny_model()
    score = task_loss(model, enc, batch_size=1)
    # transformers' own loss over the same labels, one example at a time, weighted by token count
    total, count = 0.0, 0
    for i in range(2):
        n = int((enc.labels[i, 1:] != IGNORE).sum())
        out = model(input_ids=enc.input_ids[i : i + 1], attention_mask=enc.attention_mask[i : i + 1],
                    labels=enc.labels[i : i + 1])  # fmt: skip
        total, count = total + out.loss.item() * n, count + n
    assert score.tokens == count == 4 + len(" f de abc") + 1  # responses + EOS, one token per character
    assert score.loss == pytest.approx(total / count, rel=1e-5)
    changed = encode(
        [Example("zz z", " de"), examples[1]], tok
    )  # another prompt: other context, same targets
    assert task_loss(model, changed).tokens == score.tokens


def _demo(*overrides: str):
    return load_config(REPO / "configs" / "demo.yaml", ["verify.enabled=true", *overrides])


def test_preflight_refuses_verify_without_alignment_a_rank_above_the_pruned_width_and_a_wrong_mode() -> None:
    check_verify(_demo())  # the shipped demo passes
    check_verify(_demo("verify.enabled=false", "align.enabled=false", "verify.rank=4096"))  # off: unchecked
    # a preset's verify is skipped on a run without alignment; asking for verification itself is refused
    check_verify(_demo("align.enabled=false", "verify.rank=4096"))
    assert not _demo("until=prune").runs("verify")
    with pytest.raises(
        ConfigError, match=r"needs a pruned and aligned base \(align\.enabled=false.*align\.enabled=true"
    ):
        require_alignment(_demo("align.enabled=false"))
    with pytest.raises(ConfigError, match=r"needs a pruned and aligned base \(until=prune"):
        require_alignment(_demo("until=prune"))
    # demo: 2 KV heads of 32 dims, random 0.65 keeps 1 -> k_proj/v_proj have 32 outputs in layers 1-4
    with pytest.raises(
        ConfigError, match=r"verify\.rank=64 .*layer 1's k_proj has a side of 32.*rank at most 32"
    ):
        check_verify(_demo("verify.rank=64"))
    check_verify(_demo("verify.rank=64", "verify.target_modules=[q_proj,o_proj,gate_proj,up_proj,down_proj]"))
    with pytest.raises(
        ConfigError, match=r"verify\.recover_mode='mask' does not apply to prune\.strategy='random'"
    ):
        check_verify(_demo("verify.recover_mode=mask"))
    with pytest.raises(ConfigError, match=r"recover_mode='zeroA' does not apply to prune\.strategy='semi'"):
        check_verify(_demo("verify.recover_mode=zeroA", "prune.strategy=semi"))
    with pytest.raises(ConfigError, match=r"verify\.target_modules\.0.*'lm_head'"):
        _demo("verify.target_modules=[lm_head]")


def test_a_base_that_is_not_pruned_and_aligned_is_refused(tmp_path: Path) -> None:
    from loram_core.config import AlignConfig, PruneConfig
    from loram_core.prune import prune_checkpoint, save_masks

    tiny_model(num_hidden_layers=4).save_pretrained(tmp_path / "original")
    cfg = PruneConfig(strategy="random", ratio=0.5, keep_first=1, keep_last=1)
    masks = prune_checkpoint(tmp_path / "original", tmp_path / "pruned", cfg, torch.randint(0, 128, (2, 16)))
    save_masks(masks, tmp_path / "pruned" / "masks" / "masks.safetensors")
    with pytest.raises(LoramError, match=r"was pruned but not aligned.*align\.enabled=true"):
        check_aligned(str(tmp_path / "pruned"), str(tmp_path / "pruned"))
    with pytest.raises(LoramError, match=r"is not a LoRAM base \(no `loram` section"):
        check_aligned(str(tmp_path / "pruned"), str(tmp_path / "original"))
    assert (
        AlignConfig().enabled
    )  # (the pipeline aligns by default; the refusal is for a disabled or skipped step)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["random", "semi"])
def test_a_lora_trained_on_the_pruned_base_recovered_and_loaded_with_stock_peft_lowers_the_originals_task_loss(
    demo_base: Path, tmp_path: Path, pinned_threads, strategy: str
) -> None:
    """Done-when: prune + align (20 steps) -> peft LoRA (40 steps) -> recover -> stock peft on the original.

    Measured (demo base of recipe 2, 1 thread, configs/demo.yaml's verify section: 3 seeds, 20
    alignment steps): held-out task loss (reverse 4 words, response tokens only) of the untuned
    original 7.382; recovered LoRA on the original 5.879 ± 0.031 (random structured, zeroA) and
    5.834 ± 0.026 (semi 2:4, dense); the same LoRA on the pruned base 5.900 / 5.814. Asserted: the
    recovered LoRA lowers the original's loss by more than 1.0 nat (two thirds of the smallest
    measured gap, 1.50). 90 s of wall for both on 2 shared cores (prune, align 20 steps, six LoRAs
    and thirteen scorings each).
    """
    from peft import PeftModel

    from loram_core import steps
    from loram_core.models import load_model
    from loram_core.verify import verify
    from loram_core.verify.task import encode as enc

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"workdir={tmp_path / 'work'}", f"prune.strategy={strategy}", "align.steps=20", "align.warmup_steps=2",
        "verify.enabled=true", "verify.reference=false", "device=cpu",
    ])  # fmt: skip
    base = str(demo_base)
    blocks = steps.prepare_corpus(cfg, base)
    pruned = steps.prune(cfg.prune, cfg.context, base, steps.prepare_calibration(cfg, base, blocks))
    aligned = steps.align(cfg.align, cfg.context, pruned, blocks)
    result = verify(cfg, base, pruned, aligned, blocks)
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"original", "loram", "unrecovered", "unaligned", "neither"}
    assert result["recover_mode"] == ("zeroA" if strategy == "random" else "dense")
    assert rows["loram"]["loss"] < rows["original"]["loss"] - 1.0, rows
    assert rows["loram"]["accuracy"] > rows["original"]["accuracy"]
    # The recovered adapter on disk is a stock peft adapter for the original: load it as a consumer would.
    out = next((tmp_path / "work").glob("verify-*"))
    recovered = out / "loram-recovered"
    assert json.loads((recovered / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    model = PeftModel.from_pretrained(load_model(base), str(recovered))
    heldout = [Example(**json.loads(line)) for line in (out / "task-heldout.jsonl").read_text().splitlines()]
    from transformers import AutoTokenizer

    score = task_loss(model, enc(heldout, AutoTokenizer.from_pretrained(base)), cfg.verify.batch_size)
    assert score.loss == pytest.approx(rows["loram"]["losses"][0], abs=1e-4)  # loram-recovered/ is seed 0's
    # A re-run finds the step done and returns the same record without training.
    assert verify(cfg, base, pruned, aligned, blocks) == result


def _repeating_corpus(path: Path) -> None:
    """300 paragraphs that share sentences across any split: each opens with one of 30 shared sentences, then
    two words of its own, then two more shared sentences (letters and spaces only: the tiny tokenizer's)."""
    import random

    rng = random.Random(7)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 7)))
        for _ in range(400)
    ]
    sentences = [" ".join(rng.choice(vocab) for _ in range(6)) for _ in range(30)]
    paras = [" ".join([rng.choice(sentences), rng.choice(vocab), rng.choice(vocab), rng.choice(sentences),
                       rng.choice(sentences)]) for _ in range(300)]  # fmt: skip
    path.write_text("\n\n".join(paras))


@pytest.fixture
def repeating_run(tmp_path: Path):
    """A tiny checkpoint, the repeating corpus and its packed blocks; returns a config factory."""
    from loram_core import steps

    base = tmp_path / "base"
    tiny_model(num_hidden_layers=4).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    _repeating_corpus(tmp_path / "corpus.txt")

    def make(*overrides: str):
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            f"base.source={base}", f"corpus.paths={tmp_path / 'corpus.txt'}", "corpus.seq_len=32",
            "corpus.heldout_fraction=0.2", f"workdir={tmp_path / 'work'}", f"base.cache_dir={tmp_path / 'cache'}",
            "verify.task=reverse-words", *overrides,
        ])  # fmt: skip
        return cfg, str(base), steps.prepare_corpus(cfg, str(base))

    return make


def _words_in(texts: list[str], n: int) -> set[tuple[str, ...]]:
    import re

    out = set()
    for t in texts:
        w = re.findall(r"[A-Za-z]{3,12}", t)
        out |= {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}
    return out


@pytest.mark.parametrize("rule", ["documents", "tokens"])
def test_no_heldout_prompt_occurs_in_training_for_either_heldout_rule(repeating_run, rule: str) -> None:
    """The held-out task comes from the split alignment and evaluation use (HEAD: always the documents rule at
    corpus.heldout_fraction, so under eval.heldout_fraction the "held-out" prompts were training text), and no
    held-out prompt's word window occurs in a training paragraph or a training window (HEAD kept them: on this
    corpus about half the held-out candidates are shared text)."""
    from loram_core.data import load_blocks, parts_of, read_documents, split_flags
    from loram_core.sources import heldout_rule
    from loram_core.verify import task_source

    cfg, _, blocks_file = repeating_run(*(["eval.heldout_fraction=0.3"] if rule == "tokens" else []))
    tok = tiny_tokenizer()
    train, heldout, counts = make_task(task_source(cfg, tok, blocks_file), 4, 64, 16, seed=0)
    assert counts["heldout_seen_in_training"] > counts["heldout_candidates"] // 4  # the corpus bites
    parts = parts_of(read_documents([cfg.corpus.paths[0]]))
    fraction, unit = heldout_rule(cfg)
    assert unit == rule
    flags = split_flags(parts, fraction, unit, tok)
    training = [p for p, f in zip(parts, flags, strict=True) if not f]
    windows = tok.batch_decode(load_blocks(blocks_file).train.tolist())
    seen = _words_in(training, 4) | _words_in(windows, 4)
    held = _words_in([p for p, f in zip(parts, flags, strict=True) if f], 4)
    for e in heldout:
        prompt = tuple(e.prompt.split(": ")[1].split("\n")[0].split())
        assert prompt in held and prompt not in seen, e
    assert all(tuple(e.prompt.split(": ")[1].split("\n")[0].split()) in seen for e in train)


def _unique_corpus(path: Path) -> None:
    """600 paragraphs of 6 to 60 random made-up words (so 4-word windows hardly ever repeat)."""
    import random

    rng = random.Random(7)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(400)
    ]
    path.write_text(
        "\n\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 60))) for _ in range(600))
    )


def test_under_eval_heldout_fraction_the_task_is_held_out_by_the_pipelines_token_split(
    repeating_run, tmp_path
) -> None:
    """The issue's numbers, eval.heldout_fraction=0.02 with corpus.heldout_fraction=0.05: the pipeline holds out
    2% of the tokens, and the task's held-out paragraphs are exactly those. HEAD built the task with the
    documents rule at 0.05, whose paragraphs are mostly in alignment's training split (on the demo corpus 48 of
    91); here too, so a task made HEAD's way fails every assertion below but the last. The cache key moves
    with eval.heldout_fraction (HEAD's omitted it, so a run at 0.02 would reuse a verification made at 0.05)."""
    from loram_core.config import fingerprint
    from loram_core.data import parts_of, read_documents, split_flags
    from loram_core.verify import task_source, verify_key

    _unique_corpus(tmp_path / "unique.txt")
    cfg, base, blocks_file = repeating_run(f"corpus.paths={tmp_path / 'unique.txt'}", "corpus.heldout_fraction=0.05",
                                           "eval.heldout_fraction=0.02")  # fmt: skip
    tok = tiny_tokenizer()
    parts = parts_of(read_documents([str(tmp_path / "unique.txt")]))
    pipeline = split_flags(parts, 0.02, "tokens", tok)
    held = {p for p, f in zip(parts, pipeline, strict=True) if f}
    training = {p for p, f in zip(parts, pipeline, strict=True) if not f}
    head = {p for p in parts if split_flags([p], 0.05, "documents")[0]}  # HEAD's held-out task paragraphs
    assert (
        len(head & training) > len(head) // 2
    )  # HEAD's rule: most of its "held-out" paragraphs were trained on
    source = task_source(cfg, tok, blocks_file)
    assert set(source.heldout_parts) == held and set(source.train_parts) == training
    _, heldout, _ = make_task(source, 4, 64, 16, seed=0)
    for e in heldout:
        prompt = e.prompt.split(": ")[1].split("\n")[0]
        assert any(prompt in p for p in held) and not any(prompt in p for p in training), prompt
    keys = {fingerprint(verify_key(repeating_run(f"corpus.paths={tmp_path / 'unique.txt'}",
                                                 "corpus.heldout_fraction=0.05", *e)[0], [base] * 3, blocks_file, "cpu"))
            for e in ([], ["eval.heldout_fraction=0.02"], ["eval.heldout_fraction=0.03"])}  # fmt: skip
    assert len(keys) == 3


def test_the_verification_key_covers_the_heldout_rule_and_the_corpus(repeating_run, tmp_path: Path) -> None:
    from loram_core.config import fingerprint
    from loram_core.verify import verify_key

    cfg, base, blocks = repeating_run()
    key = fingerprint(verify_key(cfg, [base, base, base], blocks, "cpu"))
    for overrides in (["eval.heldout_fraction=0.1"], ["corpus.heldout_fraction=0.3"], ["verify.seeds=2"]):
        other, _, _ = repeating_run(*overrides)
        assert fingerprint(verify_key(other, [base, base, base], blocks, "cpu")) != key, overrides
    (tmp_path / "corpus.txt").write_text((tmp_path / "corpus.txt").read_text() + " more")  # other bytes
    assert fingerprint(verify_key(cfg, [base, base, base], blocks, "cpu")) != key


@pytest.mark.parametrize(("strategy", "mode"), [("random", "normA"), ("semi", "mask")])
def test_ablation_rows_on_a_tiny_model_for_adapter_and_merged_recoveries(
    tmp_path: Path, strategy: str, mode: str
) -> None:
    """Plumbing of `run_ablation` (tiny untrained model, 3 steps): every row scored, the recovery mode honoured."""
    import shutil

    from loram_core.config import PruneConfig, VerifyConfig
    from loram_core.prune import prune_checkpoint, save_masks
    from loram_core.verify import run_ablation

    tiny_model(num_hidden_layers=4).save_pretrained(tmp_path / "original")
    cfg = PruneConfig(strategy=strategy, ratio=0.5, keep_first=1, keep_last=1, calib_samples=2)
    masks = prune_checkpoint(tmp_path / "original", tmp_path / "pruned", cfg, torch.randint(0, 128, (2, 16)))
    save_masks(masks, tmp_path / "pruned" / "masks" / "masks.safetensors")
    shutil.copytree(tmp_path / "pruned", tmp_path / "aligned")  # stands in for the aligned base here
    tok = tiny_tokenizer()
    train, heldout, _ = make_task(_source(DOCS, 0.2), 3, 16, 8, seed=0)
    v = VerifyConfig(rank=4, steps=3, batch_size=4, recover_mode=mode, seeds=2, seed=5)
    out = run_ablation(v, str(tmp_path / "original"), str(tmp_path / "pruned"), str(tmp_path / "aligned"),
                       encode(train, tok), encode(heldout, tok), tmp_path / "work", torch.device("cpu"))  # fmt: skip
    assert out["recover_mode"] == mode and out["seeds"] == [5, 6]
    rows = {r["key"]: r for r in out["rows"]}
    assert list(rows) == ["original", "loram", "unrecovered", "unaligned", "neither", "reference"]
    assert all(r["loss"] > 0 and 0 <= r["accuracy"] <= 1 for r in out["rows"])
    assert rows["original"]["loss_std"] is None and len(rows["original"]["losses"]) == 1
    for key in ("loram", "unrecovered", "unaligned", "neither", "reference"):
        r = rows[key]
        assert len(r["losses"]) == 2 and r["losses"][0] != r["losses"][1]  # two seeds, two LoRAs
        assert r["loss"] == pytest.approx(sum(r["losses"]) / 2, abs=1e-4)
        assert r["loss_std"] == pytest.approx(abs(r["losses"][0] - r["losses"][1]) / 2**0.5, abs=1e-4)
    # "neither": the unaligned LoRA (first seed) on the pruned base it was trained on, no recovery
    from peft import PeftModel

    from loram_core.models import load_model

    small = PeftModel.from_pretrained(load_model(tmp_path / "pruned"), str(tmp_path / "work" / "unaligned"))
    assert task_loss(small, encode(heldout, tok)).loss == pytest.approx(
        rows["neither"]["losses"][0], abs=1e-4
    )
    assert (tmp_path / "work" / "loram-seed1-recovered").is_dir()
    recovered = tmp_path / "work" / "loram-recovered"
    if mode == "mask":  # a merged original-shaped checkpoint, not an adapter
        assert (recovered / "model.safetensors").is_file() and not (
            recovered / "adapter_config.json"
        ).exists()
    else:
        config = json.loads((recovered / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["base_model_name_or_path"] == str(tmp_path / "original")


def test_the_table_says_which_differences_are_larger_than_the_spread() -> None:
    from loram_core.verify import comparisons, table_rows, verification_markdown

    def row(key: str, losses: list[float]) -> dict:
        import statistics

        return {"key": key, "setting": key, "trained_on": "-", "inferred_on": "-", "accuracy": 0.5,
                "accuracy_std": None, "loss": statistics.fmean(losses), "losses": losses,
                "loss_std": statistics.stdev(losses) if len(losses) > 1 else None}  # fmt: skip

    record = {
        "task": {"name": "continue", "words": 12, "response_words": 8, "train_examples": 512,
                 "heldout_examples": 64, "fingerprint": "f", "heldout_candidates": 100, "heldout_seen_in_training": 9},
        "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj"], "steps": 40, "batch_size": 8, "seed": 0},
        "recover_mode": "zeroA", "seeds": [0, 1, 2],
        "rows": [row("original", [6.0]), row("loram", [4.00, 4.02, 4.04]), row("unrecovered", [4.10, 4.12, 4.14]),
                 row("unaligned", [4.03, 4.05, 4.07]), row("neither", [4.2, 4.3, 4.4])],
    }  # fmt: skip
    comp = comparisons(record)
    assert (
        comp["unrecovered"]["diff"] == pytest.approx(0.10) and comp["unrecovered"]["beyond"]
    )  # 0.10 > 0.02 + 0.02
    assert (
        comp["unaligned"]["diff"] == pytest.approx(0.03) and comp["unaligned"]["beyond"] is False
    )  # 0.03 < 0.04
    assert (
        comp["original"]["spread"] == pytest.approx(0.02) and comp["original"]["beyond"]
    )  # no std of its own
    assert comp["neither"]["beyond"]  # 0.28 > 0.02 + 0.1
    cells = {r["setting"]: r for r in table_rows(record)}
    assert cells["loram"]["task loss"] == "4.020 ± 0.020" and cells["loram"]["vs LoRAM"] == "-"
    assert cells["unaligned"]["vs LoRAM"] == "+0.030 (within the spread)"
    assert cells["unrecovered"]["vs LoRAM"] == "+0.100 (beyond the spread)"
    card = verification_markdown(record)
    assert "trained with 3 seeds (0, 1, 2" in card and "sample standard deviation" in card
    assert (
        "larger than the spread (the two rows' standard deviations summed): original (+1.980); unrecovered "
        in card
    )
    assert "Within the spread: unaligned (+0.030)" in card
    assert (
        "give the 8 words that follow 12 words" in card
        and "(9 of 100 held-out candidates dropped: their prompt's or response's words occur in the training text "
        "or training windows), recovered to the original's shape"
        in card.replace("\n", " ")
    )
    one = {**record, "seeds": [0], "rows": [row("original", [6.0]), row("loram", [4.0])]}
    assert table_rows(one)[0]["vs LoRAM"] == "+2.000 (one seed: no spread)"
    assert "no spread was measured" in verification_markdown(one)
