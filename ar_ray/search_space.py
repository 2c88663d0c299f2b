"""Search spaces: YAML files whose keys are RecipeConfig hyperparameters, fixed or sampled.

    sce_alpha: {loguniform: [0.05, 5.0]}
    cr_variant: {choice: [ntxent, supcon]}
    arch: resnet18                       # fixed

Every mistake is reported with the file and key, before any Ray work starts.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ar_ray.config import ConfigError, RecipeConfig, coerce_value, hyperparameter_types, read_yaml

DOMAINS = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class Domain:
    kind: str
    values: tuple[Any, ...]  # [lo, hi] for ranges (both inclusive for int), options for choice

    def to_tune(self) -> Any:
        from ray import tune  # here: reading a space (bench/gpu_check.py) must not need Ray

        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "int":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper is exclusive
        return tune.choice(list(self.values))


@dataclass(frozen=True)
class SearchSpace:
    source: str
    fixed: dict[str, Any]
    searched: dict[str, Domain]

    def base_config(self) -> RecipeConfig:
        return RecipeConfig.from_dict(self.fixed, source=self.source)

    def to_tune(self) -> dict[str, Any]:
        return {key: domain.to_tune() for key, domain in self.searched.items()}

    def searching(self, keys: Collection[str], only: bool) -> SearchSpace:
        """The same space searching only `keys` (`only`) or all but them: a staged search's
        phases. The keys left out keep the base config's values."""
        kept = {key: d for key, d in self.searched.items() if (key in keys) == only}
        return SearchSpace(self.source, self.fixed, kept)


def _parse_domain(source: str, key: str, spec: dict[str, Any], kind: type) -> Domain:
    where = f"{source}: {key}"
    if len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(DOMAINS)}}}, got {spec!r}")
    name, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {name} needs a non-empty list")
    if name == "choice":
        return Domain(name, tuple(coerce_value(key, v, kind, source) for v in values))
    numeric = int if name == "int" else float  # a sampled 2.7 epochs would fail mid-run
    if kind is not numeric:
        raise ConfigError(f"{where}: {name} does not fit a {kind.__name__} hyperparameter")
    if len(values) != 2:
        raise ConfigError(f"{where}: {name} needs [lo, hi]")
    lo, hi = (coerce_value(key, v, numeric, source) for v in values)
    if lo >= hi:
        raise ConfigError(f"{where}: lo={lo} must be < hi={hi}")
    if name == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs lo > 0, got {lo}")
    return Domain(name, (lo, hi))


def parse_search_space(values: Any, source: str) -> SearchSpace:
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{source}: expected a mapping of hyperparameters")
    known = hyperparameter_types()
    fixed: dict[str, Any] = {}
    searched: dict[str, Domain] = {}
    for key, spec in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown hyperparameter {key!r}")
        if isinstance(spec, dict):
            searched[key] = _parse_domain(source, key, spec, known[key])
        else:
            fixed[key] = coerce_value(key, spec, known[key], source)
    if "image_size" in searched:
        raise ConfigError(f"{source}: image_size cannot be searched (images are decoded once)")
    space = SearchSpace(source, fixed, searched)
    base = space.base_config()
    for key, domain in searched.items():  # every end of every range must be a valid run
        ends = domain.values if domain.kind == "choice" else domain.values[:2]
        for value in ends:
            base.replace_checked(key, value, source)
    return space


def load_search_space(path: Path) -> SearchSpace:
    return parse_search_space(read_yaml(path), str(path))
