import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from loram_core.config import PruneConfig
from loram_core.errors import LoramError
from loram_core.models import load_model
from loram_core.prune import prune_checkpoint, save_masks
from loram_core.prune.structured import kept_query_rows
from loram_core.recover import merge, recover
from tests.conftest import tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model.model.layers"


def _pruned_base(
    tmp: Path, strategy: str = "random", family: str = "llama", **overrides
) -> tuple[Path, Path]:
    """(original checkpoint, pruned checkpoint with masks/) of a 4-layer tiny model; layers 1-2 pruned."""
    original = tmp / "original"
    tiny_model(family, num_hidden_layers=4, **overrides).save_pretrained(original)
    cfg = PruneConfig(strategy=strategy, ratio=0.5, keep_first=1, keep_last=1, calib_samples=4)
    pruned = tmp / "pruned"
    masks = prune_checkpoint(original, pruned, cfg, torch.randint(0, 128, (4, 16)))
    save_masks(masks, pruned / "masks" / "masks.safetensors")
    return original, pruned


def _adapter(model_dir: Path, out: Path, r: int = 4, seed: int = 1, **lora) -> Path:
    """A trained-looking (random, B non-zero) LoRA adapter on the model in `model_dir`."""
    torch.manual_seed(seed)
    model = load_model(model_dir)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=lora.pop("target_modules", TARGETS),
                     init_lora_weights=False, **lora)  # fmt: skip
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def _delta(tensors: dict, module: str, scaling: float) -> torch.Tensor:
    return tensors[f"{PREFIX}.{module}.lora_B.weight"] @ tensors[f"{PREFIX}.{module}.lora_A.weight"] * scaling


