"""Aggregation strategies: how the server configures a round, what clients do with it, how it is combined.

A strategy follows Flower's split: :meth:`Strategy.configure_fit` decides what every sampled
client receives (the state, a config dict and, through :meth:`Strategy.client_extras`, further
tensors), :meth:`Strategy.aggregate_fit` turns the clients' updates into the next global state.
By default that is two composable parts: an :class:`~fedpeft_pl.strategies.aggregators.Aggregator`
(the rule: weighted mean, median, trimmed mean) followed by a
:class:`~fedpeft_pl.strategies.optimizers.ServerOptimizer` (the step: server learning rate,
Adam, Yogi, Adagrad). Server-side state, such as a server optimizer's moments, lives in the
strategy and is checkpointed through :meth:`Strategy.state_dict`.

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

from dataclasses import replace
from typing import Any, ClassVar, Optional

import torch

from fedpeft_pl.component import Component
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientContext, Federation, State
from fedpeft_pl.strategies.aggregators import Aggregator, WeightedMean
from fedpeft_pl.strategies.optimizers import ServerOptimizer, ServerSGD
from fedpeft_pl.strategies.updates import ClientUpdate

__all__ = ["ClientUpdate", "Strategy"]


class Strategy(Component):
    """Base class: an aggregator followed by a server optimizer, and the client hooks of an algorithm.

    A subclass overrides the client hooks for an algorithm that acts on the client, and
    :meth:`aggregate_fit` only where the server update is not "aggregate, then step" (SCAFFOLD,
    FedDyn, DPFedAvg).

    Args:
        min_clients: rounds in which fewer updates arrive are skipped and the global state stays.
        aggregator: the rule that combines the updates; the sample-weighted mean by default.
        server_optimizer: the step from the global state towards the aggregate; the aggregate
            itself (:class:`~fedpeft_pl.strategies.optimizers.ServerSGD` with ``lr = 1``) by default.
    """

    fixed_parts: ClassVar[tuple[str, ...]] = ()
    """The parts a preset fixes from its own arguments (FedAdam's server step): not shown apart in its repr."""

    def __init__(
        self,
        min_clients: int = 1,
        aggregator: Optional[Aggregator] = None,
        server_optimizer: Optional[ServerOptimizer] = None,
    ) -> None:
        if min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
        self.min_clients = min_clients
        self._aggregator = aggregator if aggregator is not None else WeightedMean()
        self._server_optimizer = server_optimizer if server_optimizer is not None else ServerSGD()

    @property
    def aggregator(self) -> Aggregator:
        """The rule that combines a round's updates."""
        return self._aggregator

    @property
    def server_optimizer(self) -> ServerOptimizer:
        """The step from the global state towards the aggregate."""
        return self._server_optimizer

    @property
    def needs_individual_updates(self) -> bool:
        """Whether the server update needs each client's own update, not only their sample-weighted sum
        (secure aggregation hides them): the aggregator says so, and so does an :meth:`aggregate_fit` of a
        subclass's own, which is read as needing them unless the subclass says otherwise."""
        return self._aggregator.needs_individual_updates or type(self).aggregate_fit is not Strategy.aggregate_fit

    synchronous_only: ClassVar[Optional[str]] = None
    """Why the strategy's server update needs one cohort that started from one global state (SCAFFOLD's
    control variates, FedDyn's h, central DP's sampling), so an asynchronous schedule refuses it; None if not."""

    @property
    def sends_client_extras(self) -> bool:
        """Whether its clients send tensors beside their update (:meth:`client_end` is the strategy's own)."""
        return type(self).client_end is not Strategy.client_end

    def __repr__(self) -> str:
        """The public arguments, and the parts that differ from the defaults and that the class does not fix."""
        args = [f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_")]
        if "aggregator" not in self.fixed_parts and type(self._aggregator) is not WeightedMean:
            args.append(f"aggregator={self._aggregator!r}")
        step = self._server_optimizer
        default_step = type(step) is ServerSGD and isinstance(step, ServerSGD) and step.lr == 1.0
        if "server_optimizer" not in self.fixed_parts and not default_step:
            args.append(f"server_optimizer={step!r}")
        return f"{type(self).__name__}({', '.join(args)})"

    def setup(self, federation: Federation) -> None:
        """Called once before training with the federation's shape; a strategy may calibrate itself here."""
        self._aggregator.setup(federation)

    def setup_buffered(self, federation: Federation, buffer_size: int) -> None:
        """:meth:`setup` for buffered asynchronous aggregation (FedBuff, FedAsync): each server update takes
        ``buffer_size`` replies, decided by their arrival rather than by sampling."""
        self.setup(federation)

    def draw_clients(self, federation: Federation, server_round: int, size: int) -> list[int]:
        """The ``size`` clients of ``server_round`` (its cohort: ``clients_per_round``, more with over-selection):
        the federation's sampling (:meth:`~fedpeft_pl.federation.Federation.sample`) by default. A strategy whose
        guarantee bounds how often a client takes part (DP-FTRL: once per tree) draws them itself."""
        return replace(federation, clients_per_round=size).sample(server_round)

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
        """Extra per-round metrics to log, e.g. the privacy spent so far, or what the aggregator decided."""
        return self._aggregator.round_metrics()

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        """The next global state: the aggregator's aggregate of ``updates``, then the server optimizer's step."""
        return self._server_optimizer.step(global_state, self._aggregator.aggregate(updates, global_state))

    def state_dict(self) -> dict[str, Any]:
        """The strategy's server state (its aggregator's and server optimizer's), for checkpoints."""
        return {"aggregator": self._aggregator.state_dict(), "server_optimizer": self._server_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the server state :meth:`state_dict` gave."""
        self._aggregator.load_state_dict(state["aggregator"])
        self._server_optimizer.load_state_dict(state["server_optimizer"])
