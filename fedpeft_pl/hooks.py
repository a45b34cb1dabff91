"""The federated hooks that :class:`~fedpeft_pl.loop.FederatedLoop` calls, in this order.

::

    on_federation_start(federation)          once, after Lightning's on_train_start
    each round:
    on_train_epoch_start                     (Lightning; one epoch is one round)
    on_round_start(round)                    the round's clients and plans are known
      for each client of this process's share, as the runner reports it:
        on_client_start(round, client)       before the client receives the round's message;
                                             a callback may raise ClientDropped to keep it out
        ... the runner trains it (Lightning's training batches and their hooks in-process) ...
        on_client_end(round, result)         its ClientResult arrived (payload, metrics)
          or on_client_dropped(round, result)  it took no part (result.dropped says why)
          or on_client_failed(round, result)   its local training raised (result.error)
    on_round_gather(round, gather)           under DDP each process trained a share of the clients;
                                             a callback merges what it collected, e.g. with
                                             gather(obj) -> [obj of rank 0, obj of rank 1, ...]
    on_round_end(round)                      the server aggregates
    ... Lightning's validation loop: the global model on the global test split ...
    on_train_epoch_end                       (Lightning; round metrics are logged, checkpoints written)

``round.number`` counts from 1. A callback gets these hooks by deriving from
:class:`FederatedCallback`; a LightningModule by deriving from :class:`FederatedHooks`.

Where a callback runs: the whole run (the server) always has every callback. A deployed client
(a Flower SuperNode training one client) runs only the callbacks whose ``runs_on`` is
``"client"`` or ``"both"``; a plain Lightning callback counts as ``"server"`` unless its class
sets ``runs_on`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import lightning.pytorch as pl

if TYPE_CHECKING:
    from fedpeft_pl.federation import ClientResult, Federation, Round

RunsOn = Literal["server", "client", "both"]


class ClientDropped(Exception):
    """Raised in ``on_client_start`` to keep a sampled client out of the round; the message says why."""


def runs_on_client(callback: pl.Callback) -> bool:
    """Whether ``callback`` belongs on a deployed client (see the module docstring)."""
    return getattr(callback, "runs_on", "server") in ("client", "both")


class FederatedCallback(pl.Callback):
    """A Lightning callback that may also react to rounds and clients.

    Attributes:
        runs_on: ``"server"`` (the default), ``"client"`` or ``"both"``: whether a deployed
            client runs it too.
    """

    runs_on: ClassVar[RunsOn] = "server"

    def on_federation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, federation: Federation) -> None:
        """Training starts; ``federation`` is the run's shape (clients, rounds, seed)."""

    def on_round_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round) -> None:
        """A round begins; ``round.clients`` were sampled for it."""

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, client: int) -> None:
        """``client`` is about to receive the round's message; raise ClientDropped to keep it out."""

    def on_client_dropped(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        """``result.client`` was sampled but took no part: ``result.dropped`` says why."""

    def on_client_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        """``result.client`` finished local training and sent ``result``.

        With the in-process sequential runner the module still holds that client's trained state.
        """

    def on_client_failed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        """``result.client``'s local training raised ``result.error``; it sends nothing this round."""

    def on_round_gather(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, gather: Callable[[Any], list[Any]]
    ) -> None:
        """Every process has trained its share of the round's clients (all of them, in one process).

        A callback that keeps per-client or per-round state collected in the client hooks merges
        it here, so that every process holds the same state before the server aggregates.
        ``gather(obj)`` returns ``obj`` from every process in rank order and must be called by all.
        """

    def on_round_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round) -> None:
        """Every sampled client has reported; the server combines their updates here."""


class FederatedHooks:
    """Federated hooks for a LightningModule: derive from this beside ``LightningModule``."""

    def on_federation_start(self, federation: Federation) -> None:
        """Training starts with this federation."""

    def on_round_start(self, round: Round) -> None:
        """A round begins."""

    def on_round_gather(self, round: Round, gather: Callable[[Any], list[Any]]) -> None:
        """Every process has trained its share; merge per-process state here."""

    def on_round_end(self, round: Round) -> None:
        """The server has aggregated the round."""
