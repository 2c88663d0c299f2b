"""The one typed config of a training run: every hyperparameter, YAML in and YAML out.

A search space, a leaderboard row, an ensemble member and `ar-ray train --config` all speak
this flat vocabulary, so a key means the same thing everywhere and a typo fails by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ar_ray.errors import UserError
from ar_ray.outputs import atomic_write_text


class ConfigError(UserError):
    """A user-facing config problem; the message is one line naming the file and key."""


POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")
CR_VARIANTS = ("ntxent", "supcon")
OPTIMIZERS = ("sgd", "adamw")
TTA_MODES = ("none", "center", "tencrop")


RETIRED_KEYS = frozenset({"loader_workers"})
"""Keys older records (best_configs.yaml, checkpoints, members' config.yaml, request.yaml)
still carry but that are no longer hyperparameters: `loader_workers` became an execution
setting (`engine.fit(loader_workers=...)`, sized to the CPUs a trial holds). They are
dropped when read, here and nowhere else, so those records still load."""


SCE_LOG_ZERO = math.log(1e-4)
"""SCE's A, the value RCE takes for `log 0`: the authors' released code clamps the label at
1e-4 (ln 1e-4 = -9.21), and their alpha/beta defaults were tuned with it; the paper's text
says A = -4. `bench/sce_noise.py` compares the two (BENCHMARKS.md)."""


@dataclass
class RecipeConfig:
    """Hyperparameters of one Attract-and-Repulse run; defaults fit a few CPU minutes."""

    # model
    arch: str = "resnet18"
    small_input: bool = True  # 3x3 stem without max-pool, for images of 28-64 px
    stem_stride: int = 2
    proj_dim: int = 128
    image_size: int = 28

    # optimisation
    epochs: int = 8
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 0.002
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    lr_cycles: int = 1  # cosine cycles with warm restarts (SGDR); see `cycle_ends`
    swa_epochs: int = 0  # epochs whose ends SWA averages (0: off); see engine.WeightAverage

    # attract: Symmetric Cross Entropy
    sce_alpha: float = 1.0
    sce_beta: float = 0.5
    sce_log_zero: float = SCE_LOG_ZERO  # A, RCE's log 0 (see SCE_LOG_ZERO)

    # repulse: Contrastive Regularization
    cr_weight: float = 0.1
    cr_temperature: float = 0.2
    cr_variant: str = "ntxent"

    # Mean Teacher (mt_weight 0 switches it off); stage two starts at mt_start_epoch
    mt_weight: float = 0.0
    mt_decay: float = 0.99
    mt_start_epoch: int = 4
    mt_rampup_epochs: float = 2.0
    mt_temperature: float = 1.0
    mt_mix: float = 0.5

    # augmentation
    rrc_scale_min: float = 0.6
    hflip: bool = True
    policy: str = "none"
    magnitude: int = 9
    num_ops: int = 2
    erasing_p: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0

    # evaluation and reproducibility
    tta: str = "center"
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "config") -> None:
        """Reject values the recipe would silently misuse (e.g. a teacher that never moves)."""
        checks: list[tuple[str, bool, str]] = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 2, "must be >= 2"),
            ("image_size", self.image_size >= 8, "must be >= 8"),
            ("stem_stride", self.stem_stride in (1, 2), "must be 1 or 2"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0"),
            ("lr_cycles", 1 <= self.lr_cycles <= self.epochs, "must be in [1, epochs]"),
            ("swa_epochs", 0 <= self.swa_epochs < self.epochs, "must be in [0, epochs)"),
            ("sce_alpha", self.sce_alpha >= 0, "must be >= 0"),
            ("sce_beta", self.sce_beta >= 0, "must be >= 0"),
            ("sce_alpha", self.sce_alpha + self.sce_beta > 0, "sce_alpha + sce_beta must be > 0"),
            ("sce_log_zero", self.sce_log_zero < 0, "must be < 0"),
            ("cr_weight", self.cr_weight >= 0, "must be >= 0"),
            ("cr_temperature", self.cr_temperature > 0, "must be > 0"),
            ("cr_variant", self.cr_variant in CR_VARIANTS, f"must be one of {CR_VARIANTS}"),
            ("mt_weight", self.mt_weight >= 0, "must be >= 0"),
            ("mt_decay", 0 < self.mt_decay < 1, "must be in (0, 1)"),
            ("mt_start_epoch", self.mt_start_epoch >= 0, "must be >= 0"),
            ("mt_rampup_epochs", self.mt_rampup_epochs >= 0, "must be >= 0"),
            ("mt_temperature", self.mt_temperature > 0, "must be > 0"),
            ("mt_mix", 0 <= self.mt_mix <= 1, "must be in [0, 1]"),
            ("rrc_scale_min", 0 < self.rrc_scale_min <= 1, "must be in (0, 1]"),
            ("policy", self.policy in POLICIES, f"must be one of {POLICIES}"),
            ("magnitude", 0 <= self.magnitude <= 30, "must be in [0, 30]"),
            ("num_ops", self.num_ops >= 1, "must be >= 1"),
            ("erasing_p", 0 <= self.erasing_p <= 1, "must be in [0, 1]"),
            ("mixup_alpha", self.mixup_alpha >= 0, "must be >= 0"),
            ("cutmix_alpha", self.cutmix_alpha >= 0, "must be >= 0"),
            ("mix_prob", 0 <= self.mix_prob <= 1, "must be in [0, 1]"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
            ("tta", self.tta in TTA_MODES, f"must be one of {TTA_MODES}"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{source}: {key}={getattr(self, key)!r} {why}")
        first_cycle = cycle_ends(self.epochs, self.lr_cycles)[0]
        if self.lr_cycles > 1 and self.warmup_epochs >= first_cycle:  # else a snapshot at peak lr
            raise ConfigError(
                f"{source}: warmup_epochs={self.warmup_epochs!r} must be shorter than the first"
                f" of lr_cycles={self.lr_cycles} cycles ({first_cycle} epochs)"
            )
        if self.arch not in classification_archs():
            raise ConfigError(f"{source}: arch={self.arch!r} is not a torchvision classifier")

    @property
    def mean_teacher(self) -> bool:
        return self.mt_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RecipeConfig:
        """Build from plain data, naming the source and key of anything unknown or mistyped."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of hyperparameters")
        known = hyperparameter_types()
        coerced: dict[str, Any] = {}
        for key, value in values.items():
            if key in RETIRED_KEYS:
                continue
            if key not in known:
                raise ConfigError(f"{source}: unknown hyperparameter {key!r}")
            coerced[key] = coerce_value(key, value, known[key], source)
        try:
            config = cls(**coerced)
        except ConfigError as error:
            raise ConfigError(str(error).replace("config:", f"{source}:", 1)) from None
        return config

    def replace(self, **changes: Any) -> RecipeConfig:
        return RecipeConfig.from_dict({**self.to_dict(), **changes})

    def replace_checked(self, key: str, value: Any, source: str) -> RecipeConfig:
        """Like replace, but an invalid value is reported against `source` and `key`."""
        return RecipeConfig.from_dict({**self.to_dict(), key: value}, source=f"{source}: {key}")


