"""Aggregation strategies: how the server configures a round, what clients do with it, how it is combined.

A strategy follows Flower's split: :meth:`Strategy.configure_fit` decides what every sampled
client receives (the state, a config dict and, through :meth:`Strategy.client_extras`, further
tensors), :meth:`Strategy.aggregate_fit` turns the clients' updates into the next global state.
Server-side state, such as a server optimizer's moments, lives in the strategy and is
checkpointed through :meth:`Strategy.state_dict`.

An algorithm that acts on the client side overrides the client hooks, which run wherever the
client trains (in this process, vectorised, or on a Flower SuperNode) and see only a
:class:`~fedpeft_pl.federation.ClientContext`:

- :meth:`Strategy.client_loss`: a term added to the client's loss, a function of its trainable
  tensors (FedProx's proximal term, FedDyn's linear and quadratic terms);
- :meth:`Strategy.client_gradient`: a correction of the gradient before each optimizer step
  (SCAFFOLD);
- :meth:`Strategy.client_end`: after local training, what the client sends besides its update
  (SCAFFOLD's control-variate change) and its own per-client state for next time
  (``context.state``, kept across rounds, checkpointed, merged under DDP, and kept in the
  SuperNode's context in a deployment).

Choose one with ``trainer.aggregation.class_path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from fedpeft_pl.component import Component
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientContext, Federation, State


@dataclass
class ClientUpdate:
    """What one client sent back after local training, as the server decoded it.

    ``state`` is the client's trained state; ``extras`` the further tensors its strategy sent.
    ``aggregate_of`` is set when the update stands for several clients (secure aggregation):
    ``state`` is then their sample-weighted mean (for DPFedAvg: the global state plus the sum of
    their updates, each clipped by its client).
    """

    client: int
    num_samples: int
    state: State
    extras: State = field(default_factory=dict)
    aggregate_of: tuple[int, ...] = ()


class Strategy(Component):
    """Base class. Subclasses implement :meth:`aggregate_fit`.

    Args:
        min_clients: rounds in which fewer updates arrive are skipped and the global state stays.
    """

    def __init__(self, min_clients: int = 1) -> None:
        if min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
        self.min_clients = min_clients

    def setup(self, federation: Federation) -> None:
        """Called once before training with the federation's shape; a strategy may calibrate itself here."""

    def configure_fit(self, server_round: int, global_state: State) -> tuple[State, dict[str, Any]]:
        """The state every sampled client starts from, and the config sent with it."""
        return global_state, {}

    def client_extras(self, server_round: int, global_state: State) -> State:
        """Tensors every sampled client receives besides the state (counted by the byte counter)."""
        return {}

    # -- the client side: runs where the client trains, with only what it received -------------

    def client_loss(self, params: State, context: ClientContext) -> Optional[torch.Tensor]:
        """A term added to the client's training loss, a differentiable function of ``params``; None for none.

        ``params`` are the client's trainable tensors by name. Must be a pure function of its
        inputs (no in-place state), so that per-sample and vectorised clients can call it.
        """
        return None

    def client_gradient(self, grads: State, params: State, context: ClientContext) -> State:
        """The gradient the client's optimizer applies, from the loss's ``grads``; unchanged by default."""
        return grads

    def client_end(self, trained: State, context: ClientContext) -> State:
        """After local training: update ``context.state`` if needed, return the extra tensors to send."""
        return {}

    @property
    def needs_secret_sampling(self) -> bool:
        """Whether who is sampled must be unpredictable from the config (central DP's accounting)."""
        return False

    @property
    def acts_on_clients(self) -> bool:
        """Whether any client hook is overridden (runners skip the hooks' cost otherwise)."""
        base = Strategy
        return any(
            getattr(type(self), name) is not getattr(base, name)
            for name in ("client_loss", "client_gradient", "client_end")
        )

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

    The proximal term covers the trainable tensors only; ``w_global`` is the state the client
    received. With ``mu = 0`` this is FedAvg.

    Args:
        mu: weight of the proximal term, >= 0.
    """

    def __init__(self, mu: float = 0.01, min_clients: int = 1) -> None:
        super().__init__(min_clients)
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


class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al. 2020) with option II control variates.

    The server keeps a control variate ``c`` and every client its own ``c_i`` (zero at first).
    A client receives ``c`` with the state, corrects every local gradient to ``g - c_i + c``,
    and after ``K`` steps at learning rate ``lr`` sets ``c_i+ = c_i - c + (x - y_i) / (K * lr)``
    (``x`` received, ``y_i`` trained) and sends ``c_i+ - c_i`` beside its update; both travel
    and are counted. The server moves ``x`` by ``lr_global`` times the mean update and ``c`` by
    the sum of the changes over ``num_clients``. Averages are unweighted, as in the paper.

    Args:
        lr_global: the server learning rate (eta_g); 1 takes the plain mean of the client states.
    """

    def __init__(self, lr_global: float = 1.0, min_clients: int = 1) -> None:
        super().__init__(min_clients)
        if lr_global <= 0:
            raise ConfigError(f"Scaffold lr_global must be > 0, got {lr_global}")
        self.lr_global = lr_global
        self._control: State = {}
        self._num_clients = 1

    def setup(self, federation: Federation) -> None:
        self._num_clients = federation.num_clients

    def client_extras(self, server_round: int, global_state: State) -> State:
        if not self._control:
            self._control = {name: torch.zeros_like(t) for name, t in global_state.items()}
        return {f"control.{name}": t for name, t in self._control.items()}

    def client_gradient(self, grads: State, params: State, context: ClientContext) -> State:
        corrected = {}
        for name, g in grads.items():
            key = f"control.{name}"
            if key not in context.extras:  # a tensor that does not travel (a personalised local part)
                corrected[name] = g
            elif key in context.state:
                corrected[name] = g + context.extras[key] - context.state[key]
            else:
                corrected[name] = g + context.extras[key]
        return corrected

    def client_end(self, trained: State, context: ClientContext) -> State:
        if context.steps == 0 or context.lr == 0:
            return {}
        scale = 1.0 / (context.steps * context.lr)
        changes = {}
        for name, y in trained.items():
            key = f"control.{name}"
            old = context.state.get(key, torch.zeros_like(y))
            new = old - context.extras[key] + (context.received[name] - y) * scale
            changes[key] = new - old
            context.state[key] = new
        return changes

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        count = len(updates)
        result = {}
        for name, x in global_state.items():
            mean_delta = sum(u.state[name].to(torch.float64) - x.to(torch.float64) for u in updates) / count
            result[name] = (x.to(torch.float64) + self.lr_global * mean_delta).to(x.dtype)
            key = f"control.{name}"
            change = sum(u.extras[key].to(torch.float64) for u in updates if key in u.extras)
            self._control[name] = (self._control[name].to(torch.float64) + change / self._num_clients).to(x.dtype)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"control": dict(self._control)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._control = dict(state["control"])


