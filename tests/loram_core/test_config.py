from pathlib import Path

import pytest

from loram_core.config import PipelineConfig, PruneConfig, apply_overrides, load_config
from loram_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_its_command(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    first_lines = path.read_text().splitlines()[:4]
    assert all(line.startswith("#") for line in first_lines[:2])
    assert any("loram run" in line or "make" in line for line in first_lines)


def test_shipped_demo_config_mirrors_every_key() -> None:
    # The demo preset lists every key, so it documents the whole schema.
    import yaml

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    defaults = PipelineConfig().model_dump()

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(data) == keys(defaults)


def test_overrides_are_typed() -> None:
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        ["prune.ratio=0.25", "align.steps=7", "quantize.enabled=false", "prune.n_m=[4, 8]"],
    )
    assert cfg.prune.ratio == 0.25 and cfg.align.steps == 7 and cfg.quantize.enabled is False
    assert cfg.prune.n_m == (4, 8)


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key `prune.ration`"):
        load_config(REPO / "configs" / "demo.yaml", ["prune.ration=0.5"])


def test_ratio_out_of_range_names_key_value_and_bound() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "demo.yaml", ["prune.ratio=1.5"])
    assert "prune.ratio" in str(info.value) and "1.5" in str(info.value) and "less than 1" in str(info.value)


def test_bad_strategy_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="random.*structured.*semi.*unstructured"):
        load_config(REPO / "configs" / "demo.yaml", ["prune.strategy=magic"])


def test_missing_file_and_bad_override_form(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["prune.ratio"])


def test_layer_range_defaults_and_empty_range() -> None:
    assert PruneConfig(strategy="structured").layer_range(32) == (4, 30)
    assert PruneConfig(strategy="semi").layer_range(32) == (0, 32)
    with pytest.raises(ConfigError, match="leave no layer to prune"):
        PruneConfig(strategy="random").layer_range(6)


@pytest.mark.parametrize(
    ("override", "expected"),
    [("prune.n_m=2:4", (2, 4)), ("prune.n_m=2,4", (2, 4)), ("prune.n_m=[2, 4]", (2, 4)), ("prune.n_m=4:8", (4, 8)),
     ("prune.n_m= 1 : 4 ", (1, 4)), ("prune.n_m=(2, 4)", (2, 4))],
)  # fmt: skip
def test_n_m_override_forms_mean_the_pair(override: str, expected: tuple[int, int]) -> None:
    # YAML alone reads `2:4` as the base-60 integer 124; an override never means that.
    assert load_config(REPO / "configs" / "demo.yaml", [override]).prune.n_m == expected


@pytest.mark.parametrize("bad", ["prune.n_m=2-4", "prune.n_m=124", "prune.n_m=[2, 4, 8]"])
def test_bad_n_m_names_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "demo.yaml", [bad])
    msg = str(info.value)
    assert "prune.n_m" in msg and "`2:4`, `2,4` or `[2, 4]`" in msg and "valid tuple" not in msg


def test_n_m_in_a_yaml_file_quoted_or_as_a_list(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text('# loram run q.yaml\n#\nprune:\n  n_m: "2:4"\n')
    assert load_config(tmp_path / "q.yaml").prune.n_m == (2, 4)
    (tmp_path / "u.yaml").write_text("# loram run u.yaml\n#\nprune:\n  n_m: 2:4\n")  # YAML 1.1: 124
    with pytest.raises(ConfigError, match=r"`prune.n_m` = 124: .*quote 2:4 in YAML, which reads it as 124"):
        load_config(tmp_path / "u.yaml")


@pytest.mark.parametrize(
    ("override", "section", "expected"),
    [("corpus.paths=/data/one.txt", "corpus.paths", ["/data/one.txt"]),
     ("corpus.paths=[/a.txt, /b.txt]", "corpus.paths", ["/a.txt", "/b.txt"]),
     ("corpus.paths=demo", "corpus.paths", "demo"),
     ("calibration.source=/data/calib.jsonl", "calibration.source", ["/data/calib.jsonl"]),
     ("calibration.source=corpus", "calibration.source", "corpus"),
     ("eval.source=s3://b/eval/*.parquet", "eval.source", ["s3://b/eval/*.parquet"])],
)  # fmt: skip
def test_a_single_path_where_a_list_is_expected_is_a_one_item_list(
    override: str, section: str, expected: object
) -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml", [override])
    first, key = section.split(".")
    assert getattr(getattr(cfg, first), key) == expected


def test_a_path_key_of_the_wrong_type_names_the_accepted_forms() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "demo.yaml", ["corpus.paths=3"])
    assert "corpus.paths=demo, corpus.paths=FILE or corpus.paths=[A, B]" in str(info.value)


