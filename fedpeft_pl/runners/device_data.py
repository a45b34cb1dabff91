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

from fedpeft_pl.data.datasets import ResidentSamples, Stacked, pad_batches
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.runners.feature_cache import random_transform

__all__ = ["DeviceData", "ResidentSamples", "pad_batches", "step_batches"]

log = logging.getLogger(__name__)


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
        self.evaluation_note: Optional[str] = None  # likewise for the server's test split
        self._source: Optional[Dataset] = None
        self._device: Optional[torch.device] = None
        self._samples: Optional[Dataset] = None
        self._probed: list[tuple[Any, tuple[Optional[str], int]]] = []  # the last two data sets probed

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
        return _kept(dataset, where, num_workers, batch_size)

    def planned_bytes(self, dataset: Dataset, device: torch.device) -> int:
        """The bytes :meth:`materialise` would keep of ``dataset`` on ``device`` (0 where it keeps them elsewhere)."""
        where, _, size = self._placement(dataset, device)
        return size if where == device else 0

    def evaluation(
        self,
        dataset: Dataset,
        device: torch.device,
        reserved: int = 0,
        num_workers: int = 0,
        batch_size: int = 256,
    ) -> Dataset:
        """The server's test split transformed once, where it fits beside ``reserved`` bytes already promised on
        ``device`` (the training samples): every round's evaluation then reads tensors instead of running the
        transforms again. ``dataset`` itself where it does not fit. Logs the one line in :attr:`evaluation_note`.
        """
        where, why = self.placement(dataset, device, reserved, kind="test")
        self.evaluation_note = f"evaluation data: {why}"
        log.info(self.evaluation_note)
        # never pinned: evaluation gathers each batch into ordinary memory, which Lightning copies to the device
        return _kept(dataset, where, num_workers, batch_size, pin=False)

    def placement(
        self, dataset: Any, device: torch.device, reserved: int = 0, kind: str = "train"
    ) -> tuple[Optional[torch.device], str]:
        """Where ``dataset``'s transformed samples are kept (None: transformed at every use), and why, in words.

        ``reserved``: bytes of the bound already promised on ``device``; ``kind``: ``"train"`` (read at every
        step) or ``"test"`` (read at every evaluation)."""
        where, why, _ = self._placement(dataset, device, reserved, kind)
        return where, why

    def _placement(
        self, dataset: Any, device: torch.device, reserved: int = 0, kind: str = "train"
    ) -> tuple[Optional[torch.device], str, int]:
        """:meth:`placement`, and the bytes the transformed samples take (0 with random transforms)."""
        count = len(dataset)
        every = "step" if kind == "train" else "evaluation"
        random, sample = self._probe(dataset)
        if random is not None:
            return None, f"the transforms are random ({random}); {_per_use(device, every)}", 0
        size = count * sample
        amount = f"{count:,} samples transformed once ({_gib(size)})"
        beside = f" beside {_gib(reserved)} of training samples" if reserved else ""
        bound = f"trainer.device_data_max_gib ({self.max_gib:g})"
        if size + reserved <= self.max_gib * 2**30:
            kept = f"{amount} are kept on {device} (at most {bound}{beside})"
            return device, f"{kept}; each {every} gathers its rows there", size
        over = f"{count:,} transformed samples would take {_gib(size)}{beside}, over {bound}"
        if device.type == "cpu":
            return None, f"{over}; {_per_use(device, every)} (raise the bound where memory allows)", size
        available = _host_memory_available()
        if available is not None and size <= available / 2:
            pinned = "pinned " if torch.cuda.is_available() and kind == "train" else ""  # evaluation: never pinned
            host = f"{over}; they are kept in {pinned}host memory and each {every} copies its rows to {device}"
            return torch.device("cpu"), f"{host} (raise the bound where the device has room)", size
        return None, f"{over} and half the host's available memory; {_per_use(device, every)}", size

    def _probe(self, dataset: Any) -> tuple[Optional[str], int]:
        """A random transform of ``dataset`` (or None) and one sample's bytes; the samples read for them are read
        once per data set (the evaluation split's placement and the training split's probe the same one)."""
        for seen, result in self._probed:
            if seen is dataset:
                return result
        random = random_transform(dataset) if len(dataset) else None
        result = (random, 0 if random is not None else _sample_bytes(dataset))
        self._probed = [*self._probed[-1:], (dataset, result)]
        return result


def _kept(
    dataset: Dataset, where: Optional[torch.device], num_workers: int, batch_size: int, pin: bool = True
) -> Dataset:
    if where is None:
        return dataset
    pin = pin and where.type == "cpu" and torch.cuda.is_available()
    return _transform_all(dataset, where, pin=pin, num_workers=num_workers, batch_size=batch_size)


def _gib(size: int) -> str:
    return f"{size / 2**30:,.2f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


def _per_use(device: torch.device, every: str = "step") -> str:
    return f"each {every} transforms its samples in DataLoader workers (data.num_workers) and copies them to {device}"


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
        raise ConfigError("a split of the data set is empty; check data.dataset")
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
