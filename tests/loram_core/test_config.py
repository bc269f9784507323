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
