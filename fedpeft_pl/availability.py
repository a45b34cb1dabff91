"""Client stability: which sampled clients return, and how much of their local work they finish."""

from __future__ import annotations

import math

import numpy as np

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import Plan
from fedpeft_pl.seeds import AVAILABILITY, derive_seed


class ClientAvailability:
    """Dropout and stragglers, drawn per (seed, round, client) so a run repeats exactly.

    A dropped client receives the global state but returns nothing. A straggler completes a
    uniformly drawn share of its planned local batches (at least one).

    Args:
        dropout: probability that a sampled client returns nothing.
        stragglers: probability that a returning client is a straggler.
        straggler_work: the range ``[low, high]`` of the share of local batches a straggler completes.

    Example::

        trainer:
          availability:
            class_path: fedpeft_pl.ClientAvailability
            init_args: {dropout: 0.2, stragglers: 0.3, straggler_work: [0.2, 0.8]}
    """

    def __init__(
        self, dropout: float = 0.0, stragglers: float = 0.0, straggler_work: tuple[float, float] = (0.1, 0.9)
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"availability dropout must be in [0, 1), got {dropout}")
        if not 0.0 <= stragglers <= 1.0:
            raise ConfigError(f"availability stragglers must be in [0, 1], got {stragglers}")
        low, high = straggler_work
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(
                f"availability straggler_work must satisfy 0 < low <= high <= 1, got {list(straggler_work)}"
            )
        self.dropout = dropout
        self.stragglers = stragglers
        self.straggler_work = (low, high)

    def plan(self, seed: int, server_round: int, client: int, planned_batches: int) -> Plan:
        """Each of ``clients``' plan for ``server_round``: whether it drops out, and its step cap if it straggles."""
        rng = np.random.default_rng(derive_seed(seed, AVAILABILITY, server_round, client))
        dropped, straggles, share = (
            rng.random() < self.dropout,
            rng.random() < self.stragglers,
            rng.uniform(*self.straggler_work),
        )
        if dropped:
            return Plan(True, 0, False, planned_batches)
        if straggles:
            return Plan(False, max(1, math.floor(share * planned_batches)), True, planned_batches)
        return Plan(False, planned_batches, False, planned_batches)

    def __repr__(self) -> str:
        return (
            f"ClientAvailability(dropout={self.dropout}, stragglers={self.stragglers}, "
            f"straggler_work={list(self.straggler_work)})"
        )