def cycle_ends(epochs: int, cycles: int) -> list[int]:
    """The epoch at which each of `cycles` learning-rate cycles ends: floor(k * epochs /
    cycles) for k = 1..cycles. Integer arithmetic, so no tie rule decides a boundary, every
    cycle is whole epochs (a snapshot is an epoch's end) and lengths differ by one at most;
    with cycles <= epochs each is at least one epoch, and the last ends at `epochs`."""
    return [k * epochs // cycles for k in range(1, cycles + 1)]


@functools.cache
def classification_archs() -> frozenset[str]:
    import torchvision  # deferred: only configs pay for the import, and only once

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def hyperparameter_types() -> dict[str, type]:
    """Map each hyperparameter name to its Python type (bool, int, float or str)."""
    hints = typing.get_type_hints(RecipeConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RecipeConfig)}


def coerce_value(key: str, value: Any, kind: type, source: str) -> Any:
    """Accept YAML's natural spellings (1 for 1.0) but never a string for a number."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{source}: {key}={value!r} must be a {kind.__name__}")


def read_yaml(path: Path) -> Any:
    """safe_load a file, turning syntax errors into one line that names the file."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None


def load_config(path: Path, rank: int = 1) -> RecipeConfig:
    """One config file, or a ranked list of them (a tune run's best_configs.yaml)."""
    values = read_yaml(path)
    if isinstance(values, list):
        if not 1 <= rank <= len(values):
            raise ConfigError(f"{path}: --rank {rank} is outside 1..{len(values)}")
        return RecipeConfig.from_dict(values[rank - 1], source=f"{path}[{rank}]")
    return RecipeConfig.from_dict(values or {}, source=str(path))


def save_config(config: RecipeConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
