"""The model card and the number wording it shares with the CLI: units, URIs, the recovery sentence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loram_core.card import consumer_uri, model_card
from loram_core.manifest import Manifest
from loram_core.report import format_bytes, format_gib, recovery_sentence

# The demo's figures (README): an NF4 footprint of 0.0013 GiB printed as "0.00 GB" before.
DEMO_PARAMS = {
    "original_params": 1_705_600, "pruned_params": 1_223_296, "reduction": 1.394,
    "hbm_gb": 1_223_296 * 2 / 2**30, "hbm_gb_4bit": 1_223_296 / 2 / 2**30, "hbm_gb_4bit_actual": 0.0013,
    "pruned_layers": [1, 2, 3, 4], "stored_params": 1_223_296, "nonzero_params": 1_223_296,
}  # fmt: skip


def _manifest(strategy: str = "random", **metrics: float) -> Manifest:
    empty: dict = {}
    return Manifest(
        name="demo-llama", version="v1", created_at="2026-01-01T00:00:00+00:00",
        base={"source": "demo", "fingerprint": "abc", "model_type": "llama"}, corpus=empty,
        prune={"strategy": strategy, "ratio": 0.65}, align=empty, quantize={"enabled": True},
        params=DEMO_PARAMS, metrics={"original_ppl": 60.2, "pruned_ppl": 68.74, "aligned_ppl": 60.58, **metrics},
        files=[], code_version="test",
    )  # fmt: skip


def test_sizes_use_binary_units_that_never_print_zero() -> None:
    assert format_gib(11.19) == "11.19 GiB"
    assert format_gib(0.0013) == "1.33 MiB"
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(12) == "12 B"


def test_card_is_in_gib_and_never_prints_zero_sizes(tmp_path: Path) -> None:
    card = model_card(_manifest(), f"file://{tmp_path}")
    assert not re.search(r"\bGB\b", card)
    assert "1.33 MiB" in card and "2.33 MiB" in card  # NF4 as stored; 16-bit weights
    assert "0.00" not in card


def test_card_gives_an_absolute_uri_for_a_relative_bucket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    card = model_card(_manifest(), "file://./bucket")
    uri = f"file://{tmp_path.resolve()}/bucket/demo-llama/v1"
    assert f"loram pull {uri} ./demo-llama-v1" in card
    assert f"loram recover --base {uri} " in card
    assert "file://./" not in card
    assert (
        consumer_uri("s3://b/x/") == "s3://b/x"
        and consumer_uri("bucket") == f"file://{tmp_path.resolve()}/bucket"
    )


def test_card_says_how_to_load_train_and_recover() -> None:
    structured = model_card(_manifest("structured"), "s3://bucket")
    assert 'from_pretrained("./demo-llama-v1/model", trust_remote_code=True' in structured
    assert "get_peft_model" in structured
    assert (
        'AutoPeftModelForCausalLM.from_pretrained("my-lora-full")' in structured
    )  # the adapter names the original
    assert (
        "loram recover --base s3://bucket/demo-llama/v1 --adapter my-lora --out my-lora-full\n" in structured
    )
    sparse = model_card(_manifest("semi"), "s3://bucket")
    assert "trust_remote_code" not in sparse and "stock architecture loads it as is" in sparse
    assert "--mode dense" in sparse


def test_recovery_above_100_percent_is_explained_and_no_damage_is_no_percentage() -> None:
    better = recovery_sentence({"original_ppl": 60.2, "pruned_ppl": 68.74, "aligned_ppl": 57.0})
    assert better.startswith("alignment recovered 137%") and "beats the original" in better
    assert "beats the original" not in recovery_sentence(
        {"original_ppl": 60.2, "pruned_ppl": 68.74, "aligned_ppl": 60.58}
    )
    none = recovery_sentence({"original_ppl": 60.2, "pruned_ppl": 60.1, "aligned_ppl": 59.0})
    assert "%" not in none and "no measurable damage" in none
    card = model_card(_manifest(aligned_ppl=57.0), "s3://bucket")
    assert "Alignment recovered 137% of the pruning damage" in card and "beats the original" in card


def test_a_prune_only_card_describes_only_what_the_version_holds() -> None:
    """No "aligned", no NF4 size and no `model-nf4/` for a version stopped after pruning without NF4."""
    m = _manifest("random")
    m.quantize = {"enabled": False}
    m.metrics = {"original_ppl": 60.2, "pruned_ppl": 68.74}
    card = model_card(m, "file:///b", remote_code=True)
    assert (
        "the pruned model (not aligned)" in card and "(not aligned: this run stopped after pruning)" in card
    )
    assert "aligned pruned model" not in card and "aligned to the original" not in card
    assert "model-nf4" not in card and "as NF4 stores it" not in card and "NF4 linears" not in card
    assert "`model/` ships `modeling_loram.py`" in card  # the remote-code paragraph, of model/ alone
    full = model_card(_manifest("random"), "file:///b", remote_code=True)
    assert "`model/` and `model-nf4/` ship" in full and "as NF4 stores it" in full and "NF4 linears" in full


def test_card_opens_with_hugging_face_metadata_naming_the_original() -> None:
    from huggingface_hub import ModelCard

    m = _manifest("structured")
    m.base.update(repo_id="meta-llama/Llama-3.1-8B", license="other", license_name="llama3.1",
                  license_link="LICENSE")  # fmt: skip
    card = model_card(m, "s3://bucket")
    assert card.startswith("---\nbase_model: meta-llama/Llama-3.1-8B\nbase_model_relation: finetune\n")
    meta = ModelCard(card).data.to_dict()  # the hub's own parser reads the block
    assert meta["library_name"] == "transformers" and meta["tags"] == ["loram", "pruned", "structured"]
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "llama3.1", "LICENSE")
    # Without a known repo id there is no base_model (nor a relation to it), and no invented license.
    demo = ModelCard(model_card(_manifest("semi"), "s3://bucket")).data.to_dict()
    assert "base_model" not in demo and "base_model_relation" not in demo and "license" not in demo
    assert demo["tags"] == ["loram", "pruned", "semi"]


def test_card_loads_each_variant_as_it_ships() -> None:
    m = _manifest("structured")
    uniform = model_card(m, "s3://bucket", remote_code={"model": False, "model-nf4": True, "uniform": True})
    assert 'AutoModelForCausalLM.from_pretrained("./demo-llama-v1/model", dtype="bfloat16")' in uniform
    assert "from_pretrained('./demo-llama-v1/model-nf4', trust_remote_code=True)" in uniform
    assert "`model-nf4/` ships `modeling_loram.py`" in uniform
    stock = model_card(m, "s3://bucket", remote_code={"model": False, "model-nf4": False, "uniform": True})
    assert "trust_remote_code" not in stock.replace("no `trust_remote_code`", "")
    assert "plain family config" in stock
