"""What a client's reply becomes on the server: a :class:`ClientUpdate`, the input of every rule."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedpeft_pl.federation import State

__all__ = ["ClientUpdate", "apply_delta", "flat_deltas"]


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


def flat_deltas(updates: list[ClientUpdate], global_state: State) -> torch.Tensor:
    """Each update's ``state - global_state`` over all tensors, one float64 row per update (for norms and
    distances: the robust rules, the omniscient attacks)."""
    rows = []
    for update in updates:
        rows.append(
            torch.cat([(update.state[n].double() - t.double()).flatten() for n, t in global_state.items()])
            if global_state
            else torch.zeros(0, dtype=torch.float64)
        )
    return torch.stack(rows)


def apply_delta(global_state: State, delta: torch.Tensor) -> State:
    """``global_state`` plus the flat float64 ``delta`` (:func:`flat_deltas`' layout), each tensor cast back to its
    dtype."""
    result, start = {}, 0
    for name, tensor in global_state.items():
        part = delta[start : start + tensor.numel()].view(tensor.shape).to(tensor.device)
        result[name] = (tensor.double() + part).to(tensor.dtype)
        start += tensor.numel()
    return result
