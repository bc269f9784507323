"""Pipeline configuration: pydantic models mirrored 1:1 by the YAML presets in `configs/`.

A config is loaded with `load_config(path, overrides)`, where overrides are dotted assignments
such as `prune.ratio=0.5`. Every problem is reported as a `ConfigError` naming the key, the bad
value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loram_core.device import DEVICE_PATTERN
from loram_core.errors import ConfigError, LoramError
from loram_core.manifest import NAME_MAX, NAME_PATTERN

Strategy = Literal["random", "structured", "semi", "unstructured"]
Until = Literal["prune", "align", "quantize"]
STRUCTURED: tuple[str, ...] = ("random", "structured")
SPARSE: tuple[str, ...] = ("semi", "unstructured")


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `prune.ration` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DemoBaseConfig(_Section):
    """The small LLaMA-architecture model that `base.source: demo` builds and pretrains locally."""

    vocab_size: int = Field(2048, ge=256, description="BPE vocabulary trained on the demo corpus.")
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(384, ge=16)
    num_hidden_layers: int = Field(6, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1, description="Fewer than heads: a GQA model, as LLaMA-3.")
    seq_len: int = Field(128, ge=16, description="Pretraining block length in tokens.")
    pretrain_steps: int = Field(900, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> DemoBaseConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick sizes where it is"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        return self


class BaseConfig(_Section):
    """Where the original (unpruned) model comes from."""

    source: str = Field(
        "demo",
        description="`demo` (build the embedded small model); a directory holding a transformers checkpoint "
        "(config.json, safetensors weights, tokenizer); `s3://BUCKET/PREFIX` of one; or a Hugging Face hub id "
        "`ORG/NAME` or `ORG/NAME@REVISION` (branch, tag or commit; fetched with HF_TOKEN into the hub cache, "
        "offline from it with HF_HUB_OFFLINE=1). The rule: `hf://ORG/NAME[@REV]` is always the hub; a path "
        "that exists here is that directory; otherwise ORG/NAME[@REV] is a hub id.",
    )
    demo: DemoBaseConfig = DemoBaseConfig()
    cache_dir: str = Field("~/.cache/loram-provider", description="Where the demo model is cached.")

    @field_validator("source")
    @classmethod
    def _hub_form(cls, value: str) -> str:
        from loram_core.hub import parse_hub_id

        if value.startswith("hf://"):
            try:
                parse_hub_id(value)
            except LoramError as err:
                raise ValueError(str(err)) from None
        return value


class DatasetSource(_Section):
    """A dataset read through `datasets.load_dataset`: on the Hugging Face hub (offline from the
    datasets cache with HF_HUB_OFFLINE=1) or a local dataset folder."""

    name: str = Field(
        description="Hub dataset id `ORG/NAME` (e.g. HuggingFaceFW/fineweb), or a local dataset folder."
    )
    config: str | None = Field(None, description="The dataset's configuration (subset), e.g. `sample-10BT`.")
    split: str = Field("train", description="Split to read (`train`, or a slice such as `train[:10%]`).")
    text_field: str = Field("text", description="The column holding the text.")
    streaming: bool = Field(
        False,
        description="Read record by record without downloading the whole split first (what a few million "
        "tokens of a multi-terabyte dataset need; the mix's token budget bounds what is read).",
    )
    revision: str | None = Field(None, description="Branch, tag or commit of the dataset repo; unset: main.")


class MixSource(_Section):
    """One source of `corpus.mix`: files (`paths`) or a dataset (`dataset`), and its share of the tokens."""

    paths: list[str] | None = Field(
        None,
        description="Files/globs of text, jsonl or parquet (local or s3://), or `hf://datasets/ORG/NAME`.",
    )
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    text_field: str = Field(
        "text", description="The field holding the text (jsonl/parquet records of `paths`)."
    )
    dataset: DatasetSource | None = None
    weight: float = Field(gt=0, description="Share of the mix's tokens (weights are normalized to sum to 1).")
    label: str | None = Field(
        None, description="Name in the manifest's record of tokens drawn; unset: derived."
    )

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_kind(self) -> MixSource:
        if (self.paths is None) == (self.dataset is None):
            raise ValueError(
                "a corpus.mix source has either `paths` (files) or `dataset` (a datasets source), not both"
            )
        return self

    def describe(self) -> str:
        """The source's label: `label`, the dataset (`name[/config]:split`), or its first path."""
        if self.label:
            return self.label
        if self.dataset is not None:
            d = self.dataset
            return f"{d.name}{'/' + d.config if d.config else ''}:{d.split}"
        return self.paths[0] + (f" (+{len(self.paths) - 1})" if len(self.paths) > 1 else "")


