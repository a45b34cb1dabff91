"""Aggregation strategies: how the server configures a round and combines its results.

A strategy follows Flower's split: :meth:`Strategy.configure_fit` decides what every sampled
client receives (the state and a config dict), :meth:`Strategy.aggregate_fit` turns the
clients' updates into the next global state. Server-side state, such as a server optimizer's
moments, lives in the strategy and is checkpointed through :meth:`Strategy.state_dict`.
Choose one with ``trainer.aggregation.class_path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedpeft_pl.component import Component

from fedpeft_pl.errors import ConfigError

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What one client sends back after local training."""

    client: int
    num_samples: int
    state: State


class Strategy(Component):
    """Base class. Subclasses implement :meth:`aggregate_fit`.

    Args:
        min_clients: rounds in which fewer updates arrive are skipped and the global state stays.
    """

    def __init__(self, min_clients: int = 1) -> None:
        if min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
        self.min_clients = min_clients

    def setup(self, num_clients: int, clients_per_round: int, num_rounds: int, sampling: str, seed: int) -> None:
        """Called once before training with the federation's shape; a strategy may calibrate itself here."""

    def configure_fit(self, server_round: int, global_state: State) -> tuple[State, dict[str, Any]]:
        """The state every sampled client starts from, and the config sent with it."""
        return global_state, {}

    def round_metrics(self) -> dict[str, float]:
        """Extra per-round metrics to log, e.g. the privacy spent so far."""
        return {}

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        raise NotImplementedError


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


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): the sample-weighted mean of the client states."""

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        return weighted_average(updates)


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server, plus ``mu / 2 * ||w - w_global||^2`` in each client's loss.

    The proximal term covers the trainable tensors only; the client receives ``mu`` as
    ``proximal_mu`` in its round config. With ``mu = 0`` this is FedAvg.

    Args:
        mu: weight of the proximal term, >= 0.
    """

    def __init__(self, mu: float = 0.01, min_clients: int = 1) -> None:
        super().__init__(min_clients)
        if mu < 0:
            raise ConfigError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def configure_fit(self, server_round: int, global_state: State) -> tuple[State, dict[str, Any]]:
        return global_state, {"proximal_mu": self.mu}


class FedOpt(FedAvg):
    """Adaptive federated optimization (Reddi et al. 2021, Algorithm 2): a server optimizer on the pseudo-gradient.

    Each round, with ``delta = weighted_mean(client states) - global``::

        m = beta1 * m + (1 - beta1) * delta
        v = <second moment, by subclass>
        global = global + lr * m / (sqrt(v) + tau)

    ``m`` and ``v`` start at zero and, as in the paper, are not bias-corrected (Flower's FedAdam
    is). They live in the strategy, on the server, and are checkpointed.

    Args:
        lr: server learning rate (eta).
        beta1: first-moment decay.
        beta2: second-moment decay (FedAdam, FedYogi).
        tau: adaptivity; keeps the denominator away from zero.
    """

    def __init__(
        self, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, min_clients: int = 1
    ) -> None:
        super().__init__(min_clients)
        if lr <= 0 or tau <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ConfigError(f"{type(self).__name__} needs lr > 0, tau > 0 and betas in [0, 1); got lr={lr}, tau={tau}")
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self._m: State = {}
        self._v: State = {}

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        averaged = weighted_average(updates)
        new_state = {}
        for name, current in global_state.items():
            delta = averaged[name].to(torch.float32) - current.to(torch.float32)
            m = self._m.get(name, torch.zeros_like(delta))
            v = self._v.get(name, torch.zeros_like(delta))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.second_moment(v, delta)
            self._m[name], self._v[name] = m, v
            new_state[name] = (current.to(torch.float32) + self.lr * m / (v.sqrt() + self.tau)).to(current.dtype)
        return new_state

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self._m), "v": dict(self._v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._m, self._v = dict(state["m"]), dict(state["v"])


class FedAdagrad(FedOpt):
    """FedOpt with ``v = v + delta^2``."""

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta**2


class FedAdam(FedOpt):
    """FedOpt with ``v = beta2 * v + (1 - beta2) * delta^2``."""

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta**2


class FedYogi(FedOpt):
    """FedOpt with ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``."""

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        squared = delta**2
        return v - (1 - self.beta2) * squared * torch.sign(v - squared)


def _stacked(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    return torch.stack([u.state[name].to(torch.float32) for u in updates])


class FedMedian(Strategy):
    """Coordinate-wise median of the client states (Yin et al. 2018), unweighted: robust to a few bad clients."""

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        # sort rather than torch.quantile, which refuses tensors of more than 2**24 elements
        count = len(updates)
        result = {}
        for name, reference in updates[0].state.items():
            ordered = _stacked(updates, name).sort(dim=0).values
            middle = ordered[count // 2] if count % 2 else (ordered[count // 2 - 1] + ordered[count // 2]) / 2
            result[name] = middle.to(reference.dtype)
        return result


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the ``beta`` largest and smallest shares, average the rest.

    Args:
        beta: share cut from each end, in [0, 0.5).
    """

    def __init__(self, beta: float = 0.2, min_clients: int = 1) -> None:
        super().__init__(min_clients)
        if not 0 <= beta < 0.5:
            raise ConfigError(f"FedTrimmedAvg beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        cut = int(self.beta * len(updates))
        result = {}
        for name, reference in updates[0].state.items():
            ordered = _stacked(updates, name).sort(dim=0).values
            kept = ordered[cut : len(updates) - cut]
            result[name] = kept.mean(dim=0).to(reference.dtype)
        return result
