"""``data`` of a config without Lightning: its arguments checked, its data set and partitioner, and the number
of clients where it is known without reading the data.

:class:`~fedpeft_pl.data.datamodule.FederatedDataModule` starts from :func:`data_arguments`, and so does
:class:`FederatedData`, which takes the same arguments and is what ``fedpeft comm`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Optional, Union

from fedpeft_pl.data.datasets import Digits, ImageDataset
from fedpeft_pl.data.flower import FlowerPartition
from fedpeft_pl.data.partition import IID, Partitioner
from fedpeft_pl.errors import ConfigError

__all__ = ["DataArguments", "FederatedData", "data_arguments", "partitioner"]


@dataclass
class DataArguments:
    """``data``'s arguments, checked: the data set, the partitioner and N where known (None until read)."""

    dataset: ImageDataset
    partition: Union[Partitioner, FlowerPartition]
    num_clients: Optional[int]


def data_arguments(
    dataset: Optional[ImageDataset],
    num_clients: Optional[int],
    partition: Optional[Union[Partitioner, dict[str, Any]]],
    batch_size: int,
    eval_batch_size: Optional[int],
    num_workers: int,
    client_test_fraction: float,
) -> DataArguments:
    """Refuse, in one line, ``data`` arguments that cannot hold; the data set, partitioner and N they give."""
    if not 0.0 <= client_test_fraction < 1.0:
        raise ConfigError(f"data.client_test_fraction must be in [0, 1), got {client_test_fraction}")
    if num_clients is not None and num_clients < 1:
        raise ConfigError(f"data.num_clients must be >= 1, got {num_clients}")
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
    if num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
    dataset = dataset if dataset is not None else Digits()
    split = partitioner(partition)
    if isinstance(split, FlowerPartition):
        known = split.check(num_clients)
    else:
        known = num_clients if num_clients is not None else 16
    return DataArguments(dataset, split, known)


def partitioner(value: Union[Partitioner, dict[str, Any], None]) -> Union[Partitioner, FlowerPartition]:
    """``data.partition`` as given: one of ours, or a Flower Datasets partitioner by class path."""
    if value is None:
        return IID()
    if not isinstance(value, dict):
        return value
    if "class_path" not in value:
        raise ConfigError("data.partition needs a class_path, e.g. flwr_datasets.partitioner.DirichletPartitioner")
    class_path, init_args = str(value["class_path"]), dict(value.get("init_args") or {})
    module_name, _, name = class_path.rpartition(".")
    ours = getattr(import_module("fedpeft_pl.data"), name, None) if module_name.startswith("fedpeft_pl") else None
    if not (isinstance(ours, type) and issubclass(ours, Partitioner)):
        return FlowerPartition(class_path, init_args)
    # one of ours that jsonargparse could not build: say why in one line
    try:
        return ours(**init_args)
    except TypeError as err:
        raise ConfigError(f"data.partition {name}: {err}; fix data.partition.init_args") from None


class FederatedData:
    """The ``data`` of a :class:`~fedpeft_pl.data.datamodule.FederatedDataModule` with the same arguments, without
    Lightning and without reading any data: what ``fedpeft comm`` reads (the data set, the partitioner and N).

    Args:
        dataset: the data set; scikit-learn's digits (offline) by default.
        num_clients: N; by default 16, or all the clients a partitioner finds in the data.
        partition: how samples are split among clients.
        batch_size: local training batch size.
        eval_batch_size: batch size of the server's evaluation.
        num_workers: DataLoader worker processes.
        seed: seeds the partition and any train/test split the data set makes.
        client_test_fraction: the share of each client's partition held out as its own test split.
    """

    def __init__(
        self,
        dataset: Optional[ImageDataset] = None,
        num_clients: Optional[int] = None,
        partition: Optional[Union[Partitioner, dict[str, Any]]] = None,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        client_test_fraction: float = 0.0,
    ) -> None:
        checked = data_arguments(
            dataset, num_clients, partition, batch_size, eval_batch_size, num_workers, client_test_fraction
        )
        self.dataset = checked.dataset
        self.partition = checked.partition
        self.known_num_clients = checked.num_clients
        self.seed = seed
