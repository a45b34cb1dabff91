"""FedAvg and the strategies that differ from it only in their aggregator or server optimizer.

Each is a named preset of :class:`~fedpeft_pl.strategies.Strategy`'s two parts, kept so that a
config names the algorithm of its paper: FedAvg (weighted mean, aggregate taken as it is),
FedProx (FedAvg plus a proximal term on the client), FedAdagrad, FedAdam and FedYogi (weighted
mean, adaptive server step), FedMedian and FedTrimmedAvg (robust rules).
"""

from __future__ import annotations

from typing import Optional

import torch

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientContext, State
from fedpeft_pl.strategies.aggregators import Aggregator, Median, TrimmedMean
from fedpeft_pl.strategies.base import Strategy
from fedpeft_pl.strategies.optimizers import Adagrad, Adam, AdaptiveServerOptimizer, ServerOptimizer, Yogi

__all__ = ["FedAdagrad", "FedAdam", "FedAvg", "FedMedian", "FedOpt", "FedProx", "FedTrimmedAvg", "FedYogi"]


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): the sample-weighted mean of the client states.

    Args:
        min_clients: rounds in which fewer updates arrive are skipped and the global state stays.
        aggregator: another rule in place of the weighted mean (a robust one, say).
        server_optimizer: a server step in place of taking the aggregate as it is.
    """


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server, plus ``mu / 2 * ||w - w_global||^2`` in each client's loss.

    The proximal term covers the trainable tensors only; ``w_global`` is the state the client
    received. With ``mu = 0`` this is FedAvg.

    Args:
        mu: weight of the proximal term, >= 0.
        min_clients: rounds in which fewer updates arrive are skipped and the global state stays.
        aggregator: another rule in place of the weighted mean.
        server_optimizer: a server step in place of taking the aggregate as it is.
    """

    def __init__(
        self,
        mu: float = 0.01,
        min_clients: int = 1,
        aggregator: Optional[Aggregator] = None,
        server_optimizer: Optional[ServerOptimizer] = None,
    ) -> None:
        super().__init__(min_clients, aggregator, server_optimizer)
        if mu < 0:
            raise ConfigError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def client_loss(self, params: State, context: ClientContext) -> Optional[torch.Tensor]:
        if self.mu == 0:
            return None
        distance = sum(
            (p - context.received[name]).pow(2).sum() for name, p in params.items() if name in context.received
        )
        if not isinstance(distance, torch.Tensor):  # nothing of the module travels
            return None
        return self.mu / 2 * distance


class FedOpt(FedAvg):
    """Adaptive federated optimization (Reddi et al. 2021, Algorithm 2): a server optimizer on the pseudo-gradient.

    The weighted mean of the client states (or ``aggregator``'s aggregate), then the server step of
    :class:`~fedpeft_pl.strategies.optimizers.AdaptiveServerOptimizer`; a subclass names which.

    Args:
        lr: server learning rate (eta).
        beta1: first-moment decay.
        beta2: second-moment decay (FedAdam, FedYogi).
        tau: adaptivity; keeps the denominator away from zero.
        min_clients: rounds in which fewer updates arrive are skipped and the global state stays.
        aggregator: another rule in place of the weighted mean.
    """

    optimizer: type[AdaptiveServerOptimizer] = AdaptiveServerOptimizer
    fixed_parts = ("server_optimizer",)

    def __init__(
        self,
        lr: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        min_clients: int = 1,
        aggregator: Optional[Aggregator] = None,
    ) -> None:
        step = self.optimizer(lr, beta1, beta2, tau)
        super().__init__(min_clients, aggregator, step)
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    @property
    def _step(self) -> AdaptiveServerOptimizer:
        step = self.server_optimizer
        assert isinstance(step, AdaptiveServerOptimizer)
        return step

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The server optimizer's second-moment update."""
        return self._step.second_moment(v, delta)


class FedAdagrad(FedOpt):
    """FedOpt with ``v = v + delta^2``."""

    optimizer = Adagrad


class FedAdam(FedOpt):
    """FedOpt with ``v = beta2 * v + (1 - beta2) * delta^2``."""

    optimizer = Adam


class FedYogi(FedOpt):
    """FedOpt with ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``."""

    optimizer = Yogi


class FedMedian(Strategy):
    """Coordinate-wise median of the client states (Yin et al. 2018), unweighted: robust to a few bad clients.

    Args:
        min_clients: rounds in which fewer updates arrive are skipped and the global state stays.
        server_optimizer: a server step on the median in place of taking it as it is.
    """

    fixed_parts = ("aggregator",)

    def __init__(self, min_clients: int = 1, server_optimizer: Optional[ServerOptimizer] = None) -> None:
        super().__init__(min_clients, Median(), server_optimizer)


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the ``beta`` largest and smallest shares, average the rest.

    Args:
        beta: share cut from each end, in [0, 0.5).
        min_clients: rounds in which fewer updates arrive are skipped and the global state stays.
        server_optimizer: a server step on the trimmed mean in place of taking it as it is.
    """

    fixed_parts = ("aggregator",)

    def __init__(
        self, beta: float = 0.2, min_clients: int = 1, server_optimizer: Optional[ServerOptimizer] = None
    ) -> None:
        if not 0 <= beta < 0.5:
            raise ConfigError(f"FedTrimmedAvg beta must be in [0, 0.5), got {beta}")
        super().__init__(min_clients, TrimmedMean(beta), server_optimizer)
        self.beta = beta
