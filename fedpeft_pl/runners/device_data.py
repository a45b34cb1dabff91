"""A run's training samples transformed once and kept as tensors, so a local step gathers rows.

The vectorised engine (:mod:`fedpeft_pl.runners.vectorized`) stacks, at every local step, one
batch of each of a round's clients: images ``[m, B, ...]``, labels ``[m, B]`` and a mask of the
real (unpadded) rows. Running each sample's transforms on the host for every step costs more than
the engine's own work on a GPU. Where the training transforms are deterministic (the feature
cache's test, :func:`~fedpeft_pl.runners.feature_cache.random_transform`), a sample's tensor is
the same at every step, so :class:`DeviceData` transforms every sample once per run and keeps the
result:

- on the training device, where it takes at most ``trainer.device_data_max_gib``;
- otherwise in host memory (pinned where CUDA is available, so the copy to the device runs
  asynchronously), where it takes at most half of the memory the host has available;
- otherwise, and with random transforms (augmentation), nowhere: each step's samples are
  transformed in the data module's DataLoader workers (``data.num_workers``), which prepare the
  next steps while the device trains on this one.

The size is computed from one transformed sample times the number of samples before anything is
materialised, so the bound holds for data sets of any size. The gathered batches are bit-identical
to what the transforms produce (``tests/test_device_data.py``).

How an engine uses it::

    data = DeviceData(max_gib=4.0)                      # one per run: it keeps the samples across rounds
    datamodule = data.serving(datamodule, device)        # training split: the resident samples, where kept
    steps = step_batches(datamodule.splits.train, plans, device, num_workers=datamodule.num_workers, seed=seed)
    for step in range(num_steps):                         # plans[k]: client k's index batches, in order
        images, labels, mask = next(steps)                # the batches of the clients with a step left
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.runners.feature_cache import random_transform

__all__ = ["DeviceData", "ResidentSamples", "pad_batches", "step_batches"]

log = logging.getLogger(__name__)

Stacked = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def pad_batches(batches: Sequence[Sequence[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Index batches padded to the longest, and the mask of their real rows (``[m, width]``).

    Padding repeats a real sample (never a made-up one), so padded rows run through the model
    like real data; the mask zeroes their loss and gradient. An empty batch (Poisson sampling) is
    padded with another batch's first sample.
    """
    width = max(1, max((len(b) for b in batches), default=0))
    probe = next((b[0] for b in batches if b), 0)
    padded = [list(b) + [b[0] if b else probe] * (width - len(b)) for b in batches]
    mask = torch.zeros(len(batches), width)
    for k, batch in enumerate(batches):
        mask[k, : len(batch)] = 1.0
    return padded, mask


class ResidentSamples(Dataset):
    """Transformed samples as two tensors, ``images [n, ...]`` and ``labels [n]``, on one device.

    A data set like any other (``samples[i]`` is ``(image, label)``), and :meth:`gather` stacks a
    step's batches with one indexing operation where the tensors live.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def gather(self, batches: Sequence[Sequence[int]], device: torch.device) -> Stacked:
        """Images ``[m, B, ...]``, labels ``[m, B]`` and the mask, on ``device``, padded as :func:`pad_batches`."""
        padded, mask = pad_batches(batches)
        shape = (len(padded), len(padded[0]))
        index = torch.as_tensor(padded, device=self.images.device).flatten()
        if self.images.device.type == "cpu" and device.type == "cuda" and torch.cuda.is_available():
            # gathered straight into pinned memory, so the copy to the device does not block the host
            images = torch.empty((len(index), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
            torch.index_select(self.images, 0, index, out=images)
        else:
            images = self.images.index_select(0, index)
        labels = self.labels.index_select(0, index)
        return (
            images.view(*shape, *images.shape[1:]).to(device, non_blocking=True),
            labels.view(shape).to(device, non_blocking=True),
            mask.to(device),
        )


class DeviceData:
    """``trainer.device_data_max_gib``: where a run keeps its transformed training samples, and why.

    One per run; :meth:`serving` materialises the data module's training split the first
    time it serves (and again only if the split changes, e.g. to cached features) and logs one
    line saying where the samples live and why.

    Args:
        max_gib: the most memory the transformed samples may take on the training device (on a CPU
            the device is the host); 0 keeps them off the device.
    """

    def __init__(self, max_gib: float = 4.0) -> None:
        if not max_gib >= 0:
            raise ConfigError(f"trainer.device_data_max_gib must be >= 0, got {max_gib}")
        self.max_gib = max_gib
        self.note: Optional[str] = None  # the line the console was told, for this run
        self._source: Optional[Dataset] = None
        self._device: Optional[torch.device] = None
        self._samples: Optional[Dataset] = None

    def serving(self, datamodule: Any, device: torch.device) -> Any:
        """``datamodule``, or a shallow copy of it whose training split is the :class:`ResidentSamples` (same
        indices, same batches) where the samples may be kept."""
        source = datamodule.splits.train
        if source is not self._source or device != self._device:
            self._source, self._device = source, device
            self._samples = self.materialise(
                source, device, num_workers=getattr(datamodule, "num_workers", 0), batch_size=datamodule.eval_batch_size
            )
        if self._samples is source:
            return datamodule
        served = copy.copy(datamodule)
        served.splits = copy.copy(datamodule.splits)
        served.splits.train = self._samples
        return served

    def materialise(
        self, dataset: Dataset, device: torch.device, num_workers: int = 0, batch_size: int = 256
    ) -> Dataset:
        """``dataset``'s samples transformed once, where :meth:`placement` says; ``dataset`` itself where it says
        nowhere. Logs the one line in :attr:`note`."""
        where, why = self.placement(dataset, device)
        self.note = f"training data: {why}"
        log.info(self.note)
        if where is None:
            return dataset
        return _transform_all(
            dataset,
            where,
            pin=where.type == "cpu" and torch.cuda.is_available(),
            num_workers=num_workers,
            batch_size=batch_size,
        )

    def placement(self, dataset: Any, device: torch.device) -> tuple[Optional[torch.device], str]:
        """Where ``dataset``'s transformed samples are kept (None: transformed at every step), and why, in words."""
        count = len(dataset)
        random = random_transform(dataset) if count else None
        if random is not None:
            return None, f"the transforms are random ({random}); {_per_step(device)}"
        size = count * _sample_bytes(dataset)
        amount = f"{count:,} samples transformed once ({_gib(size)})"
        bound = f"trainer.device_data_max_gib ({self.max_gib:g})"
        if size <= self.max_gib * 2**30:
            return device, f"{amount} are kept on {device} (at most {bound}); each step gathers its rows there"
        over = f"{count:,} transformed samples would take {_gib(size)}, over {bound}"
        if device.type == "cpu":
            return None, f"{over}; {_per_step(device)} (raise the bound where memory allows)"
        available = _host_memory_available()
        if available is not None and size <= available / 2:
            pinned = "pinned " if torch.cuda.is_available() else ""
            return torch.device("cpu"), (
                f"{over}; they are kept in {pinned}host memory and each step copies its rows to {device} (raise the "
                "bound where the device has room)"
            )
        return None, f"{over} and half the host's available memory; {_per_step(device)}"


