"""Partitioners: split a training set's indices among clients, from labels and a seeded generator.

Any Flower Datasets partitioner serves as ``data.partition`` too (:mod:`fedpeft_pl.data.flower`),
and Flower has a counterpart of each of these three: ``IidPartitioner``, ``DirichletPartitioner``
and ``PathologicalPartitioner`` (not its ``ShardPartitioner``, which deals sorted shards). These
three stay, written here, for two things Flower's do not give: they run on a plain label array
without the optional ``datasets`` extra (pyarrow, Hugging Face ``datasets``), so the core install
partitions digits, CIFAR and ImageFolder; and they keep the splits of the shipped seeded configs
(``paper.yaml``, ``quickstart.yaml``) and of every run made with them: Flower's draw differently
from the same seed (its Dirichlet also rebalances and gives up after 10 draws), which would change
users' results. Each returns one sorted index array per client: disjoint, together covering every
sample, and a function of the labels and the generator alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from fedpeft_pl.component import ShownByArguments
from fedpeft_pl.errors import ConfigError


class Partitioner(ShownByArguments, ABC):
    """Split sample indices among ``num_clients`` clients."""

    def __call__(self, targets: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        targets = np.asarray(targets)
        if num_clients < 1:
            raise ConfigError(f"data.num_clients must be >= 1, got {num_clients}")
        if num_clients > len(targets):
            raise ConfigError(
                f"data.num_clients ({num_clients}) exceeds the {len(targets)} training samples; use fewer clients"
            )
        parts = [np.sort(p) for p in self.split(targets, num_clients, rng)]
        empty = [i for i, p in enumerate(parts) if len(p) == 0]
        if empty:
            raise ConfigError(
                f"{self!r} left {len(empty)} of {num_clients} clients without data; use fewer clients or a milder split"
            )
        return parts

    @abstractmethod
    def split(self, targets: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Index arrays, one per client."""


class IID(Partitioner):
    """A uniformly random split into near-equal parts."""

    def split(self, targets: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        return np.array_split(rng.permutation(len(targets)), num_clients)


class Dirichlet(Partitioner):
    """Label skew (Hsu et al. 2019): each class is spread over clients in Dirichlet(alpha) proportions.

    Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID. Draws repeat
    until every client holds at least ``min_samples`` samples.

    Args:
        alpha: concentration, > 0.
        min_samples: the fewest samples any client may hold.
        max_draws: how many draws to try before giving up.
    """

    def __init__(self, alpha: float = 0.5, min_samples: int = 10, max_draws: int = 1000) -> None:
        if not alpha > 0:
            raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}; small values (0.1) give strong label skew")
        if min_samples < 1:
            raise ConfigError(f"Dirichlet min_samples must be >= 1, got {min_samples}")
        self.alpha = alpha
        self.min_samples = min_samples
        self.max_draws = max_draws

    def split(self, targets: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        if num_clients * self.min_samples > len(targets):
            raise ConfigError(
                f"{num_clients} clients x min_samples {self.min_samples} exceeds the {len(targets)} training samples; "
                "lower data.partition.min_samples or data.num_clients"
            )
        classes = np.unique(targets)
        for _ in range(self.max_draws):
            parts: list[list[int]] = [[] for _ in range(num_clients)]
            for label in classes:
                members = rng.permutation(np.flatnonzero(targets == label))
                shares = rng.dirichlet(np.full(num_clients, self.alpha))
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
                for client, chunk in enumerate(np.split(members, cuts)):
                    parts[client].extend(chunk.tolist())
            if min(len(p) for p in parts) >= self.min_samples:
                return [np.asarray(p, dtype=np.int64) for p in parts]
        raise ConfigError(
            f"Dirichlet(alpha={self.alpha}) gave some client fewer than {self.min_samples} samples in {self.max_draws} "
            "draws; lower min_samples, raise alpha or use fewer clients"
        )


class Shards(Partitioner):
    """Pathological non-IID: every client holds exactly ``classes_per_client`` classes.

    Classes are dealt to clients round-robin in a random order, then each class's samples are
    split evenly at random among the clients that hold it.

    Args:
        classes_per_client: k, the number of classes each client sees.
    """

    def __init__(self, classes_per_client: int = 2) -> None:
        if classes_per_client < 1:
            raise ConfigError(f"Shards classes_per_client must be >= 1, got {classes_per_client}")
        self.classes_per_client = classes_per_client

    def split(self, targets: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        classes = np.unique(targets)
        k = self.classes_per_client
        if k > len(classes):
            raise ConfigError(f"Shards classes_per_client ({k}) exceeds the data set's {len(classes)} classes")
        if num_clients * k < len(classes):
            raise ConfigError(
                f"{num_clients} clients x {k} classes cannot cover {len(classes)} classes; "
                "raise classes_per_client or data.num_clients"
            )
        order = rng.permutation(classes)
        holders: dict[int, list[int]] = {int(c): [] for c in classes}
        for client in range(num_clients):
            for j in range(k):
                holders[int(order[(client * k + j) % len(order)])].append(client)
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label, clients in holders.items():
            members = rng.permutation(np.flatnonzero(targets == label))
            for client, chunk in zip(clients, np.array_split(members, len(clients))):
                parts[client].extend(chunk.tolist())
        return [np.asarray(p, dtype=np.int64) for p in parts]


def label_histogram(targets: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """A ``(num_clients, num_classes)`` array of label counts."""
    return np.stack([np.bincount(np.asarray(targets)[p], minlength=num_classes) for p in parts])
