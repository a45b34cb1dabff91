"""How a round's clients train: one after another, all at once, and the choice between them.

- :class:`SequentialRunner` (``sequential.py``): Lightning's epoch loop, client by client.
- :class:`VectorizedRunner` (``vectorized.py``): a round's clients at once through the one frozen
  backbone.
- :class:`RunnerChoice` (``choice.py``): which runner trains a run and why, decided once
  (:func:`choose_client_runner`: what ``trainer.client_runner`` means on this hardware).
- :class:`FeatureCache` (``feature_cache.py``): linear probing on features computed once per run.
- :class:`~fedpeft_pl.runners.device_data.DeviceData` (``device_data.py``): the vectorised engine's training
  samples, transformed once per run and kept on the device within a bound.

A runner sees the loop only through :class:`RunnerHost` (``base.py``) and the run through its
:class:`RunnerContext`, never the trainer; the Flower runner lives with the deployment in
:mod:`fedpeft_pl.deploy`.

The names below are imported on first use: the runner choice (``fedpeft comm`` describes it) needs no Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedpeft_pl.runners.base import ClientExecutor, RunnerContext, RunnerHost, client_metrics
    from fedpeft_pl.runners.choice import RunnerChoice, choose_client_runner
    from fedpeft_pl.runners.feature_cache import FeatureCache
    from fedpeft_pl.runners.sequential import SequentialRunner
    from fedpeft_pl.runners.vectorized import VectorizedRunner

__all__ = [
    "ClientExecutor",
    "FeatureCache",
    "RunnerChoice",
    "RunnerContext",
    "RunnerHost",
    "SequentialRunner",
    "VectorizedRunner",
    "choose_client_runner",
    "client_metrics",
]

# the module of each public name, imported when the name is first read
_WHERE = {
    "ClientExecutor": "base",
    "RunnerContext": "base",
    "RunnerHost": "base",
    "client_metrics": "base",
    "RunnerChoice": "choice",
    "choose_client_runner": "choice",
    "FeatureCache": "feature_cache",
    "SequentialRunner": "sequential",
    "VectorizedRunner": "vectorized",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedpeft_pl.runners.{module}"), name)
    globals()[name] = value
    return value