def test_calib_samples_is_an_alias_of_calibration_samples() -> None:
    demo = REPO / "configs" / "demo.yaml"
    assert load_config(demo).calibration.samples == 32  # the default, as before the section existed
    old = load_config(demo, ["prune.calib_samples=8"])
    assert old.calibration.samples == 8 and old.prune.calib_samples == 8
    new = load_config(demo, ["calibration.samples=512"])
    assert new.prune.calib_samples == 512  # kept equal: the pruners read either
    from loram_core.config import parse_config

    assert parse_config(old.model_dump(mode="json")).calibration.samples == 8  # a dumped config round-trips
    assert parse_config(new.model_dump(mode="json")).calibration.samples == 512
    # Set, the old key decides (demo.yaml lists calibration.samples: 32; prune.calib_samples=8 still means 8).
    assert load_config(demo, ["prune.calib_samples=8", "calibration.samples=9"]).calibration.samples == 8


def test_until_and_enabled_choose_the_model_steps() -> None:
    demo = REPO / "configs" / "demo.yaml"
    runs = lambda *o: (lambda c: (c.runs("align"), c.runs("quantize")))(load_config(demo, list(o)))  # noqa: E731
    assert runs() == (True, True)
    assert runs("until=prune") == (False, False)
    assert runs("until=align") == (True, False)
    assert runs("align.enabled=false") == (False, True)  # quantize then takes the pruned model
    assert runs("quantize.enabled=false") == (True, False)
    with pytest.raises(ConfigError, match=r"`until` = 'evaluate'.*'prune', 'align' or 'quantize'"):
        load_config(demo, ["until=evaluate"])


def test_sparsegpt_oneshot_preset_is_prune_only_at_llmcompressor_settings() -> None:
    cfg = load_config(REPO / "configs" / "sparsegpt-oneshot.yaml")
    assert cfg.until == "prune" and not cfg.runs("align") and not cfg.runs("quantize")
    assert (cfg.calibration.samples, cfg.calibration.seq_len, cfg.calibration.seed) == (512, 128, 42)
    p = cfg.prune
    assert (p.strategy, p.n_m, p.sparse_method, p.damp, p.blocksize) == (
        "semi",
        (2, 4),
        "sparsegpt",
        0.01,
        128,
    )
    assert p.layer_range(cfg.base.demo.num_hidden_layers) == (0, cfg.base.demo.num_hidden_layers)


@pytest.mark.parametrize("preset", ["gpu-1b.yaml", "llama-3-8b-qloram.yaml"])
def test_presets_for_real_models_calibrate_on_128_x_2048_and_round_widths(preset: str) -> None:
    """SparseGPT, Wanda and OWL calibrate on 128 x 2048 tokens; a real model's Hessians need that many."""
    cfg = load_config(REPO / "configs" / preset)
    assert cfg.calibration.samples == 128 and cfg.calibration.seq_len == 2048
    assert cfg.prune.round_to in (64, 128)
    assert load_config(REPO / "configs" / "demo.yaml").prune.round_to == 1  # the paper's counts
