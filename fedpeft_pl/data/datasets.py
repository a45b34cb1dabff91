"""Image classification data sets, one class each; choose one with ``data.dataset.class_path``.

A data set loads a train and a test split with a given transform and reports the training
labels (for partitioning) and the number of classes. Downloads happen in :meth:`prepare`.
"""

from __future__ import annotations

import math
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler, Subset, TensorDataset
from torchvision.transforms import InterpolationMode, v2

from fedpeft_pl.component import ShownByArguments
from fedpeft_pl.errors import ConfigError

DIGITS_FILE = Path(__file__).resolve().parents[1] / "assets" / "digits.npz"

Transform = Callable[[Any], torch.Tensor]


@dataclass
class Splits:
    """A data set's training split (with its labels), its test split and its class count.

    ``columns`` holds the training split's plain columns by name, in sample order (the labels under
    ``label_column``, and any others, such as a writer's ID): what a Flower Datasets partitioner
    splits by. Without it the labels alone are the columns.
    """

    train: Dataset
    train_targets: np.ndarray
    test: Dataset
    num_classes: int
    columns: Optional[dict[str, np.ndarray]] = None
    label_column: str = "label"


# a step's stacked batches: images [m, B, ...], labels [m, B] and the mask of real rows [m, B]
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

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample, or with a sequence of indices their batch, gathered where the tensors live (what
        :func:`evaluation_loader` reads)."""
        if isinstance(index, Sequence) or (isinstance(index, torch.Tensor) and index.dim() == 1):
            rows = torch.as_tensor(index, device=self.images.device)
            return self.images.index_select(0, rows), self.labels.index_select(0, rows)
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


def evaluation_loader(
    samples: ResidentSamples, batch_size: int, batches: Optional[Sampler[list[int]]] = None
) -> DataLoader:
    """Batches of kept samples in order (or those ``batches`` yields), each one gather where the tensors live: no
    worker processes and no pinning, which tensors already transformed (and perhaps on the device) do not need."""
    if batches is None:
        batches = BatchSampler(SequentialSampler(samples), batch_size, drop_last=False)
    # batch_size=None: the loader hands each index batch to samples[...] whole (ResidentSamples.__getitem__)
    return DataLoader(samples, batch_size=None, sampler=batches, num_workers=0)


def image_transform(data_config: dict[str, Any]) -> v2.Compose:
    """PIL image or uint8 tensor -> normalised RGB float tensor at the backbone's input size.

    Resizing happens in uint8, so bicubic overshoot is clamped as in PIL.
    """
    _, height, width = data_config["input_size"]
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize((height, width), interpolation=InterpolationMode(data_config["interpolation"]), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(data_config["mean"], data_config["std"]),
        ]
    )


class ImageDataset(ShownByArguments, ABC):
    """Base class: override :meth:`load`, and :meth:`prepare` if the data must be downloaded."""

    def prepare(self) -> None:
        """Download or check the files; runs once per machine before :meth:`load`."""

    @abstractmethod
    def load(self, transform: Transform, seed: int) -> Splits:
        """Both splits with ``transform`` applied; ``seed`` fixes any split this class makes itself."""

    def columns(self, seed: int) -> tuple[dict[str, np.ndarray], str]:
        """The training split's plain columns by name (see :class:`Splits`) and the label column's name.

        What a partitioner that takes its number of clients from the data needs before set-up; by
        default read from an untransformed :meth:`load`.
        """
        splits = self.load(lambda image: image, seed)
        return splits.columns or {splits.label_column: splits.train_targets}, splits.label_column


def _stratified_split(targets: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices, stratified by ``targets``, the share ``test_fraction`` held out.

    The same split, index for index, as scikit-learn's ``train_test_split(indices, test_size=test_fraction,
    stratify=targets, random_state=seed)`` (its ``StratifiedShuffleSplit``; tests/test_data.py holds the two
    equal over seeds, fractions and class balances). Written here so that the default install needs no
    scikit-learn: it requires SciPy, and torchmetrics (which Lightning imports) imports ``scipy.signal``
    whenever SciPy is installed, about 0.6 s of CPU at every start (benchmarks/README.md, "Start-up").
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(targets)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, y_indices, class_counts = np.unique(targets, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise ConfigError(
            f"a stratified split needs at least 2 samples of each class; classes {classes[class_counts < 2].tolist()} "
            "have 1: lower test_fraction's demands or merge those classes"
        )
    if n_train < len(classes) or n_test < len(classes):
        raise ConfigError(
            f"test_fraction {test_fraction} leaves {n_train} training and {n_test} test samples for {len(classes)} "
            "classes: each split needs at least one sample a class; choose a test_fraction nearer 0.5"
        )
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i] : n_i[i] + t_i[i]])
    # scikit-learn shuffles both lists once more, which draws from the same stream; the order is sorted away,
    # the draws are kept so that nothing after them would differ either
    return np.sort(rng.permutation(train)), np.sort(rng.permutation(test))


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Samples a class of ``n_draws`` stratified draws, as scikit-learn's ``utils.extmath._approximate_mode``: each
    class's share floored, the rest given by largest remainder, ties broken by ``rng``."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add_now = min(len(tied), need_to_add)
            floored[rng.choice(tied, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _in_memory(images: torch.Tensor, targets: np.ndarray, transform: Transform) -> TensorDataset:
    """Apply ``transform`` to all images at once: for small data sets that fit in memory."""
    return TensorDataset(transform(images), torch.as_tensor(targets, dtype=torch.long))


class Digits(ImageDataset):
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped with scikit-learn: offline.

    Args:
        test_fraction: share of the images held out, stratified and seeded, as the global test split.
    """

    def __init__(self, test_fraction: float = 0.2) -> None:
        self.test_fraction = test_fraction

    def load(self, transform: Transform, seed: int) -> Splits:
        # scikit-learn's load_digits(), saved as it gives them (scripts/make_digits_asset.py): the default
        # install needs no scikit-learn (see _stratified_split)
        with np.load(DIGITS_FILE) as digits:
            grey, targets = digits["images"].astype(np.float64), digits["targets"].astype(np.int64)
        # 17 grey levels (0..16) as uint8, like every other source
        images = torch.from_numpy(grey * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
        train, test = _stratified_split(targets, self.test_fraction, seed)
        return Splits(
            train=_in_memory(images[train], targets[train], transform),
            train_targets=targets[train],
            test=_in_memory(images[test], targets[test], transform),
            num_classes=10,
        )


def _missing_folders(path: str) -> list[str]:
    """``path`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing[::-1]


class _TorchvisionDataset(ImageDataset):
    """A torchvision data set with ``train=True/False`` splits and a ``targets`` list."""

    num_classes: int
    dataset_name: str

    def __init__(self, root: str = "data", download: bool = True) -> None:
        self.root = root
        self.download = download

    def _make(self, train: bool, transform: Transform | None, download: bool) -> Any:
        raise NotImplementedError

    def prepare(self) -> None:
        if self.download:
            # folders the failed download would leave behind, empty or half-written: removed again
            made = _missing_folders(os.path.abspath(os.path.expanduser(self.root)))
            try:
                for train in (True, False):
                    self._make(train, None, download=True)
            except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError; torchvision wraps some
                for folder in made:
                    shutil.rmtree(folder, ignore_errors=True)
                raise ConfigError(
                    f"could not download {self.dataset_name} to data.dataset.root {self.root!r} ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:100] if str(err) else ''}); offline? download it on a machine with "
                    f"network (torchvision.datasets.{type(self).__name__}(root, download=True)), copy the folder it "
                    f"makes under {self.root!r}, and set data.dataset.download: false"
                ) from None

    def load(self, transform: Transform, seed: int) -> Splits:
        try:
            train = self._make(True, transform, download=False)
            test = self._make(False, transform, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise ConfigError(
                f"{self.dataset_name} not found under data.dataset.root {self.root!r}; set download: true "
                "or point root at a copy"
            ) from err
        return Splits(train, np.asarray(train.targets, dtype=np.int64), test, self.num_classes)


class CIFAR10(_TorchvisionDataset):
    """CIFAR-10 via torchvision (downloaded to ``root`` when ``download`` is true)."""

    num_classes = 10
    dataset_name = "CIFAR-10"

    def _make(self, train: bool, transform: Transform | None, download: bool) -> Any:
        from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

        return TorchvisionCIFAR10(self.root, train=train, transform=transform, download=download)


class CIFAR100(_TorchvisionDataset):
    """CIFAR-100 via torchvision (downloaded to ``root`` when ``download`` is true)."""

    num_classes = 100
    dataset_name = "CIFAR-100"

    def _make(self, train: bool, transform: Transform | None, download: bool) -> Any:
        from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100

        return TorchvisionCIFAR100(self.root, train=train, transform=transform, download=download)


class PCAM(ImageDataset):
    """PatchCamelyon (96x96 histopathology patches, 2 classes) via torchvision; needs ``h5py``.

    Args:
        root: where the ``pcam`` folder lives or is downloaded to.
        download: fetch it with torchvision (which also needs ``gdown``).
    """

    num_classes = 2

    def __init__(self, root: str = "data", download: bool = True) -> None:
        self.root = root
        self.download = download

    def _make(self, split: str, transform: Transform | None, download: bool) -> Any:
        try:
            from torchvision.datasets import PCAM as TorchvisionPCAM

            return TorchvisionPCAM(self.root, split=split, transform=transform, download=download)
        except (ImportError, RuntimeError) as err:
            if isinstance(err, ImportError) or "h5py" in str(err) or "gdown" in str(err):
                raise ConfigError("PCam needs h5py (and gdown to download): pip install h5py gdown") from err
            raise ConfigError(
                f"PCam not found under data.dataset.root {self.root!r}; set download: true or point root at a copy"
            ) from err

    def prepare(self) -> None:
        if self.download:
            for split in ("train", "test"):
                self._make(split, None, download=True)

    def load(self, transform: Transform, seed: int) -> Splits:
        import h5py

        train = self._make("train", transform, download=False)
        test = self._make("test", transform, download=False)
        # torchvision's PCAM keeps labels in a separate HDF5 file; read them without decoding images
        labels_file = train._base_folder / train._FILES["train"]["targets"][0]
        with h5py.File(labels_file) as handle:
            targets = np.asarray(handle["y"][:, 0, 0, 0], dtype=np.int64)
        return Splits(train, targets, test, self.num_classes)


def _verify_images(files: list[str], root: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def problem(file: str) -> str | None:
        try:
            with Image.open(file) as image:
                image.verify()
        except Exception as err:  # PIL raises many types for damaged files
            return f"{file} ({type(err).__name__})"
        return None

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        bad = [p for p in pool.map(problem, files) if p is not None]
    if bad:
        raise ConfigError(
            f"{len(bad)} unreadable image(s) under {root!r}, e.g. {bad[0]}; remove or replace them "
            "(or set data.dataset.verify: false to let clients that meet them fail their round)"
        )


class ImageFolder(ImageDataset):
    """Any tree of ``class_name/image`` files, e.g. Resisc45 or EuroSAT.

    If ``root`` holds ``train_dir`` and ``test_dir`` subfolders they are the splits; otherwise
    ``root`` itself is split, stratified and seeded, with ``test_fraction`` held out.

    Args:
        root: the data set's folder.
        train_dir: name of the training subfolder, if the data set comes pre-split.
        test_dir: name of the test subfolder, if the data set comes pre-split.
        test_fraction: share held out when there are no such subfolders.
        verify: open every image once at setup (in parallel) and refuse the data set if any is
            unreadable. With ``false``, a client that meets such a file fails its round instead.
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        test_dir: str = "test",
        test_fraction: float = 0.2,
        verify: bool = True,
    ) -> None:
        self.root = root
        self.train_dir = train_dir
        self.test_dir = test_dir
        self.test_fraction = test_fraction
        self.verify = verify

    def prepare(self) -> None:
        if not os.path.isdir(self.root):
            raise ConfigError(f"data.dataset.root {self.root!r} is not a directory; point it at the image folder")

    def _folder(self, path: str, transform: Transform) -> Any:
        from torchvision.datasets import ImageFolder as TorchvisionImageFolder

        try:
            folder = TorchvisionImageFolder(path, transform=transform)
        except FileNotFoundError as err:
            raise ConfigError(
                f"no class folders with images under {path!r}; ImageFolder expects {path}/<class>/<image>"
            ) from err
        if self.verify:
            _verify_images([file for file, _ in folder.samples], path)
        return folder

    def load(self, transform: Transform, seed: int) -> Splits:
        self.prepare()
        train_path = os.path.join(self.root, self.train_dir)
        test_path = os.path.join(self.root, self.test_dir)
        if os.path.isdir(train_path) and os.path.isdir(test_path):
            train, test = self._folder(train_path, transform), self._folder(test_path, transform)
            if train.classes != test.classes:
                raise ConfigError(
                    f"the class folders of {train_path!r} and {test_path!r} differ; give both the same classes"
                )
            return Splits(train, np.asarray(train.targets, dtype=np.int64), test, len(train.classes))
        full = self._folder(self.root, transform)
        targets = np.asarray(full.targets, dtype=np.int64)
        train_idx, test_idx = _stratified_split(targets, self.test_fraction, seed)
        return Splits(
            Subset(full, train_idx.tolist()), targets[train_idx], Subset(full, test_idx.tolist()), len(full.classes)
        )
