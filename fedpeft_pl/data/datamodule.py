"""FederatedDataModule: a data set, split among clients, plus the server's global test split."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler, Subset, default_collate
from typing_extensions import override

from fedpeft_pl.data.datasets import ImageDataset, ResidentSamples, Splits, evaluation_loader, image_transform
from fedpeft_pl.data.flower import FlowerPartition
from fedpeft_pl.data.partition import Partitioner, label_histogram
from fedpeft_pl.data.spec import data_arguments, partitioner
from fedpeft_pl.errors import ConfigError

log = logging.getLogger(__name__)


class ClientBatchSampler(Sampler[list[int]]):
    """Batches of the current client's indices; :meth:`assign` switches client and seed.

    One DataLoader serves every client through this sampler, so worker processes (with
    ``num_workers > 0``) are started once per run instead of once per client.

    By default an epoch is a shuffled pass in batches of ``batch_size``. With ``poisson`` (what
    DP-SGD's accounting assumes) each of the epoch's ``ceil(n / batch_size)`` batches includes
    every index independently with probability ``batch_size / n``, so a batch may be empty.
    With ``secret`` (what local DP sets) the seed is ignored and every client's batches are drawn
    from ``os.urandom``: DP-SGD's amplification by subsampling holds only against an adversary who
    does not know which records each batch holds, and the seed is in the config.
    """

    def __init__(self, batch_size: int, poisson: bool = False, secret: bool = False) -> None:
        self.batch_size = batch_size
        self.poisson = poisson
        self.secret = secret
        self.indices = np.empty(0, dtype=np.int64)
        self.generator = torch.Generator()

    def assign(self, indices: np.ndarray, seed: int) -> None:
        """Sample from ``indices`` (one client's samples) from now on, in the order ``seed`` gives."""
        self.indices = indices
        self.generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1 if self.secret else seed)

    def __iter__(self) -> Iterator[list[int]]:
        if self.poisson:
            rate = min(1.0, self.batch_size / max(1, len(self.indices)))
            for _ in range(len(self)):
                mask = torch.rand(len(self.indices), generator=self.generator).numpy() < rate
                yield self.indices[mask].tolist()
            return
        order = self.indices[torch.randperm(len(self.indices), generator=self.generator).numpy()]
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)


