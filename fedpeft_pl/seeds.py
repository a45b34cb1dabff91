"""Explicit randomness: every random draw in a run takes a seed derived from the run's seed.

Streams (keys of different length or tail never collide):

- ``(seed, round)``: which clients are sampled in a round
- ``(seed, round, client)``: that client's local training (shuffling, dropout, DP noise)
- ``(seed, round, client, AVAILABILITY)``: whether that client drops out or straggles
- ``(seed, round, 0, SERVER_NOISE)``: noise the server adds in that round (central DP)
- ``(seed, 0, 0, LORA_FROZEN_A)``: the frozen ``A`` of FFA-LoRA, drawn when the model is built
  (round 0; rounds count from 1), so every client of a deployment draws the same
"""

from __future__ import annotations

import numpy as np

AVAILABILITY = 1
SERVER_NOISE = 2
LORA_FROZEN_A = 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. ``(seed, round, client)``; stable across platforms and runs."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def client_seed(seed: int, server_round: int, client: int) -> int:
    """The seed of ``client``'s local training in ``server_round`` (its data order)."""
    return derive_seed(seed, server_round, client)
