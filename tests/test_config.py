"""RecipeConfig: YAML round trip and errors that name the key."""

import pytest

from ar_ray.config import ConfigError, RecipeConfig, cycle_ends, load_config, save_config
from ar_ray.search_space import Domain, SearchSpace, load_search_space, parse_search_space


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


@pytest.mark.parametrize(
    "values, message",
    [
        ([], "s.yaml: expected a mapping of hyperparameters"),
        ({}, "s.yaml: expected a mapping of hyperparameters"),
        (
            {"lr": {"uniform": [0.1, 0.2], "int": [1, 2]}},
            "s.yaml: lr: expected one of {uniform, loguniform, int, choice}, "
            "got {'uniform': [0.1, 0.2], 'int': [1, 2]}",
        ),
        (
            {"lr": {"normal": [0.1]}},
            "s.yaml: lr: expected one of {uniform, loguniform, int, choice}, got {'normal': [0.1]}",
        ),
        ({"lr": {"uniform": []}}, "s.yaml: lr: uniform needs a non-empty list"),
        ({"lr": {"uniform": 0.1}}, "s.yaml: lr: uniform needs a non-empty list"),
        (
            {"epochs": {"uniform": [1, 4]}},
            "s.yaml: epochs: uniform does not fit a int hyperparameter",
        ),
        ({"lr": {"uniform": [0.1, 0.2, 0.3]}}, "s.yaml: lr: uniform needs [lo, hi]"),
        ({"lr": {"uniform": [0.1, 0.1]}}, "s.yaml: lr: lo=0.1 must be < hi=0.1"),
        ({"lr": {"loguniform": [0, 0.1]}}, "s.yaml: lr: loguniform needs lo > 0, got 0.0"),
        ({"lr": {"uniform": ["a", 0.1]}}, "s.yaml: lr='a' must be a float"),
        ({"lr": {"choice": [0.1, "a"]}}, "s.yaml: lr='a' must be a float"),
        ({"lr": "fast"}, "s.yaml: lr='fast' must be a float"),
        ({"lr": {"choice": [0.1, -1.0]}}, "s.yaml: lr: lr=-1.0 must be > 0"),
        ({"lr": {"uniform": [-1.0, 0.1]}}, "s.yaml: lr: lr=-1.0 must be > 0"),
        ({"mt_mix": {"uniform": [0.5, 2.0]}}, "s.yaml: mt_mix: mt_mix=2.0 must be in [0, 1]"),
        ({"lr": 0.1, "epochs": 0}, "s.yaml: epochs=0 must be >= 1"),
        (
            {"image_size": {"choice": [28, 32]}},
            "s.yaml: image_size cannot be searched (images are decoded once)",
        ),
    ],
)
def test_bad_search_space_names_file_and_key(values, message):
    with pytest.raises(ConfigError) as error:
        parse_search_space(values, "s.yaml")
    assert str(error.value) == message


def test_search_space_keeps_fixed_values_and_domains(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "arch: resnet34\nlr: {loguniform: [0.001, 0.1]}\nepochs: {int: [2, 4]}\n"
        "cr_variant: {choice: [ntxent, supcon]}\nmt_mix: {uniform: [0, 1]}\n"
    )
    space = load_search_space(path)
    assert space.source == str(path)
    assert space.base_config() == RecipeConfig(arch="resnet34")
    assert space.searched == {
        "lr": Domain("loguniform", (0.001, 0.1)),
        "epochs": Domain("int", (2, 4)),
        "cr_variant": Domain("choice", ("ntxent", "supcon")),
        "mt_mix": Domain("uniform", (0.0, 1.0)),
    }


def test_a_staged_search_splits_the_searched_keys_and_keeps_the_rest():
    space = parse_search_space(
        {"arch": "resnet34", "lr": {"loguniform": [0.001, 0.1]},
         "mt_weight": {"uniform": [0.5, 2.0]}, "mt_decay": {"uniform": [0.9, 0.99]}},
        "s.yaml",
    )  # fmt: skip
    teacher = space.searching(("mt_weight", "mt_decay"), only=True)
    others = space.searching(("mt_weight", "mt_decay"), only=False)
    assert teacher.searched == {
        "mt_weight": Domain("uniform", (0.5, 2.0)),
        "mt_decay": Domain("uniform", (0.9, 0.99)),
    }
    assert others.searched == {"lr": Domain("loguniform", (0.001, 0.1))}
    for part in (teacher, others):
        assert part.fixed == {"arch": "resnet34"} and part.source == "s.yaml"
    assert space.searched.keys() == {"lr", "mt_weight", "mt_decay"}  # the space is unchanged


def test_a_bad_fixed_value_is_reported_against_the_space_file():
    with pytest.raises(ConfigError) as error:
        SearchSpace("s.yaml", {"epochs": 0}, {}).base_config()
    assert str(error.value) == "s.yaml: epochs=0 must be >= 1"