def _keep(idx: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    keep[idx] = True
    return keep


@pytest.mark.parametrize(
    ("strategy", "family", "overrides"),
    [("random", "llama", {}), ("structured", "qwen2", {}), ("random", "llama", {"num_key_value_heads": 4})],
)
def test_zero_fill_delta_equals_the_pruned_delta_on_kept_rows_and_columns_and_is_zero_elsewhere(
    tmp_path, strategy, family, overrides
) -> None:
    original, pruned = _pruned_base(tmp_path, strategy, family, **overrides)
    _adapter(pruned, tmp_path / "small")
    result = recover(pruned, tmp_path / "small", tmp_path / "rec", original=original)
    small = load_file(tmp_path / "small" / "adapter_model.safetensors")
    rec = load_file(tmp_path / "rec" / "adapter_model.safetensors")
    masks = load_file(pruned / "masks" / "masks.safetensors")
    heads = overrides.get("num_key_value_heads", 2)
    group, hd = 4 // heads, 16
    assert result.mode == "zeroA" and len(result.grown) == 14 and len(result.unchanged) == 14
    for i in (1, 2):
        channels = masks[f"model.layers.{i}.mlp.kept_channels"].long()
        kv = masks[f"model.layers.{i}.self_attn.kept_kv_heads"].long()
        rows = {"self_attn.q_proj": kept_query_rows(kv, group, hd), "self_attn.k_proj": kept_query_rows(kv, 1, hd),
                "self_attn.v_proj": kept_query_rows(kv, 1, hd), "mlp.gate_proj": channels, "mlp.up_proj": channels}  # fmt: skip
        cols = {"self_attn.o_proj": kept_query_rows(kv, group, hd), "mlp.down_proj": channels}
        for name, idx in rows.items():
            full, part = _delta(rec, f"{i}.{name}", 2.0), _delta(small, f"{i}.{name}", 2.0)
            torch.testing.assert_close(full[idx], part, rtol=0, atol=0)
            assert full.shape[0] == {"self_attn.q_proj": 64, "mlp.gate_proj": 128, "mlp.up_proj": 128}.get(
                name, heads * hd
            )
            assert torch.all(full[~_keep(idx, full.shape[0])] == 0)
        for name, idx in cols.items():
            full, part = _delta(rec, f"{i}.{name}", 2.0), _delta(small, f"{i}.{name}", 2.0)
            torch.testing.assert_close(full[:, idx], part, rtol=0, atol=0)
            assert full.shape[1] == {"self_attn.o_proj": 64, "mlp.down_proj": 128}[name]
            assert torch.all(full[:, ~_keep(idx, full.shape[1])] == 0)
    for key in small:  # the dense layers' factors pass through bit for bit
        if ".layers.0." in key or ".layers.3." in key:
            assert torch.equal(rec[key], small[key])


def test_recovered_adapter_loads_in_peft_on_the_original_and_merge_equals_peft_merge(tmp_path) -> None:
    original, pruned = _pruned_base(tmp_path)
    _adapter(
        pruned,
        tmp_path / "small",
        target_modules=[*TARGETS, "lm_head", "embed_tokens"],
        rank_pattern={"layers.2.mlp.down_proj": 2},
    )
    recover(pruned, tmp_path / "small", tmp_path / "rec", original=original)
    config = json.loads((tmp_path / "rec" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(original)
    assert config["rank_pattern"] == {"layers.2.mlp.down_proj": 2}
    peft_model = PeftModel.from_pretrained(load_model(original), tmp_path / "rec")
    result = peft_model.load_adapter(tmp_path / "rec", adapter_name="again")
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k and ".again." in k] == []
    assert peft_model.base_model.model.model.layers[2].mlp.down_proj.lora_A["again"].weight.shape == (2, 128)
    reference = peft_model.merge_and_unload(adapter_names=["default"]).state_dict()
    merged = merge(original, tmp_path / "rec", tmp_path / "merged", dtype="float32")
    assert len(merged) == 4 * 7 + 2
    ours = load_model(tmp_path / "merged").state_dict()
    for name, w in reference.items():
        torch.testing.assert_close(ours[name], w, rtol=1e-6, atol=1e-6)
    assert (tmp_path / "merged" / "config.json").is_file()


def test_lora_bias_rows_are_zero_filled_and_merged_like_peft(tmp_path) -> None:
    original, pruned = _pruned_base(tmp_path, family="qwen2")
    _adapter(pruned, tmp_path / "small", target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    recover(pruned, tmp_path / "small", tmp_path / "rec", original=original)
    small = load_file(tmp_path / "small" / "adapter_model.safetensors")
    rec = load_file(tmp_path / "rec" / "adapter_model.safetensors")
    kv = load_file(pruned / "masks" / "masks.safetensors")["model.layers.2.self_attn.kept_kv_heads"].long()
    key = f"{PREFIX}.2.self_attn.k_proj.lora_B.bias"
    assert rec[key].shape == (32,) and torch.equal(rec[key][kept_query_rows(kv, 1, 16)], small[key])
    assert torch.all(rec[key][~_keep(kept_query_rows(kv, 1, 16), 32)] == 0)
    peft_model = PeftModel.from_pretrained(load_model(original), tmp_path / "rec")
    reference = peft_model.merge_and_unload().state_dict()
    merge(original, tmp_path / "rec", tmp_path / "merged", dtype="float32")
    ours = load_model(tmp_path / "merged").state_dict()
    for name in ("model.layers.2.self_attn.k_proj.bias", "model.layers.1.self_attn.q_proj.weight"):
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-6, atol=1e-6)


def test_norm_fill_draws_pruned_columns_of_a_from_n_0_1_over_r_and_is_seeded(tmp_path) -> None:
    original, pruned = _pruned_base(tmp_path)
    _adapter(pruned, tmp_path / "small", r=8)
    recover(pruned, tmp_path / "small", tmp_path / "a", mode="normA", original=original, seed=3)
    recover(pruned, tmp_path / "small", tmp_path / "b", mode="normA", original=original, seed=3)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b"))
    small = load_file(tmp_path / "small" / "adapter_model.safetensors")
    channels = load_file(pruned / "masks" / "masks.safetensors")["model.layers.1.mlp.kept_channels"].long()
    key = f"{PREFIX}.1.mlp.down_proj.lora_A.weight"
    assert torch.equal(a[key], b[key])
    torch.testing.assert_close(a[key][:, channels], small[key], rtol=0, atol=0)
    filled = a[key][:, ~_keep(channels, 128)]
    assert filled.shape == (8, 64) and filled.std().item() == pytest.approx(1 / 8, rel=0.2)
    gate_b = a[f"{PREFIX}.1.mlp.gate_proj.lora_B.weight"]
    assert torch.all(gate_b[~_keep(channels, 128)] == 0)  # B rows stay zero in normA too


def test_sparse_dense_passes_the_adapter_through_and_masked_modes_merge_the_masked_delta(tmp_path) -> None:
    original, pruned = _pruned_base(tmp_path, strategy="semi")
    _adapter(pruned, tmp_path / "small")
    dense = recover(pruned, tmp_path / "small", tmp_path / "dense", original="org/tiny-llama")
    assert dense.mode == "dense" and not dense.merged
    small = load_file(tmp_path / "small" / "adapter_model.safetensors")
    rec = load_file(tmp_path / "dense" / "adapter_model.safetensors")
    assert small.keys() == rec.keys() and all(torch.equal(small[k], rec[k]) for k in small)
    assert (
        json.loads((tmp_path / "dense" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "org/tiny-llama"
    )
    weights = {}
    for mode in ("mask", "complement"):
        result = recover(
            pruned, tmp_path / "small", tmp_path / mode, mode=mode, original=original, dtype="float32"
        )
        assert result.merged and len(result.grown) == 14  # the pruned layers' linears, masked
        weights[mode] = load_model(tmp_path / mode).state_dict()
    from loram_core.prune.masks import load_masks

    keep = load_masks(pruned / "masks" / "masks.safetensors").keep_masks()
    w0 = load_model(original).state_dict()
    name = "model.layers.1.mlp.up_proj.weight"
    delta = _delta(small, "1.mlp.up_proj", 2.0)
    torch.testing.assert_close(weights["mask"][name], w0[name] + delta * keep[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        weights["complement"][name], w0[name] + delta * ~keep[name], rtol=1e-6, atol=1e-6
    )
    name0 = "model.layers.0.mlp.up_proj.weight"  # a dense layer's linear gets the plain delta
    assert name0 not in keep
    for mode in ("mask", "complement"):
        torch.testing.assert_close(weights[mode][name0], w0[name0] + _delta(small, "0.mlp.up_proj", 2.0))


def test_merge_into_an_nf4_original_adds_the_delta_to_the_dequantized_weights(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from loram_core.config import QuantizeConfig
    from loram_core.quantize import quantize_checkpoint

    original, pruned = _pruned_base(tmp_path)
    _adapter(original, tmp_path / "full")
    quantize_checkpoint(original, tmp_path / "nf4", QuantizeConfig())
    nf4 = load_model(tmp_path / "nf4", dtype=torch.bfloat16)
    q = nf4.model.layers[1].self_attn.q_proj.weight
    expected = bnbf.dequantize_4bit(q.data, q.quant_state).float()
    merge(tmp_path / "nf4", tmp_path / "full", tmp_path / "merged")
    merged = load_model(tmp_path / "merged", dtype=torch.bfloat16)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    delta = _delta(load_file(tmp_path / "full" / "adapter_model.safetensors"), "1.self_attn.q_proj", 2.0)
    w = merged.model.layers[1].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w.float(), (expected + delta).bfloat16().float(), rtol=0, atol=0)


def test_a_published_version_by_uri_or_directory_reads_only_config_masks_and_manifest(tmp_path) -> None:
    from loram_core.bucket import publish_version
    from tests.conftest import bare_manifest

    original, pruned = _pruned_base(tmp_path)
    _adapter(pruned, tmp_path / "small")
    staging = tmp_path / "staging"
    (staging / "model").mkdir(parents=True)
    shutil.copy(pruned / "config.json", staging / "model" / "config.json")
    shutil.copytree(pruned / "masks", staging / "masks")
    manifest = bare_manifest(staging)
    manifest.base = {"source": "org/tiny-llama"}
    publish_version(staging, manifest, f"file://{tmp_path}/bucket")
    uri = recover(f"file://{tmp_path}/bucket/m", tmp_path / "small", tmp_path / "uri")
    assert uri.base_model == "org/tiny-llama"  # named by the manifest when --original is not given
    local = recover(tmp_path / "bucket" / "m" / "v1", tmp_path / "small", tmp_path / "version")
    assert local.base_model == "org/tiny-llama"
    recover(pruned, tmp_path / "small", tmp_path / "dir", original=original)
    a, b, c = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("uri", "version", "dir"))
    assert all(torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]) for k in a)


def test_peft_key_names_with_and_without_the_adapter_name_infix() -> None:
    from loram_core.recover.adapter import LoraKey, param_name, parse_key

    q = "model.layers.3.self_attn.q_proj"
    assert parse_key(f"base_model.model.{q}.lora_A.weight") == LoraKey(q, "A", "weight", False)
    assert parse_key(f"base_model.model.{q}.lora_B.default.bias") == LoraKey(q, "B", "bias", False)
    emb = parse_key("base_model.model.model.embed_tokens.lora_embedding_B")
    assert emb == LoraKey("model.embed_tokens", "B", "weight", True)
    assert parse_key("base_model.model.lm_head.base_layer.weight") is None
    assert param_name("base_model.model.lm_head.base_layer.weight") == "lm_head.weight"
    assert param_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"


def _rewrite(adapter: Path, edit) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_bad_inputs_are_refused_naming_the_file_the_key_and_the_fix(tmp_path) -> None:
    original, pruned = _pruned_base(tmp_path)
    _adapter(pruned, tmp_path / "small")

    def refused(match: str, adapter: Path = tmp_path / "small", base: Path = pruned, **kw) -> str:
        with pytest.raises(LoramError, match=match) as err:
            recover(base, adapter, tmp_path / "out", original=original, **kw)
        return str(err.value)

    # An adapter trained on the original (unpruned) model: its shapes are not the pruned base's.
    _adapter(original, tmp_path / "full")
    msg = refused(
        r"layers\.1\.mlp\.down_proj\.lora_A\.weight.*shape \[4, 128\].*pruned base.*\[4, 64\]",
        tmp_path / "full",
    )
    assert "adapter_model.safetensors" in msg and "Train the adapter on the base" in msg
    # An adapter for another model (different hidden size).
    tiny_model(
        num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1
    ).save_pretrained(tmp_path / "other")
    refused(
        r"lora_B\.weight' has shape \[32, 4\].*needs \[64, 4\]",
        _adapter(tmp_path / "other", tmp_path / "other-lora"),
    )
    # Wrong rank: the config says 8, the tensors are rank 4.
    shutil.copytree(tmp_path / "small", tmp_path / "rank")
    config = json.loads((tmp_path / "rank" / "adapter_config.json").read_text())
    (tmp_path / "rank" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    refused(r"rank 8 from adapter_config\.json", tmp_path / "rank")
    # A module that does not exist.
    shutil.copytree(tmp_path / "small", tmp_path / "ghost")
    _rewrite(
        tmp_path / "ghost", lambda t: t.update({f"{PREFIX}.1.mlp.fc1.lora_A.weight": torch.zeros(4, 64)})
    )
    refused(r"targets module 'model\.layers\.1\.mlp\.fc1'.*does not have", tmp_path / "ghost")
    # A layer the model does not have.
    shutil.copytree(tmp_path / "small", tmp_path / "deep")
    _rewrite(
        tmp_path / "deep", lambda t: t.update({f"{PREFIX}.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)})
    )
    refused(r"model\.layers\.9\.mlp\.up_proj", tmp_path / "deep")
    # A full weight (modules_to_save) of a pruned module.
    shutil.copytree(tmp_path / "small", tmp_path / "saved")
    _rewrite(tmp_path / "saved", lambda t: t.update({f"{PREFIX}.1.mlp.up_proj.weight": torch.zeros(64, 64)}))
    refused(
        r"'base_model\.model\.model\.layers\.1\.mlp\.up_proj\.weight' is a full weight of a pruned module",
        tmp_path / "saved",
    )
    # Missing masks, missing files, the wrong mode, an original that is not the base's.
    shutil.copytree(pruned, tmp_path / "nomasks", ignore=shutil.ignore_patterns("masks"))
    refused(r"has no masks/masks\.safetensors.*Pass the published version", base=tmp_path / "nomasks")
    (tmp_path / "empty").mkdir()
    refused(r"adapter_config\.json is missing", tmp_path / "empty")
    refused(r"mode 'mask' does not apply.*'random'.*\['zeroA', 'normA'\]", mode="mask")
    with pytest.raises(
        LoramError, match=r"is not the model the base .* was pruned from \(hidden_size: 32 vs 64"
    ):
        recover(pruned, tmp_path / "small", tmp_path / "out", original=tmp_path / "other")
    with pytest.raises(LoramError, match="has no manifest naming its original model.*--original"):
        recover(pruned, tmp_path / "small", tmp_path / "out")
    # Masks from another base: widths disagree with config.json.
    from loram_core.prune.masks import load_masks

    masks = load_masks(pruned / "masks" / "masks.safetensors")
    masks.kept_channels[1] = masks.kept_channels[1][:10]
    shutil.copytree(pruned, tmp_path / "badmasks")
    save_masks(masks, tmp_path / "badmasks" / "masks" / "masks.safetensors")
    refused(r"keep 10 layer 1 MLP channels \(of 128\).*says 64", base=tmp_path / "badmasks")
    assert not (tmp_path / "out").exists()  # nothing written on refusal


def test_merge_refuses_a_pruned_base_and_an_adapter_for_another_model(tmp_path) -> None:
    original, pruned = _pruned_base(tmp_path)
    _adapter(pruned, tmp_path / "small")
    with pytest.raises(LoramError, match="is a pruned LoRAM base.*loram recover"):
        merge(pruned, tmp_path / "small", tmp_path / "m")
    with pytest.raises(
        LoramError, match=r"layers\.1\.mlp\.down_proj\.lora_A\.weight.*\[4, 64\].*needs \[4, 128\]"
    ):
        merge(original, tmp_path / "small", tmp_path / "m")


def test_cli_recover_and_merge(tmp_path) -> None:
    from typer.testing import CliRunner

    from loram_provider.flows.cli import app

    original, pruned = _pruned_base(tmp_path)
    _adapter(pruned, tmp_path / "small")
    runner = CliRunner()
    out = runner.invoke(app, ["recover", "--base", str(pruned), "--adapter", str(tmp_path / "small"),
                              "--out", str(tmp_path / "rec"), "--original", str(original)])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert (tmp_path / "rec" / "adapter_model.safetensors").is_file() and "zeroA" in out.output
    out = runner.invoke(app, ["merge", "--original", str(original), "--adapter", str(tmp_path / "rec"),
                              "--out", str(tmp_path / "merged")])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert (
        load_file(tmp_path / "merged" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"].dtype
        == torch.bfloat16
    )
    out = runner.invoke(app, ["recover", "--base", str(pruned), "--adapter", str(tmp_path / "small"),
                              "--out", str(tmp_path / "x"), "--mode", "dense", "--original", str(original)])  # fmt: skip
    assert out.exit_code == 2 and "does not apply" in out.output


def _version_dir(tmp: Path, pruned: Path, base: dict) -> Path:
    """A published version's layout as `read_base` reads it: model/config.json, masks/, manifest.json."""
    version = tmp / "version"
    (version / "model").mkdir(parents=True)
    shutil.copy(pruned / "config.json", version / "model" / "config.json")
    shutil.copytree(pruned / "masks", version / "masks")
    (version / "manifest.json").write_text(json.dumps({"base": base}))
    return version


def test_the_original_recorded_in_the_manifest_is_found_checked_by_fingerprint_or_refused(tmp_path) -> None:
    from loram_core.steps.inputs import base_fingerprint

    original, pruned = _pruned_base(tmp_path)
    _adapter(pruned, tmp_path / "small")
    fp = base_fingerprint(str(original))
    version = _version_dir(tmp_path, pruned, {"source": str(original), "fingerprint": fp,
                                              "original": {"kind": "path", "path": str(original)}})  # fmt: skip
    found = recover(version, tmp_path / "small", tmp_path / "rec")
    assert found.base_model == str(original) and f"fingerprint {fp} matches" in found.original
    config = json.loads((tmp_path / "rec" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(original)
    # Another checkpoint where the record points: refused, naming --original (nothing written).
    (version / "manifest.json").write_text(json.dumps({"base": {"source": str(original), "fingerprint": "0" * 16,
                                                                "original": {"kind": "path", "path": str(original)}}}))  # fmt: skip
    with pytest.raises(LoramError, match=r"holds another checkpoint.*fingerprint is .*Pass --original"):
        recover(version, tmp_path / "small", tmp_path / "other")
    # Not on this machine: refused, naming --original.
    gone = {
        "source": "/elsewhere/llama",
        "fingerprint": fp,
        "original": {"kind": "path", "path": "/elsewhere/llama"},
    }
    (version / "manifest.json").write_text(json.dumps({"base": gone}))
    with pytest.raises(
        LoramError,
        match=r"'/elsewhere/llama' \(a checkpoint on the publisher's machine\), is not here\. Pass --original",
    ):
        recover(version, tmp_path / "small", tmp_path / "other")
    # The demo base, not built here: the command that rebuilds it.
    demo = {
        "kind": "demo",
        "path": str(tmp_path / "cache" / "demo-base-0123"),
        "cache_dir": str(tmp_path / "cache"),
    }
    (version / "manifest.json").write_text(
        json.dumps({"base": {"source": "demo", "fingerprint": fp, "original": demo}})
    )
    with pytest.raises(
        LoramError,
        match=r"demo base this version was pruned from is not on this machine.*`loram original --build .*--original",
    ):
        recover(version, tmp_path / "small", tmp_path / "other")
    shutil.copytree(original, tmp_path / "cache" / "demo-base-0123")  # there now: found by itself
    assert recover(version, tmp_path / "small", tmp_path / "demo").base_model == str(
        tmp_path / "cache" / "demo-base-0123"
    )
    # An older manifest that said only "demo": refused (the adapter would have named "demo").
    (version / "manifest.json").write_text(json.dumps({"base": {"source": "demo", "fingerprint": fp}}))
    with pytest.raises(LoramError, match="predates the record.*Pass --original"):
        recover(version, tmp_path / "small", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_an_existing_out_is_refused_unless_forced_and_replaced_only_when_complete(tmp_path) -> None:
    original, pruned = _pruned_base(tmp_path)
    _adapter(pruned, tmp_path / "small")
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "keep.txt").write_text("mine")
    with pytest.raises(
        LoramError, match=r"--out .*rec' exists \(a folder with files\); nothing was written\. Pass --force"
    ):
        recover(pruned, tmp_path / "small", tmp_path / "rec", original=original)
    assert (tmp_path / "rec" / "keep.txt").read_text() == "mine"
    with pytest.raises(LoramError, match="is a pruned LoRAM base"):  # a failure with --force keeps it too
        recover(pruned, tmp_path / "small", tmp_path / "rec", original=pruned, force=True)
    assert (tmp_path / "rec" / "keep.txt").read_text() == "mine"
    recover(pruned, tmp_path / "small", tmp_path / "rec", original=original, force=True)
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "x").write_text("x")
    with pytest.raises(LoramError, match="--out .*merged' exists"):
        merge(original, tmp_path / "rec", tmp_path / "merged")
    merge(None, tmp_path / "rec", tmp_path / "merged", force=True)  # the original the adapter names
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / "x").exists()
    assert not [p for p in tmp_path.iterdir() if ".loram-" in p.name]  # no temporary folder left


def test_merge_names_its_own_flag_when_the_original_is_missing(tmp_path) -> None:
    original, pruned = _pruned_base(tmp_path)
    _adapter(original, tmp_path / "full")
    with pytest.raises(LoramError, match=r"--original '/nope' is not a checkpoint directory here") as err:
        merge("/nope", tmp_path / "full", tmp_path / "merged")
    assert "base.source" not in str(err.value) and not (tmp_path / "merged").exists()
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    (tmp_path / "full" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": None})
    )
    with pytest.raises(LoramError, match=r"names no base model \(base_model_name_or_path\); pass --original"):
        merge(None, tmp_path / "full", tmp_path / "merged")


def test_an_adapter_trained_with_remote_code_recovers_to_the_stock_class_and_autopeft_loads_it(
    tmp_path,
) -> None:
    """Trained on a published base loaded with trust_remote_code, peft's `auto_mapping` names
    LoramLlamaForCausalLM in transformers_modules (which AutoPeftModel refuses to import); the
    recovered adapter names the original's stock class, so AutoPeftModelForCausalLM loads it."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from loram_core.stock import ship_modeling_code

    original, pruned = _pruned_base(tmp_path)
    assert ship_modeling_code(pruned)  # layers of several widths: the published form ships its code
    small = AutoModelForCausalLM.from_pretrained(pruned, trust_remote_code=True)
    assert type(small).__name__ == "LoramLlamaForCausalLM"
    torch.manual_seed(0)
    get_peft_model(small, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
                   ).save_pretrained(tmp_path / "small")  # fmt: skip
    trained = json.loads((tmp_path / "small" / "adapter_config.json").read_text())["auto_mapping"]
    assert trained["parent_library"].startswith("transformers_modules")
    with pytest.raises(ValueError, match="not in the import allowlist"):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "small"))
    recover(pruned, tmp_path / "small", tmp_path / "rec", original=original)
    config = json.loads((tmp_path / "rec" / "adapter_config.json").read_text())
    assert config["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                      "parent_library": "transformers.models.llama.modeling_llama"}  # fmt: skip
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "rec"))
    assert type(loaded.base_model.model).__name__ == "LlamaForCausalLM"
    reference = PeftModel.from_pretrained(load_model(original), tmp_path / "rec")
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_cli_recover_with_a_pruned_original_refuses_in_one_paragraph_without_a_prompt(tmp_path) -> None:
    import subprocess
    import sys

    from loram_core.stock import ship_modeling_code

    original, pruned = _pruned_base(tmp_path)
    _adapter(pruned, tmp_path / "small")
    ship_modeling_code(pruned)  # a published base: its config asks for remote code
    result = subprocess.run(
        [sys.executable, "-m", "loram_provider.flows.cli", "recover", "--base", str(pruned), "--adapter",
         str(tmp_path / "small"), "--out", str(tmp_path / "rec"), "--original", str(pruned)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,  # a prompt would read EOF, not hang
    )  # fmt: skip
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert (
        "is a pruned LoRAM base" in message and "Pass --original the checkpoint it was pruned from" in message
    )
    assert "[y/N]" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 6 and not (tmp_path / "rec").exists()
