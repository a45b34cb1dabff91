"""Aggregators: the rule that turns a round's (or a buffer's) client updates into one aggregate state.

An :class:`Aggregator` is the first half of a server update; a
:class:`~fedpeft_pl.strategies.optimizers.ServerOptimizer` takes the step from the global state
towards its aggregate. The two compose freely in a :class:`~fedpeft_pl.strategies.Strategy`
(a median fed to FedAdam)::

    trainer:
      aggregation:
        class_path: fedpeft_pl.strategies.FedAvg
        init_args:
          aggregator: fedpeft_pl.strategies.Median
          server_optimizer: {class_path: fedpeft_pl.strategies.Adam, init_args: {lr: 0.01}}

A rule states what it needs with :attr:`Aggregator.needs_individual_updates`: one that needs every
client's own update (a median, a trimmed mean, any robust rule) cannot run under secure
aggregation, where the server learns only the sum, and the run's validator refuses the pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Optional

import torch

from fedpeft_pl.component import Component
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import Federation, State
from fedpeft_pl.strategies.updates import ClientUpdate

__all__ = ["Aggregator", "Median", "TrimmedMean", "WeightedMean", "weighted_average"]


class Aggregator(Component):
    """Base class: the aggregate of the client states (in the global state's names, shapes and dtypes).

    Subclasses implement :meth:`aggregate`. Per-round figures of what the rule decided (clients
    selected, clipped) go into :meth:`round_metrics`.
    """

    needs_individual_updates: ClassVar[bool] = True
    """Whether the rule needs each client's own update (True), or only their sample-weighted sum."""

    def setup(self, federation: Federation) -> None:
        """Called once before training with the federation's shape (through its strategy's ``setup``)."""

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        """The aggregate client state of ``updates``, which started from ``global_state``."""
        raise NotImplementedError

    def round_metrics(self) -> dict[str, float]:
        """What the rule decided in its last aggregation, logged with the round."""
        return {}

    def client_shares(self) -> Optional[dict[int, float]]:
        """Each client's share of the last aggregate (summing to 1), where the rule weighs whole updates; None where
        it works coordinate by coordinate (a median, a trimmed mean) or has not aggregated yet. The attack harness
        reports the malicious clients' share (``attack/malicious_weight``)."""
        return getattr(self, "_shares", None)

    def rejected_clients(self) -> Optional[set[int]]:
        """The clients a selecting rule (Krum, Bulyan) left out of its last aggregate; None for a rule that selects
        none. The attack harness reports the selection's true and false positive rates from it."""
        return getattr(self, "_rejected", None)

    def _share(self, updates: list[ClientUpdate], weights: Sequence[float]) -> None:
        """Record each client's share of the aggregate from the weights of ``updates`` (normalised here)."""
        total = float(sum(weights))
        shares: dict[int, float] = {}
        for update, weight in zip(updates, weights):
            shares[update.client] = shares.get(update.client, 0.0) + (float(weight) / total if total > 0 else 0.0)
        self._shares = shares


def weighted_average(updates: list[ClientUpdate]) -> State:
    """Average of the client states weighted by their sample counts, accumulated in float64."""
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise ValueError("cannot average updates that trained on no samples")
    averaged = {}
    for name in updates[0].state:
        acc = torch.zeros_like(updates[0].state[name], dtype=torch.float64)
        for update in updates:
            acc.add_(update.state[name].to(torch.float64), alpha=update.num_samples / total)
        averaged[name] = acc.to(updates[0].state[name].dtype)
    return averaged


class WeightedMean(Aggregator):
    """The sample-weighted mean of the client states (FedAvg's rule, McMahan et al. 2017)."""

    needs_individual_updates = False

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        self._share(updates, [u.num_samples for u in updates])
        return weighted_average(updates)


def _stacked(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    return torch.stack([u.state[name].to(torch.float32) for u in updates])


class Median(Aggregator):
    """Coordinate-wise median of the client states (Yin et al. 2018), unweighted: robust to a few bad clients.

    Of an even count, the mean of the middle two.
    """

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        # sort rather than torch.quantile, which refuses tensors of more than 2**24 elements
        count = len(updates)
        result = {}
        for name, reference in updates[0].state.items():
            ordered = _stacked(updates, name).sort(dim=0).values
            middle = ordered[count // 2] if count % 2 else (ordered[count // 2 - 1] + ordered[count // 2]) / 2
            result[name] = middle.to(reference.dtype)
        return result


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the ``beta`` largest and smallest shares, average the rest.

    Args:
        beta: share cut from each end, in [0, 0.5).
    """

    def __init__(self, beta: float = 0.2) -> None:
        if not 0 <= beta < 0.5:
            raise ConfigError(f"trimmed mean beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        cut = int(self.beta * len(updates))
        result = {}
        for name, reference in updates[0].state.items():
            ordered = _stacked(updates, name).sort(dim=0).values
            kept = ordered[cut : len(updates) - cut]
            result[name] = kept.mean(dim=0).to(reference.dtype)
        return result
