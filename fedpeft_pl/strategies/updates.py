"""What a client's reply becomes on the server: a :class:`ClientUpdate`, the input of every rule."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpeft_pl.federation import State

__all__ = ["ClientUpdate"]


@dataclass
class ClientUpdate:
    """What one client sent back after local training, as the server decoded it.

    ``state`` is the client's trained state; ``extras`` the further tensors its strategy sent.
    ``aggregate_of`` is set when the update stands for several clients (secure aggregation):
    ``state`` is then their sample-weighted mean (for DPFedAvg: the global state plus the sum of
    their updates, each clipped by its client). ``version`` is the global version the client
    started from (the number of server updates before it was dispatched); in synchronous rounds
    every update of a round has the same one.
    """

    client: int
    num_samples: int
    state: State
    extras: State = field(default_factory=dict)
    aggregate_of: tuple[int, ...] = ()
    version: int = 0
