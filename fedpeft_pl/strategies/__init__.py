"""Aggregation strategies: how the server configures a round, what clients do with it, how it is combined.

A strategy (:class:`Strategy`) pairs an :class:`Aggregator` (the rule) with a
:class:`ServerOptimizer` (the step) and may act on the clients through its client hooks. The
package by concern: :mod:`~fedpeft_pl.strategies.base` (the base class),
:mod:`~fedpeft_pl.strategies.aggregators`, :mod:`~fedpeft_pl.strategies.optimizers`,
:mod:`~fedpeft_pl.strategies.fedavg` (FedAvg and its presets),
:mod:`~fedpeft_pl.strategies.corrected` (SCAFFOLD, FedDyn) and
:mod:`~fedpeft_pl.strategies.robust` (defences against clients that lie). Every name is importable from
``fedpeft_pl.strategies``, the path configs use:

    trainer:
      aggregation:
        class_path: fedpeft_pl.strategies.FedAdam
        init_args: {lr: 0.01}
"""

from fedpeft_pl.strategies.aggregators import Aggregator, Median, TrimmedMean, WeightedMean, weighted_average
from fedpeft_pl.strategies.base import Strategy
from fedpeft_pl.strategies.corrected import FedDyn, Scaffold
from fedpeft_pl.strategies.fedavg import FedAdagrad, FedAdam, FedAvg, FedMedian, FedOpt, FedProx, FedTrimmedAvg, FedYogi
from fedpeft_pl.strategies.optimizers import Adagrad, Adam, AdaptiveServerOptimizer, ServerOptimizer, ServerSGD, Yogi
from fedpeft_pl.strategies.robust import (
    Bulyan,
    CenteredClipping,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormBound,
    SampleCounts,
)
from fedpeft_pl.strategies.updates import ClientUpdate

__all__ = [
    "Adagrad",
    "Adam",
    "AdaptiveServerOptimizer",
    "Aggregator",
    "Bulyan",
    "CenteredClipping",
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedDyn",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "GeometricMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "NormBound",
    "SampleCounts",
    "Scaffold",
    "ServerOptimizer",
    "ServerSGD",
    "Strategy",
    "TrimmedMean",
    "WeightedMean",
    "Yogi",
    "weighted_average",
]
