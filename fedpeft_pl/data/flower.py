"""Flower Datasets' partitioners, chosen by ``class_path`` in YAML, on any of fedpeft's data sets.

A Flower partitioner splits a ``datasets.Dataset``; here it gets a small table of the training
split's plain columns (labels, writer IDs, ...) plus each row's index, never the images, and the
indices of each partition it returns are that client's samples. fedpeft fills in what belongs to
the run: ``num_partitions`` (``data.num_clients``), ``partition_by`` (the label column, unless
given) and ``seed`` (from ``data.seed``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from fedpeft_pl.data.hub import INSTALL, import_datasets
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.seeds import NATURAL_CLIENTS, PARTITION_ORDER, PARTITIONER, derive_seed

# each row's position in the training split, carried through the partitioner
INDEX = "__fedpeft_index__"

log = logging.getLogger(__name__)


class FlowerPartition:
    """A Flower Datasets partitioner (``flwr_datasets.partitioner.*``) by class path and arguments.

    One whose constructor takes no ``num_partitions`` (``NaturalIdPartitioner``,
    ``GroupedNaturalIdPartitioner``, ``InnerDirichletPartitioner``) sets the number of clients
    from the data: all its partitions with ``data.num_clients: null``, or that many of them, chosen
    by ``data.seed``.

    Args:
        class_path: the partitioner's class, e.g. ``flwr_datasets.partitioner.DirichletPartitioner``.
        init_args: its arguments, without ``num_partitions`` (``data.num_clients``) and ``seed``
            (``data.seed``); ``partition_by`` defaults to the data set's label column.

    Example::

        FlowerPartition("flwr_datasets.partitioner.DirichletPartitioner", {"alpha": 0.1})
    """

    def __init__(self, class_path: str, init_args: Optional[dict[str, Any]] = None) -> None:
        self.cls = _partitioner_class(class_path)
        self.name = self.cls.__name__
        self.args = dict(init_args or {})
        params = inspect.signature(self.cls).parameters
        self._params = set(params)
        unknown = sorted(set(self.args) - self._params)
        if unknown:
            raise ConfigError(
                f"data.partition: {self.name} takes no argument {unknown[0]!r} (it takes {', '.join(params)}); "
                "fix data.partition.init_args"
            )
        if "seed" in self.args:
            raise ConfigError(
                f"data.partition: {self.name} draws from data.seed; remove init_args.seed and set data.seed"
            )
        # those without num_partitions take their number of partitions from the data
        self.from_data = "num_partitions" not in self._params
        self.found: Optional[int] = None  # the partitions the last split found in the data

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"

    def check(self, num_clients: Optional[int]) -> Optional[int]:
        """The number of clients ``data.num_clients`` and ``num_partitions`` agree on (None: from the data).

        Builds the partitioner once, so an argument out of range is refused before anything runs.
        """
        given = self.args.get("num_partitions")
        if given is not None and num_clients is not None and given != num_clients:
            raise ConfigError(
                f"data.partition.init_args.num_partitions ({given}) differs from data.num_clients ({num_clients}); "
                "remove num_partitions (data.num_clients sets it)"
            )
        if not self.from_data:
            num_clients = num_clients or given or 16
        self.make(num_clients, "label", 0)
        return num_clients

    def make(self, num_clients: Optional[int], label_column: str, seed: int) -> Any:
        """The Flower partitioner, with the run's number of clients, label column and seed filled in."""
        args = dict(self.args)
        if "num_partitions" in self._params:
            args["num_partitions"] = num_clients
        if "partition_by" in self._params:
            args.setdefault("partition_by", label_column)
        if "seed" in self._params:
            args["seed"] = derive_seed(seed, PARTITIONER)
        try:
            return self.cls(**args)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data.partition {self!r}: {_first_line(err)}; fix data.partition.init_args") from None

    def count(self, columns: dict[str, np.ndarray], label_column: str, seed: int) -> int:
        """How many partitions the data makes (for a partitioner that takes its number from the data)."""
        partitioner = self.make(None, label_column, seed)
        partitioner.dataset = _table(columns, seed, self._by(label_column))
        with _folded_warnings(self):
            return int(_call(self, lambda: partitioner.num_partitions))

    def split(self, columns: dict[str, np.ndarray], label_column: str, num_clients: int, seed: int) -> list[np.ndarray]:
        """Sorted sample indices of each of ``num_clients`` clients."""
        partitioner = self.make(num_clients, label_column, seed)
        partitioner.dataset = _table(columns, seed, self._by(label_column))
        with _folded_warnings(self):
            return self._split(partitioner, num_clients, seed)

    def _split(self, partitioner: Any, num_clients: int, seed: int) -> list[np.ndarray]:
        available = int(_call(self, lambda: partitioner.num_partitions))
        self.found = available
        if available < num_clients:
            raise ConfigError(
                f"data.num_clients ({num_clients}) exceeds the {available} clients {self!r} finds in the data; "
                f"set data.num_clients to at most {available}, or null for all of them"
            )
        chosen = list(range(available))
        if available > num_clients:
            rng = np.random.default_rng(derive_seed(seed, NATURAL_CLIENTS))
            chosen = sorted(int(c) for c in rng.choice(available, size=num_clients, replace=False))
        return [np.sort(np.asarray(_call(self, lambda c=c: partitioner.load_partition(c)[INDEX]))) for c in chosen]

    def _by(self, label_column: str) -> str:
        return str(self.args.get("partition_by", label_column))