class CorpusMix(_Section):
    """Several sources interleaved into one corpus, each drawn to its share of a token budget.

    Documents are drawn one at a time from a source chosen at random (seeded) among those still below
    their share, the chance proportional to its weight, until every source has its share (the document
    that crosses it is kept whole) or, with `first_exhausted`, one runs out. Tokens are counted with the
    base model's tokenizer; how many each source gave is recorded in the manifest.
    """

    sources: list[MixSource] = Field(min_length=1, description="The sources and their weights.")
    tokens: int = Field(
        ge=1, description="Total token budget of the mix (before the held-out split and max_tokens)."
    )
    seed: int = Field(
        0, description="Seed of the interleaving: the same seed draws the same documents in the same order."
    )
    stopping: Literal["first_exhausted", "all_exhausted"] = Field(
        "all_exhausted",
        description="A source that runs out before its share: `all_exhausted` starts it over (its documents repeat, "
        "as datasets.interleave_datasets' oversampling and the LoRAM reference do), `first_exhausted` ends the mix.",
    )


class CorpusConfig(_Section):
    """The general text corpus used for calibration, alignment and held-out perplexity."""

    paths: list[str] | Literal["demo"] = Field(
        "demo",
        description="`demo` (text the project builds from the Python standard library's documentation), "
        "files/globs of text, jsonl or parquet, or `hf://datasets/ORG/NAME[@REV]` (its train split via `datasets`).",
    )
    mix: CorpusMix | None = Field(
        None,
        description="Several sources with weights and a token budget, interleaved by seed; replaces `paths`.",
    )
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    text_field: str = "text"
    seq_len: int = Field(256, ge=16, description="Block length in tokens for alignment and evaluation.")

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return _paths_or(value, "demo", "corpus.paths")

    max_tokens: int | None = Field(None, ge=1, description="Token budget for the training split.")

    @model_validator(mode="after")
    def _mix_or_paths(self) -> CorpusConfig:
        if self.mix is not None and self.paths != "demo":
            raise ValueError(
                f"corpus.paths={self.paths} and corpus.mix both name the corpus; list the files as a mix source "
                "(`paths:` of one of corpus.mix.sources) or drop corpus.mix"
            )
        return self

    heldout_fraction: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Share of documents (paragraphs of a text file) held out for perplexity, each chosen by its "
        "content hash; `eval.heldout_fraction`, when set, holds out a share of tokens instead.",
    )
    eval_blocks: int = Field(32, ge=1, description="Held-out blocks scored for perplexity.")
    seed: int = 0


