"""The verification task: an instruction-style set made from the corpus, and its response-only loss.

Two tasks, both exact and reproducible from the corpus bytes alone:

- `reverse-words`: a prompt shows `words` consecutive words of a paragraph and asks for them in
  reverse order. The answer is a pure function of the prompt (copying, with the order changed), so
  it tests what the LoRA learned more than what the model knew.
- `continue`: a prompt shows `words` consecutive words of a held-out paragraph and asks for the
  next `response_words`. The format is new to a base model pretrained on prose (after
  `Continuation:` it does not carry on the quoted text), so a LoRA must learn it; the answer is
  unseen text, so the loss also measures how well the model knows the language of the corpus:
  what the original's pruned layers held and the small model lacks.

Training examples come from the corpus's training paragraphs and held-out ones from its held-out
paragraphs, split by the very rule alignment and evaluation use (`sources.corpus_split`). A
held-out candidate is dropped when its prompt's or its response's word window occurs anywhere in
the text the pipeline trains on (the training documents as joined, and alignment's training
windows), so no scored prompt was ever trained on, whatever repeats across the split.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from loram_core.errors import LoramError

TASKS = ("reverse-words", "continue")
IGNORE = -100  # label of tokens the loss skips (prompt and padding), as transformers' loss expects
_WORD = re.compile(r"[A-Za-z]{3,12}")  # reverse-words: letters only, so the reversal is unambiguous
_WINDOWS_PER_PART = 2  # at most this many examples from one paragraph, so the set spans many paragraphs


@dataclass(frozen=True)
class Example:
    """One prompt and the response the task expects (the response's tokens are the scored ones)."""

    prompt: str
    response: str


def make_example(words: list[str]) -> Example:
    """`reverse-words` on `words`: the prompt lists them, the response gives them in reverse order."""
    return Example(f"Reverse the words: {' '.join(words)}\nReversed:", " " + " ".join(reversed(words)))


def continue_example(prompt: list[str], response: list[str]) -> Example:
    """`continue`: the prompt quotes `prompt` (words of a paragraph), the response is the words that follow."""
    return Example(f"Continue the text: {' '.join(prompt)}\nContinuation:", " " + " ".join(response))


def words_of(text: str, task: str) -> list[str]:
    """The task's words of a text: letter runs (`reverse-words`) or whitespace-separated tokens (`continue`)."""
    return _WORD.findall(text) if task == "reverse-words" else text.split()


def _windows(
    words: list[str], task: str, n_prompt: int, n_response: int
) -> list[tuple[list[str], list[str]]]:
    """(prompt words, response words) of the first non-overlapping windows of one paragraph."""
    size = n_prompt + (n_response if task == "continue" else 0)
    out = []
    for i in range(0, len(words) - size + 1, size):
        w = words[i : i + size]
        out.append((w[:n_prompt], w[n_prompt:] if task == "continue" else list(reversed(w))))
    return out[:_WINDOWS_PER_PART]


def _example(task: str, prompt: list[str], response: list[str]) -> Example:
    return make_example(prompt) if task == "reverse-words" else continue_example(prompt, response)


def _ngrams(words: list[str], n: int) -> set[str]:
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass
class TaskSource:
    """The corpus text the task is built from, split as every step splits it.

    `training_text` is everything the pipeline trains on, as strings: the training documents as
    packed and alignment's training windows decoded; held-out candidates seen there are dropped.
    """

    train_parts: list[str]
    heldout_parts: list[str]
    training_text: list[str]


def make_task(
    source: TaskSource,
    words: int,
    train_examples: int,
    heldout_examples: int,
    seed: int,
    task: str = "reverse-words",
    response_words: int = 8,
) -> tuple[list[Example], list[Example], dict]:
    """Build the (train, held-out) task sets from the split corpus, deterministically.

    Args:
        source: training and held-out paragraphs, and the text training saw (for de-duplication).
        words: words per prompt.
        train_examples / heldout_examples: how many examples of each split to keep.
        seed: which examples are kept (a seeded shuffle of all candidate windows).
        task: `reverse-words` or `continue`.
        response_words: words per response of `continue` (`reverse-words` answers with `words`).

    Returns:
        (training examples, held-out examples, counts: candidates and how many were dropped as seen).

    Raises:
        LoramError: the corpus yields fewer examples than asked for (naming the key to lower).
    """
    n_response = response_words if task == "continue" else words
    train_pool = [_example(task, p, r) for part in source.train_parts
                  for p, r in _windows(words_of(part, task), task, words, n_response)]  # fmt: skip
    seen: set[str] = set()
    for text in source.training_text:
        found = words_of(text, task)
        seen |= _ngrams(found, words) | _ngrams(found, n_response)
    held_pool: list[Example] = []
    candidates, dropped = 0, 0
    prompts: set[str] = set()
    for part in source.heldout_parts:
        for p, r in _windows(words_of(part, task), task, words, n_response):
            candidates += 1
            if " ".join(p) in seen or " ".join(r) in seen:
                dropped += 1
                continue
            example = _example(task, p, r)
            if example.prompt not in prompts:
                prompts.add(example.prompt)
                held_pool.append(example)
    rng = random.Random(seed)
    out = []
    for pool, want, key, split in (
        (train_pool, train_examples, "train_examples", "training"),
        (held_pool, heldout_examples, "heldout_examples", "held-out"),
    ):
        if len(pool) < want:
            raise LoramError(
                f"verify.{key}={want}, but the corpus's {split} paragraphs yield only {len(pool)} task examples "
                f"of verify.words={words} words (held-out ones never seen in training); lower verify.{key} or "
                "verify.words, or use a larger corpus."
            )
        rng.shuffle(pool)
        out.append(pool[:want])
    counts = {"heldout_candidates": candidates, "heldout_seen_in_training": dropped}
    return out[0], out[1], counts


def task_fingerprint(examples: list[Example]) -> str:
    """sha256 (16 hex digits) of the examples, in order: what the manifest records as the task."""
    blob = json.dumps([asdict(e) for e in examples]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Encoded:
    """Tokenized examples, right-padded: `labels` hold the response tokens and IGNORE elsewhere."""

    input_ids: torch.Tensor  # int64 [n, seq]
    attention_mask: torch.Tensor  # int64 [n, seq], 0 on padding
    labels: torch.Tensor  # int64 [n, seq]: the next token to predict is labels[:, 1:] (transformers' shift)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> Encoded:
        """The examples at `idx`."""
        return Encoded(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])


def encode(examples: list[Example], tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """Tokenize prompt and response separately (response ends with EOS) and right-pad the batch."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for e in examples:
        prompt = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(e.response, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((prompt + response, [IGNORE] * len(prompt) + response))
    seq = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), seq), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), seq), dtype=torch.long)
    labels = torch.full((len(rows), seq), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return Encoded(input_ids, attention, labels)


@dataclass
class TaskScore:
    """Held-out task loss: mean next-token NLL over response tokens only, and greedy token accuracy."""

    loss: float
    accuracy: float  # share of response tokens that are the model's argmax (teacher forced)
    tokens: int


@torch.no_grad()
def task_loss(model: nn.Module, data: Encoded, batch_size: int = 16) -> TaskScore:
    """Score `model` on the response tokens of `data` (prompt and padding excluded).

    Args:
        model: a causal LM (plain, pruned, or a peft model) returning `.logits` `[batch, seq, vocab]`.
        data: encoded examples.
        batch_size: examples per forward pass.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, correct, count = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        batch = data.select(torch.arange(start, min(start + batch_size, len(data))))
        logits = (
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
            .logits[:, :-1]
            .float()
        )
        targets = batch.labels[:, 1:].to(device)
        keep = targets != IGNORE
        nll += nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
        count += int(keep.sum())
    model.train(was_training)
    return TaskScore(loss=nll / count, accuracy=correct / count, tokens=count)
