"""The verification task: an instruction-style set made from the corpus, and its response-only loss.

Each example shows a few consecutive words of a corpus document and asks for them in reverse
order. The answer is a pure function of the prompt, so the set is exact and reproducible from the
corpus bytes alone, and it is something a base model pretrained on prose does not do: after
`Reversed:` it continues with text, not with the prompt's words backwards. A LoRA learns the format,
to copy words from the prompt and (partly) their order, so its held-out loss falls far below the
untuned model's. Training examples come from the corpus's training documents, held-out ones from
its held-out documents (the same content-hash split as alignment and evaluation), so the scored
prompts are text no step ever trained on.
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

from loram_core.data import is_heldout
from loram_core.errors import LoramError

TASK_NAME = "reverse-words"
IGNORE = -100  # label of tokens the loss skips (prompt and padding), as transformers' loss expects
_WORD = re.compile(r"[A-Za-z]{3,12}")
_WINDOWS_PER_DOC = 2  # at most this many prompts from one document, so the set spans many documents


@dataclass(frozen=True)
class Example:
    """One prompt and the response the task expects (the response's tokens are the scored ones)."""

    prompt: str
    response: str


def make_example(words: list[str]) -> Example:
    """The task on `words`: the prompt lists them, the response gives them in reverse order."""
    return Example(f"Reverse the words: {' '.join(words)}\nReversed:", " " + " ".join(reversed(words)))


def _windows(doc: str, words: int) -> list[list[str]]:
    found = _WORD.findall(doc)
    return [found[i : i + words] for i in range(0, len(found) - words + 1, words)][:_WINDOWS_PER_DOC]


def make_task(
    docs: list[str],
    words: int,
    train_examples: int,
    heldout_examples: int,
    heldout_fraction: float,
    seed: int,
) -> tuple[list[Example], list[Example]]:
    """Build the (train, held-out) task sets from documents, deterministically.

    Args:
        docs: the corpus documents, in file order.
        words: words per prompt.
        train_examples / heldout_examples: how many examples of each split to keep.
        heldout_fraction: the corpus's held-out share (`corpus.heldout_fraction`): a document is
            held out by its content hash, as everywhere else in the pipeline.
        seed: which examples are kept (a seeded shuffle of all candidate windows).

    Raises:
        LoramError: the corpus yields fewer examples than asked for (naming the key to lower).
    """
    splits: dict[bool, list[Example]] = {False: [], True: []}
    for doc in docs:
        held = is_heldout(doc, heldout_fraction)
        splits[held] += [make_example(w) for w in _windows(doc, words)]
    rng = random.Random(seed)
    out = []
    for held, want, key in (
        (False, train_examples, "train_examples"),
        (True, heldout_examples, "heldout_examples"),
    ):
        pool = splits[held]
        if len(pool) < want:
            split = "held-out" if held else "training"
            raise LoramError(
                f"verify.{key}={want}, but the corpus's {split} documents yield only {len(pool)} task "
                f"examples of verify.words={words} words; lower verify.{key} or verify.words, or use a larger corpus."
            )
        rng.shuffle(pool)
        out.append(pool[:want])
    return out[0], out[1]


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
