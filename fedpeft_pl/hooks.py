"""The federated hooks that :class:`~fedpeft_pl.loop.FederatedLoop` calls, in this order, each round.

::

    on_train_epoch_start                     (Lightning; one epoch is one round)
    on_round_start(server_round, clients)
      for each sampled client:
        on_client_start(client)              the client receives the global state; a callback
                                             may raise ClientDropped here to keep it out
        (on_client_dropped(client, reason)   it dropped out: it trains and sends nothing)
        ... Lightning's training batches and their hooks ...
        on_client_end(client, num_samples)   the client's update is taken
          or, if its local training raised,
        on_client_failed(client, error)      it is left out of this round
    on_round_gather(gather)                  under DDP each process trained a share of the clients;
                                             a callback combines what it collected, e.g. with
                                             gather(obj) -> [obj of rank 0, obj of rank 1, ...]
    on_round_end(server_round)               the server aggregates
    ... Lightning's validation loop: the global model on the global test split ...
    on_train_epoch_end                       (Lightning; round metrics are logged, checkpoints written)

``server_round`` counts from 1. A callback gets these hooks by deriving from
:class:`FederatedCallback`; a LightningModule gets them by defining methods of the same names.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl


class ClientDropped(Exception):
    """Raised in ``on_client_start`` to keep a sampled client out of the round; the message says why."""


class FederatedCallback(pl.Callback):
    """A Lightning callback that may also react to rounds and clients."""

    def on_round_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, server_round: int, clients: list[int]
    ) -> None:
        """A round begins; ``clients`` were sampled for it."""

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int) -> None:
        """``client`` is about to train locally."""

    def on_client_dropped(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int, reason: str) -> None:
        """``client`` was sampled but dropped out: it returns nothing this round."""

    def on_client_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int, num_samples: int
    ) -> None:
        """``client`` finished local training; it holds ``num_samples`` training samples."""

    def on_client_failed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int, error: BaseException
    ) -> None:
        """``client``'s local training raised ``error``; it sends nothing this round."""

    def on_round_gather(self, trainer: pl.Trainer, pl_module: pl.LightningModule, gather: Callable[[Any], list[Any]]) -> None:
        """Every process has trained its share of the round's clients (all of them, in one process).

        A callback that keeps per-client or per-round state collected in the client hooks merges
        it here, so that every process holds the same state before the server aggregates.
        ``gather(obj)`` returns ``obj`` from every process in rank order and must be called by all.
        """

    def on_round_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, server_round: int) -> None:
        """Every sampled client has trained; the server combines their updates here."""
