"""jungletrap: distributed camera-trap video classification (Dask + torch + XGBoost).

Stages: catalog → embed → features → train (xgboost.dask + neural head) → ensemble; ``predict`` scores new
videos with a finished run. Every stage function takes a ``distributed.Client``; jobs and the CLI own clusters.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "predict"]


def predict(*args: Any, **kwargs: Any) -> Any:
    """Score new videos with a finished run; see :func:`jungletrap.predict.predict_videos`."""
    from jungletrap.predict import predict_videos

    return predict_videos(*args, **kwargs)