class PruneConfig(_Section):
    """Pruning: which strategy, how much, and which layers."""

    strategy: Strategy = "random"
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="Fraction removed, 0 < ratio < 1.")
    keep_first: int | None = Field(
        None, ge=0, description="Leading layers left dense; default 4 (structured) or 0 (sparse)."
    )
    keep_last: int | None = Field(
        None, ge=0, description="Trailing layers left dense; default 2 (structured) or 0 (sparse)."
    )
    importance: Literal["param_first", "vector", "param_second", "param_mix"] = Field(
        "param_first",
        description="Taylor estimator for `structured` (LLM-Pruner's `--taylor`; `vector` is its `vectorize`).",
    )
    group_reduction: Literal["sum", "mean", "max", "prod", "first"] = Field(
        "sum",
        description="How `structured` combines the per-channel scores of a coupled group's linears (LLM-Pruner's "
        "`--grouping_strategy`, default sum); `first` takes the group's root (gate, and k with GQA or q without).",
    )
    round_to: int = Field(
        1,
        ge=1,
        description="Structured strategies: kept MLP widths rounded down to a multiple of this (Torch-Pruning's "
        "`round_to`; 64 or 128 suit tensor cores); 1 keeps the paper's counts. Heads are whole already.",
    )
    sparse_method: Literal["sparsegpt", "wanda", "magnitude"] = Field(
        "sparsegpt", description="Solver for `semi` and `unstructured`; wanda and magnitude are baselines."
    )
    n_m: tuple[int, int] = Field(
        (2, 4), description="n:m pattern for `semi`: n zeros in every m weights; `2:4`, `2,4` or `[2, 4]`."
    )
    calib_samples: int | None = Field(
        32,
        ge=1,
        description="Deprecated alias of `calibration.samples`: when set in a pipeline config it decides that "
        "key (the pipeline keeps both equal). Outside a pipeline: how many of the given blocks are used.",
    )
    damp: float = Field(0.01, gt=0, description="SparseGPT damping, a fraction of the mean Hessian diagonal.")
    blocksize: int = Field(128, ge=1, description="SparseGPT column block size.")
    true_sequential: bool = Field(
        False,
        description="Sparse strategies: within a layer prune q/k/v, then o, then gate/up, then down, each group "
        "calibrated on inputs recomputed through the already pruned ones (SparseGPT's `--true-sequential`).",
    )
    layerwise: Literal["uniform", "owl"] = Field(
        "uniform",
        description="`unstructured` only: `uniform` prunes every layer at `ratio`; `owl` gives layers with more "
        "outlier Wanda scores a lower ratio (OWL, Yin et al. 2023), averaging to `ratio` over the pruned layers.",
    )
    owl_m: float = Field(
        5.0, gt=0, description="OWL's M: a Wanda score above M x its layer's mean score is an outlier."
    )
    owl_lambda: float = Field(
        0.08, gt=0, lt=0.5, description="OWL's lambda: each layer's ratio stays within `ratio` +- this."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights' dtype while pruning (and of the pruned checkpoint); `auto`: bfloat16 on a "
        "GPU, float32 on the CPU. Hessians and Taylor scores are float32 either way.",
    )
    device_map: str | None = Field(
        None,
        description="Taylor scoring on the whole model placed by accelerate (e.g. `auto` over several GPUs; "
        "offloading to CPU or disk is refused). Unset: streamed, one decoder layer resident at a time.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the whole-model Taylor backward (with `device_map`)."
    )
    seed: int = 0

    @field_validator("n_m", mode="before")
    @classmethod
    def _n_m_forms(cls, value: Any) -> Any:
        return parse_n_m(value)

    @model_validator(mode="after")
    def _owl_needs_unstructured(self) -> PruneConfig:
        if self.layerwise != "owl":
            return self
        if self.strategy != "unstructured":
            raise ValueError(
                f"prune.layerwise=owl gives each layer its own sparsity ratio, which only the `unstructured` "
                f"strategy has (prune.strategy={self.strategy!r}: n:m patterns and structured widths are fixed); "
                "set prune.strategy=unstructured or prune.layerwise=uniform"
            )
        if self.ratio - self.owl_lambda <= 0 or self.ratio + self.owl_lambda >= 1:
            raise ValueError(
                f"prune.layerwise=owl moves each layer's ratio by up to prune.owl_lambda={self.owl_lambda} around "
                f"prune.ratio={self.ratio}, which leaves (0, 1); lower prune.owl_lambda below "
                f"{min(self.ratio, 1 - self.ratio):g}"
            )
        return self

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """The `[start, stop)` range of decoder layers this config prunes."""
        first = self.keep_first if self.keep_first is not None else (4 if self.strategy in STRUCTURED else 0)
        last = self.keep_last if self.keep_last is not None else (2 if self.strategy in STRUCTURED else 0)
        if first + last >= num_layers:
            raise ConfigError(
                f"prune.keep_first={first} and prune.keep_last={last} leave no layer to prune in a "
                f"model with {num_layers} layers; lower them so that keep_first + keep_last < {num_layers}."
            )
        return first, num_layers - last


