"""Server optimizers: the step from the global state towards the aggregate of the client states.

With ``delta = aggregate - global`` (the pseudo-gradient of Reddi et al. 2021) a server optimizer
returns the next global state. :class:`ServerSGD` with ``lr = 1`` takes the aggregate itself
(plain FedAvg); :class:`Adam`, :class:`Yogi` and :class:`Adagrad` are the adaptive server
optimizers of FedOpt. A server optimizer's moments are server state: checkpointed with the
strategy through :meth:`~fedpeft_pl.component.Component.state_dict`.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft_pl.component import Component
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import State

__all__ = ["Adagrad", "Adam", "AdaptiveServerOptimizer", "ServerOptimizer", "ServerSGD", "Yogi"]


class ServerOptimizer(Component):
    """Base class: the next global state from the current one and the aggregate. Subclasses implement :meth:`step`."""

    def step(self, global_state: State, aggregate: State) -> State:
        """The next global state from ``global_state`` and the aggregator's ``aggregate``."""
        raise NotImplementedError


class ServerSGD(ServerOptimizer):
    """``global + lr * (aggregate - global)``; with ``lr = 1`` (the default) the aggregate itself, to the bit.

    Args:
        lr: the server learning rate (eta_g), > 0.
    """

    def __init__(self, lr: float = 1.0) -> None:
        if lr <= 0:
            raise ConfigError(f"ServerSGD lr must be > 0, got {lr}")
        self.lr = lr

    def step(self, global_state: State, aggregate: State) -> State:
        if self.lr == 1.0:
            return aggregate
        result = {}
        for name, current in global_state.items():
            x = current.to(torch.float64)
            result[name] = (x + self.lr * (aggregate[name].to(torch.float64) - x)).to(current.dtype)
        return result


class AdaptiveServerOptimizer(ServerOptimizer):
    """Adaptive federated optimization (Reddi et al. 2021, Algorithm 2), with ``delta = aggregate - global``::

        m = beta1 * m + (1 - beta1) * delta
        v = <second moment, by subclass>
        global = global + lr * m / (sqrt(v) + tau)

    ``m`` and ``v`` start at zero and, as in the paper, are not bias-corrected (Flower's FedAdam
    is). They are computed in float32 and checkpointed.

    Args:
        lr: server learning rate (eta).
        beta1: first-moment decay.
        beta2: second-moment decay (Adam, Yogi).
        tau: adaptivity; keeps the denominator away from zero.
    """

    def __init__(self, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if lr <= 0 or tau <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ConfigError(
                f"{type(self).__name__} needs lr > 0, tau > 0 and betas in [0, 1); got lr={lr}, tau={tau}"
            )
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self._m: State = {}
        self._v: State = {}

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The second-moment update of this optimizer (Adagrad's, Adam's or Yogi's rule)."""
        raise NotImplementedError

    def step(self, global_state: State, aggregate: State) -> State:
        """One server step from ``global_state`` along the pseudo-gradient towards ``aggregate``."""
        new_state = {}
        for name, current in global_state.items():
            delta = aggregate[name].to(torch.float32) - current.to(torch.float32)
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


class Adagrad(AdaptiveServerOptimizer):
    """``v = v + delta^2`` (FedAdagrad's server step)."""

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta**2


class Adam(AdaptiveServerOptimizer):
    """``v = beta2 * v + (1 - beta2) * delta^2`` (FedAdam's server step)."""

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta**2


class Yogi(AdaptiveServerOptimizer):
    """``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)`` (FedYogi's server step)."""

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        squared = delta**2
        return v - (1 - self.beta2) * squared * torch.sign(v - squared)
