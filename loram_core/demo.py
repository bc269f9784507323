"""The embedded default base model: a small LLaMA-architecture model built and pretrained here.

No model hub is reachable where this project is built and tested, so `base.source: demo` makes
its own base: a byte-level BPE tokenizer trained with `tokenizers` on the stdlib-docs corpus and
a GQA LLaMA of a few million parameters pretrained on the corpus's training documents (the
held-out documents are never seen). It is cached under `base.cache_dir`, keyed by its settings
and the corpus bytes, so a second run reuses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from loram_core.align import ProgressFn, train_causal_lm
from loram_core.config import AlignConfig, BaseConfig, CorpusConfig, DemoBaseConfig, fingerprint
from loram_core.data import demo_corpus_file, files_fingerprint, make_blocks, read_documents

# Bump when the recipe below changes, so caches built by older code are not reused.
RECIPE_VERSION = 2
SPECIALS = ["<unk>", "<s>", "</s>"]


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2/LLaMA-3 use): every string is encodable, no unknown bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def demo_key(base: BaseConfig, corpus: CorpusConfig, heldout_unit: str = "documents") -> str:
    """The demo base's cache key: its architecture, pretraining settings, corpus bytes and held-out rule."""
    corpus_file = demo_corpus_file(base.cache_dir)
    key = {
        "recipe": RECIPE_VERSION,
        "demo": base.demo.model_dump(),
        "corpus": files_fingerprint([str(corpus_file)]),
        "heldout_fraction": corpus.heldout_fraction,
    }
    if heldout_unit != "documents":  # the documents rule keeps the cache of earlier builds
        key["heldout_unit"] = heldout_unit
    return fingerprint(key)


def demo_architecture(d: DemoBaseConfig, **overrides: Any) -> LlamaConfig:
    """The demo base's LLaMA architecture (GQA, untied head) from its settings; `overrides` win."""
    return LlamaConfig(
        **{
            "vocab_size": d.vocab_size,
            "hidden_size": d.hidden_size,
            "intermediate_size": d.intermediate_size,
            "num_hidden_layers": d.num_hidden_layers,
            "num_attention_heads": d.num_attention_heads,
            "num_key_value_heads": d.num_key_value_heads,
            "tie_word_embeddings": False,
            **overrides,
        }
    )


def base_model_config(base: BaseConfig) -> PretrainedConfig:
    """The original model's config without loading weights: read from `base.source`, or the demo's."""
    if base.source != "demo":
        from loram_core.hub import parse_hub_id, snapshot
        from loram_core.prune.plan import read_model_config

        hub = parse_hub_id(base.source)  # a hub id: its config.json (with tokenizer and card) only
        return read_model_config(snapshot(hub, weights=False) if hub else base.source)
    return demo_architecture(base.demo)


def build_demo_base(
    base: BaseConfig,
    corpus: CorpusConfig,
    progress: ProgressFn | None = None,
    heldout_unit: Literal["documents", "tokens"] = "documents",
) -> Path:
    """Return the cached demo base checkpoint directory, building it first if needed.

    `corpus.heldout_fraction` (a share of `heldout_unit`) is held out of pretraining, so the
    base never sees the text the pipeline evaluates on.
    """
    out = Path(base.cache_dir).expanduser() / f"demo-base-{demo_key(base, corpus, heldout_unit)}"
    if (out / "model.safetensors").is_file():
        return out
    d = base.demo
    torch.manual_seed(d.seed)
    docs = read_documents([str(demo_corpus_file(base.cache_dir))], "text")
    tokenizer = train_tokenizer([doc.text() for doc in docs], d.vocab_size)
    blocks = make_blocks(
        docs, tokenizer, d.seq_len, corpus.heldout_fraction, seed=d.seed, heldout_unit=heldout_unit
    )
    config = demo_architecture(
        d,
        vocab_size=len(tokenizer),
        max_position_embeddings=4 * d.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    train_cfg = AlignConfig(
        steps=d.pretrain_steps,
        batch_size=d.batch_size,
        lr=d.lr,
        warmup_steps=max(1, d.pretrain_steps // 20),
        min_lr_ratio=0.1,
        weight_decay=0.01,
        freeze_lm_head=False,
        precision="fp32",
        checkpoint_every=100,
        log_every=10,
        seed=d.seed,
    )
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    # Checkpoints inside `.partial` make an interrupted build resume instead of starting over.
    train_causal_lm(model, blocks.train, train_cfg, checkpoint_dir=work, progress=progress)
    final = out.with_name(out.name + ".tmp")
    shutil.rmtree(final, ignore_errors=True)
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    final.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out
