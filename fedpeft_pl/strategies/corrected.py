"""Algorithms that correct the clients' drift with per-client state: SCAFFOLD and FedDyn.

Both act on the client (a gradient correction, a loss term) and keep server state their own way,
so each overrides :meth:`~fedpeft_pl.strategies.Strategy.aggregate_fit` as its paper writes it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientContext, Federation, State
from fedpeft_pl.strategies.base import Strategy
from fedpeft_pl.strategies.updates import ClientUpdate

__all__ = ["FedDyn", "Scaffold"]


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

    synchronous_only = (
        "its server moves the control variate c by the round's changes, each computed against the c the whole "
        "round received; replies that started from different versions hold different c"
    )

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

    synchronous_only = (
        "its server term h sums every client's drift from the one state the round received; replies that started "
        "from different versions drift from different states"
    )

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
