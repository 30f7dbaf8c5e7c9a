from pathlib import Path

import pytest
from pydantic import ValidationError

from lensmill.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_embedded_defaults_load_and_are_frozen():
    cfg = load_config()
    assert cfg == Config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_overrides_parse_numbers_lists_and_nested_keys():
    cfg = load_config(
        None, ["train.lr=3e-4", "tune.models=[tiny, resnet18]", "sim.n_train=10", "ray.address=null"]
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.tune.models == ("tiny", "resnet18")
    assert cfg.sim.n_train == 10
    assert cfg.ray.address is None


def test_overrides_apply_on_top_of_a_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain:\n  epochs: 7\n  lr: 0.1\n")
    cfg = load_config(p, ["train.lr=0.2"])
    assert (cfg.name, cfg.train.epochs, cfg.train.lr) == ("x", 7, 0.2)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.lrr=0.1", ["train.lrr", "unknown key"]),
        ("train.epochs=many", ["train.epochs", "many"]),
        ("sim.theta_e_arcsec={min: 3, max: 1}", ["sim.theta_e_arcsec", "must not exceed"]),
        ("train.batch_size=0", ["train.batch_size"]),
        ("bogus=1", ["bogus", "unknown key"]),
        # A cross-field range check of the sim section still names the field, without echoing the section.
        ("sim.lens_n_sersic={min: 0.1, max: 4.0}", ["sim.lens_n_sersic: values must lie in [0.2, 8.0]"]),
    ],
)
def test_bad_values_name_the_field(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for n in names:
        assert n in str(err.value)
    assert "Value error" not in str(err.value) and "source_mag" not in str(err.value)


def test_malformed_override_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_hash_changes_with_content():
    assert load_config().hash() == load_config().hash()
    assert load_config().hash() != load_config(None, ["train.lr=0.5"]).hash()


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_config(path)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ("[my-run]", r"ensemble.members: entry 0: 'my-run' is not a member source"),
        ("['run:']", r"entry 0: 'run:' is not a member source"),
        ("['models:/']", r"entry 0: 'models:/' is not a member source"),
        ("[run:a, run:a]", r"a source is listed twice"),
    ],
)
def test_ensemble_members_name_the_bad_source(members: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"ensemble.members={members}"])


def test_ensemble_members_and_input_size_parse() -> None:
    cfg = load_config(
        None, ["ensemble.members=[run:a, 'models:/lens-ensemble@champion']", "train.input_size_px=96"]
    )
    assert (
        cfg.ensemble.members == ("run:a", "models:/lens-ensemble@champion") and cfg.train.input_size_px == 96
    )
    with pytest.raises(ConfigError, match="train.input_size_px"):
        load_config(None, ["train.input_size_px=4"])