def _partitioner_class(class_path: str) -> Any:
    import_datasets()
    try:
        base = importlib.import_module("flwr_datasets.partitioner").Partitioner
    except ImportError:
        raise ConfigError(f"Flower Datasets partitioners need the datasets extra: {INSTALL}") from None
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(
            f"data.partition: cannot import {class_path!r}; name a fedpeft_pl.data partitioner (IID, Dirichlet, "
            "Shards) or a Flower Datasets one (flwr_datasets.partitioner.DirichletPartitioner, ...)"
        ) from None
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise ConfigError(
            f"data.partition: {class_path} is neither a fedpeft_pl.data partitioner nor a Flower Datasets one "
            "(flwr_datasets.partitioner.*)"
        )
    return cls


def _table(columns: dict[str, np.ndarray], seed: int, partition_by: str) -> Any:
    """The columns as a ``datasets.Dataset`` in a seeded order, each row with its index."""
    if partition_by not in columns:
        raise ConfigError(
            f"data.partition: the data set has no column {partition_by!r} to partition by (its columns: "
            f"{', '.join(columns)}); set data.partition.init_args.partition_by to one of them"
        )
    datasets = import_datasets()
    size = len(next(iter(columns.values())))
    # Flower's FederatedDataset shuffles a split before partitioning it; so do we, by data.seed
    order = np.random.default_rng(derive_seed(seed, PARTITION_ORDER)).permutation(size)
    return datasets.Dataset.from_dict({**{k: np.asarray(v)[order] for k, v in columns.items()}, INDEX: order})


def _call(partition: FlowerPartition, compute: Any) -> Any:
    """Run the partitioner: what it refuses (too few samples, classes or IDs) is the user's to fix."""
    try:
        return compute()
    except (ValueError, KeyError, IndexError) as err:
        raise ConfigError(
            f"data.partition {partition!r} cannot split this data: {_first_line(err)}; change its init_args or "
            "data.num_clients"
        ) from None


@contextlib.contextmanager
def _folded_warnings(partition: FlowerPartition) -> Iterator[None]:
    """Flower's partitioners warn on every retry (DirichletPartitioner once per resampling): one log
    line for them all when the split succeeds, none when it fails, where the error says what to change."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    # the partitioner's own (Flower Datasets' code, or the module of a user's partitioner); others as they were
    flower = os.path.dirname(importlib.import_module("flwr_datasets").__file__ or "")
    own = {os.path.abspath(inspect.getfile(partition.cls))}
    mine = [w for w in caught if w.filename.startswith(flower + os.sep) or os.path.abspath(w.filename) in own]
    for other in caught:
        if not any(other is w for w in mine):
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno, source=other.source)
    if mine:
        first = _first_line(mine[0].message)  # type: ignore[arg-type]
        log.warning("data.partition %r warned %d time(s) while splitting, first: %s", partition, len(mine), first)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