class _TextSource(_Section):
    """A data section's text: the corpus (`corpus`) or files of its own, read as `format`."""

    key: ClassVar[str]  # the section's name in the config, for messages
    source: Literal["corpus"] | list[str] = "corpus"
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    text_field: str = "text"

    @field_validator("source", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return _paths_or(value, "corpus", f"{cls.key}.source")


class CalibrationConfig(_TextSource):
    """Calibration text for pruning (SparseGPT's Hessians, Taylor gradients): `samples` x `seq_len` tokens."""

    key: ClassVar[str] = "calibration"
    source: Literal["corpus"] | list[str] = Field(
        "corpus",
        description="`corpus`: blocks of the corpus's training split (never its held-out text), or "
        "files/globs of text, jsonl or parquet of its own (local or s3://).",
    )
    samples: int = Field(
        32, ge=1, description="Calibration blocks (sequences), as llmcompressor's num_calibration_samples."
    )
    seq_len: int | None = Field(
        None, ge=16, description="Tokens per block (llmcompressor's max_seq_length); unset: corpus.seq_len."
    )
    seed: int | None = Field(
        None,
        description="Shuffle of the blocks before the first `samples` are taken; unset: the source's own order "
        "(the corpus's training order, shuffled by corpus.seed; a file's first samples x seq_len tokens).",
    )


class EvalConfig(_TextSource):
    """The held-out text every model's perplexity is measured on."""

    key: ClassVar[str] = "eval"
    source: Literal["corpus"] | list[str] = Field(
        "corpus",
        description="`corpus`: the corpus's held-out split (never trained on), or files/globs of text, jsonl "
        "or parquet of its own, scored from their start.",
    )
    heldout_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Share of the corpus's tokens held out of training: whole documents in the order of their "
        "content hash, each while it fits in the share; unset: corpus.heldout_fraction, a share of documents.",
    )
    blocks: int | None = Field(
        None,
        ge=1,
        description="Held-out stream length in windows of seq_len tokens; unset: corpus.eval_blocks.",
    )
    seq_len: int | None = Field(
        None, ge=16, description="Tokens per window (the context); unset: corpus.seq_len."
    )
    stride: int | None = Field(
        None,
        ge=1,
        description="Tokens between window starts, at most seq_len: overlapping windows, each scoring only its "
        "last `stride` tokens (HF's perplexity guide); unset: non-overlapping windows (SparseGPT, Wanda, lm-eval).",
    )


class AlignConfig(_Section):
    """Alignment of the pruned model on the corpus: continual pre-training, distillation from the original, or both."""

    enabled: bool = True
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "flora"] = "adamw"
    flora_rank: int = Field(8, ge=1)
    flora_kappa: int = Field(100, ge=1, description="FLoRA resamples its projection every kappa steps.")
    freeze_lm_head: bool = True
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "bf16-master"] = Field(
        "auto",
        description="`auto`: bf16 autocast where the device supports it, else fp32; `bf16-master`: trained "
        "weights stored in bf16, the optimizer stepping fp32 master copies (FSDP2: bf16 compute, fp32 reduce).",
    )
    micro_batch_size: int | Literal["auto"] | None = Field(
        None,
        description="Samples per forward/backward within a batch (gradients accumulate over them): unset "
        "= batch_size; `auto` = the largest that fits in free GPU memory (probed once; batch_size on the CPU).",
    )
    loss_chunk_tokens: int | None = Field(
        4096,
        ge=1,
        description="Next-token loss computed over this many tokens at a time, the vocabulary logits "
        "recomputed in backward, so they never all exist at once; unset: the model's own loss.",
    )
    objective: Literal["cpt", "kd", "cpt+kd"] = Field(
        "cpt",
        description="What alignment minimises: `cpt` the next-token loss (continual pre-training, as LoRAM); "
        "`kd` the KL divergence from the original (the teacher: the pipeline's base, frozen) to the pruned "
        "model at kd_temperature, times its square; `cpt+kd` (1 - kd_weight) x next-token + kd_weight x kd.",
    )
    kd_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="`cpt+kd`: the distillation term's share of the loss (torchtune's kd_ratio).",
    )
    kd_temperature: float = Field(
        1.0,
        gt=0,
        description="Softmax temperature of teacher and student in the KL (scaled back by its square).",
    )
    kd_mode: Literal["online", "topk"] = Field(
        "online",
        description="How the teacher is fed: `online` runs it on every micro-batch beside the student; `topk` "
        "computes its kd_topk largest probabilities of every training block once (cached in the work dir, "
        "reused by later runs) and lumps the rest of its mass into one bucket.",
    )
    kd_topk: int = Field(
        64,
        ge=1,
        description="`kd_mode: topk`: teacher probabilities kept per position (at most the vocabulary).",
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16", "nf4"] = Field(
        "auto",
        description="The teacher's weights: `auto` is bfloat16 on a GPU and float32 on the CPU; `nf4` "
        "(bitsandbytes 4-bit, GPU only) for a teacher that must share the GPU with the student.",
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (GPU; first steps are slower)."
    )
    nproc_per_node: int = Field(
        1, ge=1, description="1: train in the task's process; >1: launch the loop under torchrun."
    )
    parallel: Literal["ddp", "fsdp"] = Field("fsdp", description="How torchrun's processes share the model.")
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    deadline_minutes: float | None = Field(
        None,
        gt=0,
        description="Stop alignment (its torchrun process group, or the in-process loop at its next log "
        "line) after this many minutes with a clear error; the checkpoint is kept, so a re-run resumes. "
        "Prefect's timeout_seconds cannot interrupt blocking GPU code; this can.",
    )
    eval_every: int | None = Field(
        50,
        ge=1,
        description="Held-out loss of the model being aligned every this many steps (at the first log line at "
        "or after it, and at the end), on 8 of the eval blocks, drawn on the UI's loss curve beside the "
        "original's; a forward pass of 8 blocks each (in-process alignment only); null: none.",
    )
    seed: int = 0