def test_domains_become_tune_samplers_with_inclusive_int_ranges():
    samplers = {
        kind: Domain(kind, values).to_tune()
        for kind, values in [
            ("uniform", (0.5, 1.5)),
            ("loguniform", (0.01, 1.0)),
            ("int", (2, 4)),
            ("choice", ("ntxent", "supcon")),
        ]
    }
    assert (samplers["uniform"].lower, samplers["uniform"].upper) == (0.5, 1.5)
    assert type(samplers["uniform"].get_sampler()).__name__ == "_Uniform"
    assert (samplers["loguniform"].lower, samplers["loguniform"].upper) == (0.01, 1.0)
    assert type(samplers["loguniform"].get_sampler()).__name__ == "_LogUniform"
    assert (samplers["int"].lower, samplers["int"].upper) == (2, 5)  # Tune's upper is exclusive
    assert samplers["choice"].categories == ["ntxent", "supcon"]


ACCEPTED_EDGES = [
    {"epochs": 1, "batch_size": 2, "image_size": 8, "stem_stride": 1, "lr": 1e-9},
    {"weight_decay": 0.0, "momentum": 0.0, "warmup_epochs": 0.0, "sce_alpha": 0.0},
    {"sce_beta": 0.0, "sce_log_zero": -1e-9, "cr_weight": 0.0, "cr_temperature": 1e-9},
    {"mt_weight": 0.0, "mt_decay": 1e-9, "mt_start_epoch": 0, "mt_rampup_epochs": 0.0},
    {"mt_temperature": 1e-9, "mt_mix": 0.0, "rrc_scale_min": 1.0, "magnitude": 0},
    {"num_ops": 1, "erasing_p": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 0.0},
    {"mt_decay": 1 - 1e-9, "mt_mix": 1.0, "magnitude": 30, "erasing_p": 1.0, "mix_prob": 1.0},
    {"momentum": 1 - 1e-9, "optimizer": "sgd", "tta": "tencrop", "cr_variant": "supcon"},
    {"policy": "autoaugment", "arch": "resnet50"},
    {"epochs": 4, "lr_cycles": 4, "warmup_epochs": 0.9, "swa_epochs": 3},
    {"epochs": 8, "lr_cycles": 2, "warmup_epochs": 3.9, "swa_epochs": 0},
]


@pytest.mark.parametrize("values", ACCEPTED_EDGES)
def test_values_on_the_edge_of_every_range_are_accepted(values):
    config = RecipeConfig.from_dict(values)
    assert all(getattr(config, key) == value for key, value in values.items())


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": 0}, "epochs=0 must be >= 1"),
        ({"batch_size": 1}, "batch_size=1 must be >= 2"),
        ({"image_size": 7}, "image_size=7 must be >= 8"),
        ({"stem_stride": 3}, "stem_stride=3 must be 1 or 2"),
        ({"lr": 0.0}, "lr=0.0 must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 must be >= 0"),
        ({"momentum": 1.0}, "momentum=1.0 must be in [0, 1)"),
        ({"momentum": -0.1}, "momentum=-0.1 must be in [0, 1)"),
        ({"warmup_epochs": -1.0}, "warmup_epochs=-1.0 must be >= 0"),
        ({"sce_alpha": -1.0}, "sce_alpha=-1.0 must be >= 0"),
        ({"sce_beta": -1.0}, "sce_beta=-1.0 must be >= 0"),
        ({"sce_alpha": 0.0, "sce_beta": 0.0}, "sce_alpha=0.0 sce_alpha + sce_beta must be > 0"),
        ({"sce_log_zero": 0.0}, "sce_log_zero=0.0 must be < 0"),
        ({"cr_weight": -1.0}, "cr_weight=-1.0 must be >= 0"),
        ({"cr_temperature": 0.0}, "cr_temperature=0.0 must be > 0"),
        ({"cr_variant": "x"}, "cr_variant='x' must be one of ('ntxent', 'supcon')"),
        ({"mt_weight": -1.0}, "mt_weight=-1.0 must be >= 0"),
        ({"mt_decay": 0.0}, "mt_decay=0.0 must be in (0, 1)"),
        ({"mt_start_epoch": -1}, "mt_start_epoch=-1 must be >= 0"),
        ({"mt_rampup_epochs": -1.0}, "mt_rampup_epochs=-1.0 must be >= 0"),
        ({"mt_temperature": 0.0}, "mt_temperature=0.0 must be > 0"),
        ({"mt_mix": -0.1}, "mt_mix=-0.1 must be in [0, 1]"),
        ({"mt_mix": 1.1}, "mt_mix=1.1 must be in [0, 1]"),
        ({"rrc_scale_min": 0.0}, "rrc_scale_min=0.0 must be in (0, 1]"),
        ({"rrc_scale_min": 1.1}, "rrc_scale_min=1.1 must be in (0, 1]"),
        (
            {"policy": "x"},
            "policy='x' must be one of ('none', 'randaugment', 'trivialaugment', 'autoaugment')",
        ),
        ({"magnitude": -1}, "magnitude=-1 must be in [0, 30]"),
        ({"magnitude": 31}, "magnitude=31 must be in [0, 30]"),
        ({"num_ops": 0}, "num_ops=0 must be >= 1"),
        ({"erasing_p": -0.1}, "erasing_p=-0.1 must be in [0, 1]"),
        ({"erasing_p": 1.1}, "erasing_p=1.1 must be in [0, 1]"),
        ({"mixup_alpha": -1.0}, "mixup_alpha=-1.0 must be >= 0"),
        ({"cutmix_alpha": -1.0}, "cutmix_alpha=-1.0 must be >= 0"),
        ({"mix_prob": -0.1}, "mix_prob=-0.1 must be in [0, 1]"),
        ({"mix_prob": 1.1}, "mix_prob=1.1 must be in [0, 1]"),
        ({"optimizer": "x"}, "optimizer='x' must be one of ('sgd', 'adamw')"),
        ({"tta": "x"}, "tta='x' must be one of ('none', 'center', 'tencrop')"),
        ({"arch": "x"}, "arch='x' is not a torchvision classifier"),
        ({"epochs": 4, "lr_cycles": 0}, "lr_cycles=0 must be in [1, epochs]"),
        ({"epochs": 4, "lr_cycles": 5}, "lr_cycles=5 must be in [1, epochs]"),
        ({"epochs": 4, "swa_epochs": 4}, "swa_epochs=4 must be in [0, epochs)"),
        ({"epochs": 4, "swa_epochs": -1}, "swa_epochs=-1 must be in [0, epochs)"),
        (
            {"epochs": 8, "lr_cycles": 2, "warmup_epochs": 4.0},
            "warmup_epochs=4.0 must be shorter than the first of lr_cycles=2 cycles (4 epochs)",
        ),
    ],
)
def test_each_range_rejects_the_value_just_outside_it(values, message):
    with pytest.raises(ConfigError) as error:
        RecipeConfig.from_dict(values, source="c.yaml")
    assert str(error.value) == f"c.yaml: {message}"


