"""Data sets, partitioners and the FederatedDataModule.

The data sets and partitioners need no Lightning; ``FederatedDataModule`` and ``ClientBatchSampler``
(``datamodule.py``) are imported on first use, so that naming a data set imports no Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpeft_pl.data.datasets import CIFAR10, CIFAR100, PCAM, Digits, ImageDataset, ImageFolder, Splits, image_transform
from fedpeft_pl.data.flower import FlowerPartition
from fedpeft_pl.data.hub import HuggingFace
from fedpeft_pl.data.partition import IID, Dirichlet, Partitioner, Shards, label_histogram

if TYPE_CHECKING:
    from fedpeft_pl.data.datamodule import ClientBatchSampler, FederatedDataModule

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "IID",
    "PCAM",
    "ClientBatchSampler",
    "Digits",
    "Dirichlet",
    "FederatedDataModule",
    "FlowerPartition",
    "HuggingFace",
    "ImageDataset",
    "ImageFolder",
    "Partitioner",
    "Shards",
    "Splits",
    "image_transform",
    "label_histogram",
]


def __getattr__(name: str) -> Any:
    if name in ("ClientBatchSampler", "FederatedDataModule"):
        from fedpeft_pl.data import datamodule

        value = getattr(datamodule, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