class QuantizeConfig(_Section):
    """Optional 4-bit variant (QLoRAM), made with bitsandbytes."""

    enabled: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class EvaluateConfig(_Section):
    """Held-out perplexity of the original, pruned, aligned and 4-bit models."""

    batch_size: int = Field(8, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights' dtype while scoring; `auto`: bfloat16 on a GPU, float32 on the CPU."
    )


class PublishConfig(_Section):
    """Where and under which name the result is published."""

    uri: str = Field("file://./bucket", description="fsspec URI of the bucket root (file://, s3://).")
    name: str = Field("demo-llama", pattern=NAME_PATTERN, max_length=NAME_MAX)
    version: str | None = Field(
        None, pattern=NAME_PATTERN, max_length=NAME_MAX, description="Default: UTC timestamp of the run."
    )
    check_create_only: bool = Field(
        True,
        description="Before publishing, check that the store refuses a second create-only write (If-None-Match), "
        "which is what makes a version immutable; false only for a store written by one publisher alone.",
    )
    enabled: bool = Field(
        True,
        description="false: the version (same layout, manifest included) is written under "
        "`<workdir>/local-bucket` instead of `uri`.",
    )
    latest: Literal["auto", True, False] = Field(
        "auto",
        description="Whether `<name>/LATEST` moves to this version: `auto` only when the run made what the name "
        "promises (aligned, and quantized unless `quantize.enabled` is false); true always; false never.",
    )
    max_shard_size: int | str = Field(
        "5GB",
        description="Largest safetensors shard of `model/` and `model-nf4/` (save_pretrained's max_shard_size): "
        "bytes, or a number with KB/MB/GB/TB (decimal) or KiB/MiB/GiB/TiB; more than one shard gets "
        "model.safetensors.index.json.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype of the published `model/` (the pruned and the aligned checkpoint are written "
        "in it, so their perplexities are those of the files): `auto` is the base's dtype when it is "
        "bfloat16 or float16, else bfloat16. Alignment trains float32 master weights either way.",
    )

    @field_validator("max_shard_size")
    @classmethod
    def _a_size(cls, value: int | str) -> int | str:
        from loram_core.hf_layout import parse_size

        try:
            parse_size(value)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return value


LoraTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class VerifyConfig(_Section):
    """Verification: a LoRA trained on the published base, recovered and run on the original (LoRAM Fig. 6).

    Off by default; `loram verify CONFIG` turns it on. It runs after evaluate and before publish, so
    the version's model card and manifest carry its table. See `loram_core/verify/`.
    """

    enabled: bool = False
    task: Literal["reverse-words", "continue"] = Field(
        "reverse-words",
        description="`reverse-words`: reverse `words` words of a paragraph; `continue`: give the `response_words` "
        "words that follow `words` words of a paragraph (unseen text: the model's knowledge of the language counts).",
    )
    words: int = Field(5, ge=2, le=64, description="Words per task prompt.")
    response_words: int = Field(
        8,
        ge=1,
        le=64,
        description="Words per response of the `continue` task (`reverse-words` answers with `words`).",
    )
    train_examples: int = Field(512, ge=8, description="Task examples from the corpus's training paragraphs.")
    heldout_examples: int = Field(
        64, ge=8, description="Task examples from its held-out paragraphs, none seen in training (scored)."
    )
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scaling alpha / r).")
    target_modules: list[LoraTarget] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linears that get a LoRA (attention and MLP projections).",
    )
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(5, ge=0)
    recover_mode: Literal["auto", "zeroA", "normA", "dense", "mask", "complement"] = Field(
        "auto", description="`loram recover`'s mode: auto is zeroA (structured) or dense (sparse)."
    )
    reference: bool = Field(True, description="Also train the LoRA on the original itself (the upper bound).")
    seeds: int = Field(
        3,
        ge=1,
        le=16,
        description="LoRAs per row, seeded seed, seed+1, ...: each row reports the mean and the sample standard "
        "deviation over them.",
    )
    seed: int = Field(
        0, description="First LoRA seed (init and batch order), and the seed choosing the task examples."
    )