class FedDyn(Strategy):
    """FedDyn (Acar et al. 2021): dynamic regularisation that aligns the clients' and the global optimum.

    Client ``k`` keeps ``g_k`` (zero at first) and minimises
    ``L_k(w) - <g_k, w> + alpha / 2 * ||w - w_received||^2``; afterwards
    ``g_k <- g_k - alpha * (w_k - w_received)``. The server keeps ``h`` (zero at first):
    ``h <- h - alpha / N * sum_k (w_k - w)`` and ``w <- mean_k(w_k) - h / alpha``, the mean
    unweighted as in the paper. ``g_k`` stays on the client; only the state travels.

    Args:
        alpha: the regularisation weight, > 0.
    """

    def __init__(self, alpha: float = 0.01, min_clients: int = 1) -> None:
        super().__init__(min_clients)
        if alpha <= 0:
            raise ConfigError(f"FedDyn alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self._h: State = {}
        self._num_clients = 1

    def setup(self, federation: Federation) -> None:
        self._num_clients = federation.num_clients

    def client_loss(self, params: State, context: ClientContext) -> Optional[torch.Tensor]:
        total: Optional[torch.Tensor] = None
        for name, p in params.items():
            if name not in context.received:  # a tensor that does not travel (a personalised local part)
                continue
            term = self.alpha / 2 * (p - context.received[name]).pow(2).sum()
            total = term if total is None else total + term
            gradient = context.state.get(f"grad.{name}")
            if gradient is not None:
                total = total - (gradient * p).sum()
        return total

    def client_end(self, trained: State, context: ClientContext) -> State:
        for name, w in trained.items():
            key = f"grad.{name}"
            old = context.state.get(key, torch.zeros_like(w))
            context.state[key] = old - self.alpha * (w - context.received[name])
        return {}

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        count = len(updates)
        result = {}
        for name, w in global_state.items():
            w64 = w.to(torch.float64)
            h = self._h.get(name, torch.zeros_like(w64)).to(torch.float64)
            h = h - self.alpha / self._num_clients * sum(u.state[name].to(torch.float64) - w64 for u in updates)
            self._h[name] = h.to(w.dtype)
            mean = sum(u.state[name].to(torch.float64) for u in updates) / count
            result[name] = (mean - h / self.alpha).to(w.dtype)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"h": dict(self._h)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._h = dict(state["h"])


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
