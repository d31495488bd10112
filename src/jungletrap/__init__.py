"""jungletrap: distributed camera-trap video classification (Dask + torch + XGBoost).

Stages: catalog → embed → features → train (xgboost.dask + neural head) → ensemble; ``predict_videos`` scores
new videos with a finished run. Every stage function takes a ``distributed.Client``; jobs and the CLI own
clusters.

The API function is not called ``predict``: that is the name of the submodule :mod:`jungletrap.predict`, and
importing a submodule binds its name on the package, which would replace a function of the same name.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "predict_videos"]


def predict_videos(*args: Any, **kwargs: Any) -> Any:
    """Score new videos with a finished run; see :func:`jungletrap.predict.predict_videos`.

    Imported lazily, so ``import jungletrap`` stays light (no torch) for CLIs, workers and notebooks.
    """
    from jungletrap.predict import predict_videos as run

    return run(*args, **kwargs)