def _gib(size: int) -> str:
    return f"{size / 2**30:,.2f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


def _per_step(device: torch.device) -> str:
    return f"each step transforms its samples in DataLoader workers (data.num_workers) and copies them to {device}"


def _sample_bytes(dataset: Any) -> int:
    """The memory one transformed sample and its label take (read from tensors, or by reading sample 0)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return sum(t[0].numel() * t.element_size() for t in tensors[:2])
    image, label = dataset[0][:2]
    return (
        torch.as_tensor(image).numel() * torch.as_tensor(image).element_size() + torch.as_tensor(label).element_size()
    )


def _host_memory_available() -> Optional[int]:
    """Bytes of host memory available now; None where the operating system does not say (not POSIX)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _transform_all(dataset: Any, device: torch.device, pin: bool, num_workers: int, batch_size: int) -> ResidentSamples:
    """Every sample of ``dataset`` transformed, in index order, written into tensors allocated once on ``device``."""
    if isinstance(dataset, TensorDataset) and not pin:
        return ResidentSamples(dataset.tensors[0].to(device), dataset.tensors[1].to(device))
    filled: list[torch.Tensor] = []  # images, labels: allocated at the first batch, when their shapes are known
    at = 0
    # a private generator: the loader's base seed must not consume the global random stream
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    for batch in loader:
        parts = [torch.as_tensor(batch[0]), torch.as_tensor(batch[1])]
        if not filled:
            filled = [
                torch.empty((len(dataset), *t.shape[1:]), dtype=t.dtype, device=device, pin_memory=pin) for t in parts
            ]
        for target, part in zip(filled, parts):
            target[at : at + len(part)].copy_(part)
        at += len(parts[0])
    if not filled:
        raise ConfigError("the training split is empty; check data.dataset")
    return ResidentSamples(filled[0], filled[1])


def step_batches(
    dataset: Dataset,
    plans: Sequence[Sequence[Sequence[int]]],
    device: torch.device,
    num_workers: int = 0,
    seed: int = 0,
) -> Iterator[Stacked]:
    """Each step's stacked batches: step ``t`` holds ``plans[k][t]`` of every client ``k`` with a ``t``-th batch.

    ``dataset`` as :class:`ResidentSamples`: one gather per step. Any other data set: its samples are
    read (transformed) by a DataLoader, in ``num_workers`` worker processes that prepare the next
    steps while the device trains (pinned when CUDA is available); with 0 workers they are read in this
    process when the step asks, as a plain loop would. ``seed`` seeds the workers' random streams.
    """
    steps = [[p[t] for p in plans if t < len(p)] for t in range(max((len(p) for p in plans), default=0))]
    if isinstance(dataset, ResidentSamples):
        return (dataset.gather(batches, device) for batches in steps)
    return _loaded_steps(dataset, steps, device, num_workers, seed)


class _FlatSteps(Sampler[list[int]]):
    def __init__(self, padded: list[list[list[int]]]) -> None:
        self.padded = padded

    def __iter__(self) -> Iterator[list[int]]:
        return ([i for batch in step for i in batch] for step in self.padded)

    def __len__(self) -> int:
        return len(self.padded)


def _loaded_steps(
    dataset: Dataset, steps: list[list[Sequence[int]]], device: torch.device, num_workers: int, seed: int
) -> Iterator[Stacked]:
    padded_masks = [pad_batches(batches) for batches in steps]
    loader = DataLoader(
        dataset,
        batch_sampler=_FlatSteps([p for p, _ in padded_masks]),
        collate_fn=_collate_pair,
        num_workers=num_workers,
        pin_memory=device.type == "cuda" and torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )
    for (padded, mask), (images, labels) in zip(padded_masks, loader):
        shape = (len(padded), len(padded[0]))
        yield (
            images.view(*shape, *images.shape[1:]).to(device, non_blocking=True),
            labels.view(shape).to(device, non_blocking=True),
            mask.to(device),
        )


def _collate_pair(samples: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = default_collate(samples)[:2]
    return images, labels