def test_messages_name_the_default_source_and_keep_a_value_that_looks_like_one():
    with pytest.raises(ConfigError) as error:
        RecipeConfig.from_dict({"epochs": 0})
    assert str(error.value) == "config: epochs=0 must be >= 1"
    with pytest.raises(ConfigError) as error:
        RecipeConfig.from_dict({"tta": "config: x"}, source="s.yaml")
    assert (
        str(error.value) == "s.yaml: tta='config: x' must be one of ('none', 'center', 'tencrop')"
    )


def test_keys_after_a_retired_one_still_count_and_whole_floats_become_ints():
    config = RecipeConfig.from_dict({"loader_workers": 2, "lr": 0.01, "epochs": 3.0})
    assert config.lr == 0.01 and config.epochs == 3 and isinstance(config.epochs, int)


def test_file_errors_name_the_file_line_and_rank(tmp_path):
    missing, bad, ranked = tmp_path / "missing.yaml", tmp_path / "bad.yaml", tmp_path / "r.yaml"
    bad.write_text("lr: 1\nepochs: [1, 2\n")
    control = tmp_path / "control.yaml"
    control.write_text("lr: \x07\n")
    save_config(RecipeConfig(lr=0.1), tmp_path / "one.yaml")
    ranked.write_text("- {lr: 0.1}\n- {lr: 0.2}\n")
    assert load_config(ranked, rank=2).lr == 0.2
    cases = [
        (missing, 1, f"{missing}: cannot read (No such file or directory)"),
        (bad, 1, f"{bad}: line 3 invalid YAML"),
        (ranked, 3, f"{ranked}: --rank 3 is outside 1..2"),
        (control, 1, f"{control}: invalid YAML"),  # a reader error has no line mark
    ]
    for path, rank, message in cases:
        with pytest.raises(ConfigError) as error:
            load_config(path, rank)
        assert str(error.value) == message
    # fields in the dataclass's order, as a reader expects, not alphabetical
    assert (tmp_path / "one.yaml").read_text().startswith("arch: resnet18\nsmall_input: true\n")


def test_replace_changes_only_the_named_keys():
    config = RecipeConfig(seed=7).replace(lr=0.5, policy="autoaugment")
    assert (config.lr, config.policy, config.seed) == (0.5, "autoaugment", 7)
    assert config.epochs == RecipeConfig().epochs


def test_cycles_end_on_whole_epochs_the_last_at_the_final_epoch():
    """floor(k * epochs / cycles), worked out by hand: 10 epochs in 3 cycles end at 3, 6, 10."""
    assert cycle_ends(10, 3) == [3, 6, 10]
    assert cycle_ends(8, 4) == [2, 4, 6, 8]
    assert cycle_ends(5, 1) == [5]
    assert all(type(end) is int for end in cycle_ends(10, 3))