class RunContext(_Section):
    """What the model steps share besides their own section: where outputs go and where they compute."""

    workdir: str = Field(description="Step outputs, keyed by the hash of their inputs.")
    device: str = Field(pattern=DEVICE_PATTERN, description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="`publish.dtype`: what prune and align write their checkpoints in."
    )
    gpus: list[int] | None = Field(
        None,
        description="GPU indices of the host this step holds (set by the GPU lease; torchrun's devices).",
    )


class PipelineConfig(_Section):
    """The whole provider job; one section per step."""

    workdir: str = Field(".loram/work", description="Step outputs, keyed by the hash of their inputs.")
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="Where prune, align, quantize and evaluate compute: `auto` (the first GPU when CUDA is "
        "present, else the CPU), `cpu`, `cuda` or `cuda:N`.",
    )
    until: Until = Field(
        "quantize",
        description="The last model step to run: `prune`, `align` or `quantize`; evaluation and publishing "
        "always follow, on the models that were made.",
    )
    base: BaseConfig = BaseConfig()
    corpus: CorpusConfig = CorpusConfig()
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    prune: PruneConfig = PruneConfig()
    align: AlignConfig = AlignConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    publish: PublishConfig = PublishConfig()
    verify: VerifyConfig = VerifyConfig()
    credentials_block: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="A saved Prefect `aws-credentials` block (prefect-aws's AwsCredentials) whose key, region and "
        "endpoint every s3:// access of the run uses; unset: the standard AWS environment.",
    )
    notify_block: str | None = Field(
        None,
        pattern=r"^[a-z0-9-]+/[A-Za-z0-9._-]+$",
        description="A saved Prefect notification block, `<type-slug>/<name>` (e.g. `slack-webhook/ml-alerts`), "
        "told when a run fails or crashes.",
    )

    @model_validator(mode="after")
    def _calib_samples_alias(self) -> PipelineConfig:
        # `prune.calib_samples` predates the calibration section: set, it still decides (so configs and
        # overrides written for it keep their meaning); the two are then kept equal, so that a dumped
        # config validates again unchanged.
        old = self.prune.calib_samples if "calib_samples" in self.prune.model_fields_set else None
        if old is not None and old != self.calibration.samples:
            self.calibration.samples = old
        if self.prune.calib_samples != self.calibration.samples:
            self.prune.calib_samples = self.calibration.samples
        return self

    @model_validator(mode="after")
    def _stride_fits_the_window(self) -> PipelineConfig:
        window = self.eval.seq_len or self.corpus.seq_len
        if self.eval.stride is not None and self.eval.stride > window:
            raise ValueError(
                f"eval.stride={self.eval.stride} is longer than the window (eval.seq_len, else corpus.seq_len: "
                f"{window}); use a stride of at most {window}, or unset it for non-overlapping windows"
            )
        return self

    @property
    def context(self) -> RunContext:
        """The run's work dir, device and checkpoint dtype: what prune, align and quantize get beside their own section."""
        return RunContext(workdir=self.workdir, device=self.device, dtype=self.publish.dtype)

    def reads_corpus(self) -> bool:
        """Whether any step of this run reads the packed corpus: alignment trains on it, and calibration
        and evaluation read it unless they have files of their own (`source`). When none does, the run
        does not tokenize it at all."""
        return self.runs("align") or self.calibration.source == "corpus" or self.eval.source == "corpus"

    def runs(self, step: Literal["align", "quantize", "verify"]) -> bool:
        """Whether this run makes the model of `step` (`until` reaches it and its section is enabled).

        Verification needs the aligned model: it runs when enabled and alignment runs.
        """
        if step == "verify":
            return self.verify.enabled and self.runs("align")
        if step == "align":
            return self.until != "prune" and self.align.enabled
        return self.until == "quantize" and self.quantize.enabled


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (configs, file lists) for step keys."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_N_M = re.compile(r"^\s*\(?\[?\s*(\d+)\s*[:,]\s*(\d+)\s*\]?\)?\s*$")
N_M_FORMS = "`2:4`, `2,4` or `[2, 4]` (n zeros in every m weights; quote 2:4 in YAML, which reads it as 124)"


