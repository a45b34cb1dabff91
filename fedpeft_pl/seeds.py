"""Explicit randomness: every consumer of randomness draws from its own stream, keyed by name.

A stream's seed is ``derive_seed(seed, STREAM, *position)`` with the run's seed, the stream's key
below, and where in the run it is drawn (round, client). Distinct keys give independent streams: the
noise of DP-SGD, for one, must not be a function of which records Poisson sampling picked.

- ``CLIENT_SAMPLING`` ``(round)``: which clients are sampled in a round
- ``AVAILABILITY`` ``(round, client)``: whether that client drops out or straggles
- ``DATA_ORDER`` ``(round, client)``: that client's shuffling or Poisson batch sampling
- ``LOCAL_TRAINING`` ``(round, client)``: the torch global generator during that client's local
  training (dropout, stochastic depth, anything a module draws)
- ``DP_NOISE`` ``(round, client)``: local DP noise, only with ``reproducible_noise`` (by default DP
  noise is secret: :mod:`fedpeft_pl.noise`)
- ``SERVER_NOISE`` ``(round)``: central DP noise, only with ``reproducible_noise``
- ``ROBUST_NOISE`` ``(server update)``: the noise a norm-bounding aggregator adds to its aggregate, only
  with ``reproducible_noise``
- ``LORA_FROZEN_A`` ``()``: the frozen ``A`` of FFA-LoRA, drawn when the model is built, so every
  client of a deployment draws the same
- ``LORA_RANK`` ``(client)``: a client's LoRA rank under a seeded rank rule (heterogeneous ranks),
  the same in every process and every round
- ``LORA_FRESH_A`` ``(round, client)``: the fresh ``A`` a FLoRA client starts each round from
- ``CLOCK_PROFILE`` ``(client, quantity)``: a client's device and network under the virtual clock
  (its speed, upload and download bandwidth, latency: one stream each)
- ``CLOCK_JITTER`` ``(round, client)``: the per-round factor on that client's task time
- ``ASYNC_DISPATCH`` ``(dispatch)``: which idle client a buffered asynchronous run (FedBuff, FedAsync)
  dispatches next, by the dispatch's sequence number
- ``ATTACK_CLIENTS`` ``()``: which clients an attack makes malicious (:mod:`fedpeft_pl.attacks`)
- ``ATTACK_SAMPLES`` ``(client, sample)``: whether a backdoor puts its trigger on that sample of that client
- ``ATTACK_NOISE`` ``(round, client)``: the noise a malicious client sends (an experiment's, not a secret)
- ``TREE_ORDER`` ``(tree)``: the order in which DP-FTRL deals one tree's clients out, a cohort a round
- ``TREE_NOISE`` ``(tree, level, node)``: the noise of one node of DP-FTRL's tree, only with
  ``reproducible_noise``
- ``DDP_NOISE`` ``(round, client)``: a client's share of distributed DP noise and its randomized rounding, only
  with ``reproducible_noise``
- ``DDP_ROTATION`` ``(round)``: the public random signs of distributed DP's rotation, the same on every client

Keyed by ``data.seed`` instead of the run's seed (the partition is the data's, not the run's):

- ``PARTITION_ORDER`` ``()``: the order in which the samples reach a Flower Datasets partitioner
  (as Flower's ``FederatedDataset`` shuffles before partitioning)
- ``PARTITIONER`` ``()``: the ``seed`` a Flower Datasets partitioner draws from
- ``NATURAL_CLIENTS`` ``()``: which natural clients (writers, ...) take part when ``data.num_clients``
  asks for fewer than the data holds
"""

from __future__ import annotations

import numpy as np

CLIENT_SAMPLING = 1
AVAILABILITY = 2
DATA_ORDER = 3
LOCAL_TRAINING = 4
DP_NOISE = 5
SERVER_NOISE = 6
LORA_FROZEN_A = 7
LORA_RANK = 8
LORA_FRESH_A = 9
PARTITION_ORDER = 10
PARTITIONER = 11
NATURAL_CLIENTS = 12
CLOCK_PROFILE = 13
CLOCK_JITTER = 14
ROBUST_NOISE = 15
ASYNC_DISPATCH = 16
ATTACK_CLIENTS = 17
ATTACK_SAMPLES = 18
ATTACK_NOISE = 19
TREE_ORDER = 20
TREE_NOISE = 21
DDP_NOISE = 22
DDP_ROTATION = 23


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers, e.g. ``(seed, DATA_ORDER, round, client)``; stable across platforms.

    The number of parts is hashed with them: numpy's SeedSequence ignores trailing zeros, so
    without it ``(s, r, 0)`` and ``(s, r)`` would give the same seed.

    Example::

        torch.Generator().manual_seed(derive_seed(seed, DATA_ORDER, server_round, client))
    """
    return int(np.random.SeedSequence([len(parts), *parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def client_seed(seed: int, server_round: int, client: int) -> int:
    """The seed of ``client``'s data order (shuffling, batch sampling) in ``server_round``."""
    return derive_seed(seed, DATA_ORDER, server_round, client)


def training_seed(seed: int, server_round: int, client: int) -> int:
    """The torch seed of ``client``'s local training in ``server_round`` (dropout, drop path)."""
    return derive_seed(seed, LOCAL_TRAINING, server_round, client)
