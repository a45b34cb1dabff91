"""Data sets, partitioners and the FederatedDataModule."""

from fedpeft_pl.data.datamodule import ClientBatchSampler, FederatedDataModule
from fedpeft_pl.data.datasets import CIFAR10, CIFAR100, PCAM, Digits, ImageDataset, ImageFolder, Splits, image_transform
from fedpeft_pl.data.flower import FlowerPartition
from fedpeft_pl.data.hub import HuggingFace
from fedpeft_pl.data.partition import IID, Dirichlet, Partitioner, Shards, label_histogram

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