def parse_n_m(value: Any) -> Any:
    """`2:4`, `2,4`, `[2, 4]` or `(2, 4)` as `(2, 4)`; anything else is refused naming the accepted forms."""
    if isinstance(value, str):
        match = _N_M.match(value)
        if match:
            return int(match[1]), int(match[2])
    elif isinstance(value, list | tuple) and len(value) == 2:
        return tuple(value)
    raise ValueError(f"{value!r} is not an n:m pattern; write {N_M_FORMS}")


def _paths_or(value: Any, word: str, key: str) -> Any:
    """A single path where a list is expected becomes a one-item list; other types name the forms."""
    if isinstance(value, str):
        return value if value == word else [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(
        f"{value!r} is not `{word}`, a path or a list of paths; write {key}={word}, {key}=FILE or {key}=[A, B]"
    )


def _parse_value(raw: str) -> Any:
    # YAML scalars give the natural types: 0.5 -> float, true -> bool, [2, 4] -> list, x -> str.
    # YAML 1.1 reads `2:4` as the base-60 integer 124; on the command line that is never what is meant.
    if re.fullmatch(r"\s*\d+(\s*:\s*\d+)+\s*", raw):
        return raw.strip()
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key.sub=value` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form key.sub=value (for example prune.ratio=0.5)."
            )
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section.")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def _section_fields(loc: tuple) -> list[str]:
    """The keys allowed beside the unknown key at `loc` (the fields of the section it sits in)."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(getattr(model, "model_fields", {}))


def _did_you_mean(loc: tuple) -> str:
    """`; did you mean `prune.ratio`?` for a misspelt key (difflib over its section's keys), else ''."""
    import difflib

    close = difflib.get_close_matches(str(loc[-1]), _section_fields(loc), n=1, cutoff=0.6)
    prefix = "".join(f"{p}." for p in loc[:-1])
    return f"; did you mean `{prefix}{close[0]}`?" if close else ""


def _where(key: str, source: str, overridden: dict[str, str]) -> str:
    """Where a bad key came from: the command line (quoting the override) or the file `source`."""
    for override_key, item in overridden.items():
        if key == override_key or key.startswith(override_key + ".") or override_key.startswith(key + "."):
            return f"set on the command line: {item}"
    return f"in {source}"


def _format_validation_error(
    err: ValidationError, source: str, overridden: dict[str, str] | None = None
) -> str:
    overridden = overridden or {}
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        where = _where(key, source, overridden) if overridden else f"in {source}"
        if e["type"] == "extra_forbidden":
            lines.append(
                f"unknown key `{key}` ({where}){_did_you_mean(e['loc'])} (configs/demo.yaml lists every key)"
            )
        else:
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" = {value!r}"
            lines.append(f"`{key}`{shown}: {e['msg']} ({where})")
    return "invalid configuration: " + "; ".join(lines) + "."


def parse_config(
    data: dict[str, Any], source: str = "config", overridden: dict[str, str] | None = None
) -> PipelineConfig:
    """Validate a nested dict into a `PipelineConfig`, raising `ConfigError` on any problem.

    Args:
        data: the config as nested sections.
        source: where `data` came from, for messages (a file name, "flow parameters").
        overridden: dotted keys set on the command line -> the override as typed, so that a bad
            one is blamed on the command line rather than on `source`.
    """
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, overridden)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML preset, apply dotted overrides and validate.

    Raises:
        ConfigError: the file is missing or not YAML, or a key or value is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass a YAML preset such as configs/demo.yaml."
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (base, prune, ...).")
    apply_overrides(data, overrides or [])
    overridden = {item.partition("=")[0]: item for item in overrides or []}
    return parse_config(data, source=str(path), overridden=overridden)