class FederatedDataModule(pl.LightningDataModule):
    """A data set split among ``num_clients`` clients, and a global test split for the server.

    Transforms follow the backbone's pretrained configuration (input size, mean, std,
    interpolation), read from the LightningModule's ``data_config``. The per-client label
    histogram is logged once, to the console, to TensorBoard (``data/label_histogram``) and
    to ``client_label_histogram.csv`` in the log directory.

    Args:
        dataset: the data set; scikit-learn's digits (offline) by default.
        num_clients: N, the number of clients; by default 16, or, with a partitioner that finds its
            clients in the data (Flower's ``NaturalIdPartitioner``), all of those.
        partition: how samples are split among clients: ``IID``, ``Dirichlet`` or ``Shards``, or any
            Flower Datasets partitioner by ``class_path`` (``flwr_datasets.partitioner.DirichletPartitioner``;
            :class:`~fedpeft_pl.data.flower.FlowerPartition` says which arguments fedpeft fills in).
        batch_size: local training batch size.
        eval_batch_size: batch size of the server's evaluation; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        seed: seeds the partition and any train/test split the data set makes.
        client_test_fraction: the share of each client's partition held out as that client's own
            test split (seeded by ``seed``); the federation then evaluates every client on its own
            test data at each evaluation round (``clients/acc_*``). 0 keeps every sample for training.

    Example::

        FederatedDataModule(CIFAR100(root="data"), num_clients=64, partition=Dirichlet(alpha=0.1))
    """

    def __init__(
        self,
        dataset: Optional[ImageDataset] = None,
        num_clients: Optional[int] = None,
        # a dict: a Flower Datasets partitioner's class_path and init_args, whose required arguments
        # fedpeft fills in, so jsonargparse cannot build it
        partition: Optional[Union[Partitioner, dict[str, Any]]] = None,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        client_test_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        checked = data_arguments(  # the checks FederatedData makes, which fedpeft comm reads
            dataset, num_clients, partition, batch_size, eval_batch_size, num_workers, client_test_fraction
        )
        self.dataset = checked.dataset
        self.partition = checked.partition
        self._num_clients = checked.num_clients
        self._clients_note = ""
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.client_test_fraction = client_test_fraction
        self.client_test_indices: list[np.ndarray] = []
        self.data_config: Optional[dict[str, Any]] = None
        self.splits: Optional[Splits] = None
        self.client_indices: list[np.ndarray] = []
        self._sampler = ClientBatchSampler(batch_size)
        self._client_loader: Optional[DataLoader] = None

    @property
    def num_clients(self) -> int:
        """N; read from the data (its natural clients) the first time where the partitioner finds them there."""
        if self._num_clients is None:
            assert isinstance(self.partition, FlowerPartition)
            columns, label = self.dataset.columns(self.seed)
            self._num_clients = self.partition.count(columns, label, self.seed)
            self._clients_note = f"all {self._num_clients} clients found in the data (data.num_clients null); "
            log.info(
                f"data: {self.partition!r} finds {self._num_clients} clients in the data; data.num_clients is null"
            )
        return self._num_clients

    @property
    def known_num_clients(self) -> Optional[int]:
        """N where it is known without reading the data; None while a partitioner has yet to find it there."""
        return self._num_clients

    @property
    def poisson_sampling(self) -> bool:
        """Whether local batches are Poisson samples (set by :class:`~fedpeft_pl.privacy.LocalDP`)."""
        return self._sampler.poisson

    @poisson_sampling.setter
    def poisson_sampling(self, value: bool) -> None:
        self._sampler.poisson = value

    @property
    def secret_sampling(self) -> bool:
        """Whether local batches are drawn from ``os.urandom`` instead of the seed (set by local DP)."""
        return self._sampler.secret

    @secret_sampling.setter
    def secret_sampling(self, value: bool) -> None:
        self._sampler.secret = value

    @override
    def prepare_data(self) -> None:
        self.dataset.prepare()

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits is not None:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        config = self.data_config or getattr(module, "data_config", None)
        if config is None:
            raise ConfigError("set FederatedDataModule.data_config (the backbone's data_config) before setup()")
        splits = self.dataset.load(image_transform(config), self.seed)
        model_classes = getattr(module, "num_classes", None)
        if model_classes is not None and model_classes != splits.num_classes:
            raise ConfigError(
                f"{self.dataset!r} has {splits.num_classes} classes but model.num_classes is {model_classes}; "
                f"set model.num_classes: {splits.num_classes}"
            )
        self.client_indices = self._split(splits)
        if self.client_test_fraction > 0:
            self.client_indices, self.client_test_indices = _hold_out(
                self.client_indices, self.client_test_fraction, self.seed
            )
        self.splits = splits
        self._report_partition()

    def _split(self, splits: Splits) -> list[np.ndarray]:
        if not isinstance(self.partition, FlowerPartition):
            return self.partition(splits.train_targets, self.num_clients, np.random.default_rng(self.seed))
        columns = splits.columns or {splits.label_column: splits.train_targets}
        parts = self.partition.split(columns, splits.label_column, self.num_clients, self.seed)
        if self.partition.from_data and not self._clients_note:
            found = self.partition.found
            self._clients_note = (
                f"all {found} clients found in the data; "
                if found == self.num_clients
                else f"{self.num_clients} of the {found} clients it finds, chosen by data.seed; "
            )
        empty = sum(len(p) == 0 for p in parts)
        if empty:
            raise ConfigError(
                f"{self.partition!r} left {empty} of {self.num_clients} clients without data; use fewer clients or a "
                "milder split"
            )
        return parts

    def use_splits(self, splits: Splits) -> Splits:
        """Serve ``splits`` (the same samples in the same order, e.g. their cached features) from now on;
        returns the splits served until now."""
        previous = self.splits
        assert previous is not None, "call setup() first"
        self.splits = splits
        self._client_loader = None  # the next client_dataloader reads the new training split
        return previous

    @property
    def label_histogram(self) -> np.ndarray:
        """Label counts per client, shape ``(num_clients, num_classes)``."""
        assert self.splits is not None, "call setup() first"
        return label_histogram(self.splits.train_targets, self.client_indices, self.splits.num_classes)

    def client_num_samples(self, client: int) -> int:
        """The number of ``client``'s training samples."""
        return len(self.client_indices[client])

    def client_num_batches(self, client: int) -> int:
        """The number of batches in one pass over ``client``'s training samples."""
        return math.ceil(self.client_num_samples(client) / self.batch_size)

    @property
    def has_client_tests(self) -> bool:
        """Whether every client holds out a test split of its own (``client_test_fraction > 0``)."""
        return bool(self.client_test_indices)

    def client_test_dataloader(self, client: int) -> DataLoader:
        """The loader of ``client``'s own held-out test samples, in order."""
        assert self.splits is not None, "call setup() first"
        return DataLoader(
            Subset(self.splits.train, self.client_test_indices[client].tolist()),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
        )

    def client_batches(self, client: int, seed: int, local_epochs: int, max_batches: int) -> list[list[int]]:
        """The index batches that ``local_epochs`` passes of ``client_dataloader(client, seed)`` yield, capped at
        ``max_batches``.

        Exactly the sequential loader's batches, in order: a sampler of its own, seeded the same way
        (the shared loader's sampler is left untouched). The vectorised runner stacks these.
        """
        assert self.splits is not None, "call setup() first"
        sampler = ClientBatchSampler(self.batch_size, self.poisson_sampling, self.secret_sampling)
        sampler.assign(self.client_indices[client], seed)
        batches: list[list[int]] = []
        for _ in range(local_epochs):
            for batch in sampler:
                if len(batches) >= max_batches:
                    return batches
                batches.append(batch)
        return batches

    def client_dataloader(self, client: int, seed: int) -> DataLoader:
        """The loader of ``client``'s split, shuffled by ``seed``; the same loader object for all clients."""
        assert self.splits is not None, "call setup() first"
        self._sampler.assign(self.client_indices[client], seed)
        if self._client_loader is None:
            self._client_loader = DataLoader(
                self.splits.train,
                batch_sampler=self._sampler,
                collate_fn=_EmptyBatchCollate(self.splits.train),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=torch.cuda.is_available(),
            )
        return self._client_loader

    @override
    def train_dataloader(self) -> DataLoader:
        """All clients' data pooled: the centralised baseline when used with a plain Trainer."""
        assert self.splits is not None, "call setup() first"
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.splits.train,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        """The global test split, on which the server evaluates the aggregated model each round."""
        assert self.splits is not None, "call setup() first"
        # under DDP each process evaluates its own part of the test split, none twice (Lightning's default
        # DistributedSampler pads with repeated samples), and torchmetrics sums the counts
        test, trainer = self.splits.test, self.trainer
        distributed = trainer is not None and trainer.world_size > 1
        if isinstance(test, ResidentSamples):  # transformed once for the run (the federated loop)
            batches = None
            if distributed:
                batches = _DistributedBatches(test, self.eval_batch_size, trainer.world_size, trainer.global_rank)
            return evaluation_loader(test, self.eval_batch_size, batches)
        sampler = None
        if distributed:
            sampler = UnrepeatedDistributedSampler(
                test, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            test,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _report_partition(self) -> None:
        if self.trainer is not None and not self.trainer.is_global_zero:
            return
        histogram = self.label_histogram
        sizes = histogram.sum(axis=1)
        classes = (histogram > 0).sum(axis=1)
        assert self.splits is not None
        # the trainer says whether the run is private; a plain Lightning trainer runs no DP
        if self.trainer is not None and not getattr(self.trainer, "releases_client_statistics", True):
            # a private run: the sample counts are public (they travel as FedAvg weights), the labels are not
            log.info(
                f"data: {self.dataset!r}, {int(sizes.sum())} training samples over {self.num_clients} clients "
                f"({self.partition!r}): {sizes.min()}-{sizes.max()} samples per client; {len(self.splits.test)} test "
                "samples; per-client label histograms are not collected in this private run"
            )
            return
        log.info(
            f"data: {self.dataset!r}, {int(sizes.sum())} training samples over {self.num_clients} clients "
            f"({self.partition!r}): {self._clients_note}{sizes.min()}-{sizes.max()} samples per client "
            f"(median {int(np.median(sizes))}), "
            f"{classes.min()}-{classes.max()} classes per client (median {int(np.median(classes))}); "
            f"{len(self.splits.test)} test samples"
        )
        if self.trainer is None:
            return
        header = "| client | samples | " + " | ".join(str(c) for c in range(histogram.shape[1])) + " |"
        rule = "|" + "---|" * (histogram.shape[1] + 2)
        rows = [f"| {i} | {sizes[i]} | " + " | ".join(str(n) for n in row) + " |" for i, row in enumerate(histogram)]
        for logger in self.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("data/label_histogram", "\n".join([header, rule, *rows]), global_step=0)
        # the first logger's folder, as trainer.log_dir finds it; trainer.log_dir itself is a
        # collective under DDP, which only rank 0 reaches here
        first = self.trainer.loggers[0] if self.trainer.loggers else None  # no logger: no files
        log_dir = getattr(first, "log_dir", None) or getattr(first, "save_dir", None)
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, "client_label_histogram.csv")
            columns = ",".join(f"class_{c}" for c in range(histogram.shape[1]))
            np.savetxt(path, histogram, fmt="%d", delimiter=",", header=columns, comments="")


def _hold_out(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's indices into (train, test); at least one sample of each where the client has two."""
    rng = np.random.default_rng([seed, 0x7E57])  # its own stream: the partition's draws stay as they were
    train, test = [], []
    for part in parts:
        order = rng.permutation(part)
        count = min(max(1, round(fraction * len(part))), len(part) - 1) if len(part) >= 2 else 0
        test.append(np.sort(order[:count]))
        train.append(np.sort(order[count:]))
    return train, test


class _EmptyBatchCollate:
    """PyTorch's default collate, plus zero-length tensors for the empty batches of Poisson sampling.

    DP-SGD must take its noisy step on an empty batch too (skipping it would reveal that the
    batch was empty); the default collate cannot stack nothing, so an empty batch is a
    one-sample batch cut to length zero.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __call__(self, samples: list) -> Any:
        if samples:
            return default_collate(samples)
        return tuple(t[:0] for t in default_collate([self.dataset[0]]))


class _DistributedBatches(UnrepeatedDistributedSampler):
    """This process's part of a kept test split, as the loader over the transforms reads it
    (``UnrepeatedDistributedSampler``), in batches of indices. Still a ``DistributedSampler``, so
    Lightning leaves the loader as it is instead of putting in its own sampler of single samples."""

    def __init__(self, dataset: Any, batch_size: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[Any]:  # batches, where the parent yields indices
        indices = list(super().__iter__())
        return (indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size))

    def __len__(self) -> int:
        return math.ceil(super().__len__() / self.batch_size)


_partitioner = partitioner  # its old name
