"""RecipeConfig: YAML round trip and errors that name the key."""

import pytest

from ar_ray.config import ConfigError, RecipeConfig, load_config, save_config
from ar_ray.search_space import parse_search_space


def test_yaml_round_trip(tmp_path):
    config = RecipeConfig(arch="resnet34", sce_alpha=0.1, cr_variant="supcon", seed=7)
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("sce_alpah: 1.0\n", "unknown hyperparameter 'sce_alpah'"),
        ("lr: fast\n", "lr='fast' must be a float"),
        ("epochs: 2.5\n", "epochs=2.5 must be a int"),
        ("cr_temperature: -0.1\n", "cr_temperature=-0.1 must be > 0"),
        ("mt_decay: 1.0\n", "mt_decay=1.0 must be in (0, 1)"),
        ("policy: heavy\n", "policy='heavy' must be one of"),
        ("lr: [1, 2\n", "invalid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("3\n", "expected a mapping"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value) and fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_yaml_integers_are_accepted_for_floats():
    assert RecipeConfig.from_dict({"lr": 1}).lr == 1.0


def test_loader_workers_is_no_hyperparameter_but_old_records_still_load(tmp_path):
    old = tmp_path / "best_configs.yaml"
    old.write_text("- lr: 0.01\n  loader_workers: 0\n")  # as tune runs recorded it
    config = load_config(old)
    assert config.lr == 0.01 and "loader_workers" not in config.to_dict()
    with pytest.raises(ConfigError, match="unknown hyperparameter 'loader_workers'"):
        parse_search_space({"loader_workers": {"int": [0, 4]}}, "space.yaml")
