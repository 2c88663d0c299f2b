"""ar-ray: the Attract-and-Repulse recipe (VIPriors 2021, 2nd place) tuned and ensembled on Ray.

    import ar_ray

    searched = ar_ray.tune("search_spaces/quick.yaml", trials=6)
    ensembled = ar_ray.ensemble(searched, members=2)
    labelled = ar_ray.predict(ensembled, "photos/")
    searched.leaderboard.head()

Every `ar-ray` command is one of these functions (`ar_ray.api`), with the same options and
defaults. Names load on first use, so `import ar_ray` does not import torch or Ray.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "tune": "ar_ray.api",
    "ensemble": "ar_ray.api",
    "predict": "ar_ray.api",
    "distill": "ar_ray.api",
    "train": "ar_ray.api",
    "export": "ar_ray.api",
    "serve": "ar_ray.api",
    "stop_serving": "ar_ray.api",
    "TuneResult": "ar_ray.api",
    "EnsembleResult": "ar_ray.ensembling",
    "DistillResult": "ar_ray.distilling",
    "PredictResult": "ar_ray.labelling",
    "TrainResult": "ar_ray.training",
    "ExportResult": "ar_ray.exporting",
    "SavedEnsemble": "ar_ray.saved_ensemble",
    "RecipeConfig": "ar_ray.config",
    "load_search_space": "ar_ray.search_space",
    "load_dataset": "ar_ray.data",
    "UserError": "ar_ray.errors",
}
__all__ = [
    "DistillResult",
    "EnsembleResult",
    "ExportResult",
    "PredictResult",
    "RecipeConfig",
    "SavedEnsemble",
    "TrainResult",
    "TuneResult",
    "UserError",
    "__version__",
    "distill",
    "ensemble",
    "export",
    "load_dataset",
    "load_search_space",
    "predict",
    "serve",
    "stop_serving",
    "train",
    "tune",
]

if TYPE_CHECKING:
    from ar_ray.api import (
        TuneResult,
        distill,
        ensemble,
        export,
        predict,
        serve,
        stop_serving,
        train,
        tune,
    )
    from ar_ray.config import RecipeConfig
    from ar_ray.data import load_dataset
    from ar_ray.distilling import DistillResult
    from ar_ray.ensembling import EnsembleResult
    from ar_ray.errors import UserError
    from ar_ray.exporting import ExportResult
    from ar_ray.labelling import PredictResult
    from ar_ray.saved_ensemble import SavedEnsemble
    from ar_ray.search_space import load_search_space
    from ar_ray.training import TrainResult


def __getattr__(name: str) -> Any:
    """PEP 562: import the module that holds `name` the first time it is asked for."""
    if name not in _WHERE:
        raise AttributeError(f"module 'ar_ray' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
