"""Hugging Face image data sets as a source: any hub data set by name, or a local copy, read from disk.

Needs the ``datasets`` extra (``pip install "fedpeft-pl[datasets]"``, which brings Hugging Face
``datasets`` and Flower Datasets). A data set is Arrow on disk, memory-mapped: nothing is decoded
when it loads, and each image is decoded when the DataLoader asks for it, so a data set larger than
memory trains as one that fits.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
from torch.utils.data import Dataset

from fedpeft_pl.data.datasets import ImageDataset, Splits, Transform, _stratified_split
from fedpeft_pl.errors import ConfigError

# the datasets extra: one sentence for every place that needs it
INSTALL = 'pip install "fedpeft-pl[datasets]"'


def import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"Hugging Face data sets and Flower partitioners need the datasets extra: {INSTALL}"
        ) from None
    return datasets


class ArrowImages(Dataset):
    """``(transform(image), label)`` from one column of a memory-mapped ``datasets.Dataset``, one row at a time.

    Only the image column is read, and only the asked row is decoded: nothing is loaded up front.
    """

    def __init__(self, table: Any, image_column: str, targets: np.ndarray, transform: Optional[Transform]) -> None:
        self.table = table.select_columns([image_column])
        self.image_column = image_column
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.table[int(index)][self.image_column]
        return (self.transform(image) if self.transform is not None else image), int(self.targets[index])


class HuggingFace(ImageDataset):
    """An image classification data set of the Hugging Face hub, or a local copy of one, via ``datasets``.

    ``path`` is a hub id (``timm/resisc45``) or a local folder: one that ``datasets`` loads (a hub
    repository downloaded with ``hf download --repo-type dataset <id> --local-dir <folder>``, parquet
    files, or an image folder ``<class>/<image>`` with an optional ``metadata.csv`` of further
    columns), or one written by ``save_to_disk``. Downloads go to the Hugging Face cache (or
    ``cache_dir``); with ``HF_HUB_OFFLINE=1`` a data set already there loads without network.

    Args:
        path: hub id or local folder.
        subset: the data set's configuration name, where it has several.
        train_split: the split the clients hold.
        test_split: the server's test split; ``null`` holds out a stratified, seeded ``test_fraction``
            of ``train_split`` instead (for data sets with a training split only, such as FEMNIST).
        image_column: the column of images; found by its ``Image`` type when not given.
        label_column: the column of labels; found by its ``ClassLabel`` type (or the name ``label``)
            when not given. Integer or string labels; strings are numbered in sorted order.
        test_fraction: the share held out when ``test_split`` is ``null``.
        cache_dir: where ``datasets`` keeps downloads; its default cache when not given.

    Example::

        HuggingFace("uoft-cs/cifar100", label_column="fine_label")
    """

    def __init__(
        self,
        path: str,
        subset: Optional[str] = None,
        train_split: str = "train",
        test_split: Optional[str] = "test",
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        test_fraction: float = 0.2,
        cache_dir: Optional[str] = None,
    ) -> None:
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"data.dataset.test_fraction must be in (0, 1), got {test_fraction}")
        self.path = path
        self.subset = subset
        self.train_split = train_split
        self.test_split = test_split
        self.image_column = image_column
        self.label_column = label_column
        self.test_fraction = test_fraction
        self.cache_dir = cache_dir
        self._opened: Optional[dict[str, Any]] = None

    def prepare(self) -> None:
        self._open()

    def _open(self) -> dict[str, Any]:
        """The data set's splits, loaded (and downloaded where needed) once."""
        if self._opened is not None:
            return self._opened
        datasets = import_datasets()
        local = os.path.expanduser(self.path)
        if not os.path.isdir(local):
            _offline_unless_reachable(datasets)
        # a local copy is read, not downloaded: datasets' "Downloading data" bars would say otherwise
        quiet = os.path.isdir(local) and not datasets.are_progress_bars_disabled()
        if quiet:
            datasets.disable_progress_bars()
        try:
            if os.path.isfile(os.path.join(local, "dataset_dict.json")):
                opened = datasets.load_from_disk(local)
            else:
                opened = datasets.load_dataset(
                    local if os.path.isdir(local) else self.path, self.subset, cache_dir=self.cache_dir
                )
        except Exception as err:  # hub, file system, builder and format errors all mean the same to a user
            reason = str(err).splitlines()[0][:160] if str(err) else ""
            raise ConfigError(
                f"could not load the data set {self.path!r} ({type(err).__name__}: {reason}); offline? download it "
                f"on a machine with network (hf download --repo-type dataset {self.path} --local-dir <folder>) and "
                "set data.dataset.path to that folder"
            ) from None
        finally:
            if quiet:
                datasets.enable_progress_bars()
        splits = dict(opened) if isinstance(opened, dict) else {self.train_split: opened}
        for split in (self.train_split, self.test_split):
            if split is not None and split not in splits:
                raise ConfigError(
                    f"{self.path!r} has no split {split!r} (its splits: {', '.join(sorted(splits))}); set "
                    "data.dataset.train_split and test_split to two of them, or test_split: null to hold out "
                    "test_fraction of the training split"
                )
        self._opened = splits
        return splits

    def _columns(self, table: Any) -> tuple[str, str]:
        datasets = import_datasets()
        features = table.features
        names = ", ".join(features)
        for given, key in ((self.image_column, "image_column"), (self.label_column, "label_column")):
            if given is not None and given not in features:
                raise ConfigError(
                    f"data.dataset.{key} {given!r} is not a column of {self.path!r} (its columns: {names}); "
                    "name one of them"
                )
        image = self.image_column or _only(
            [c for c, f in features.items() if isinstance(f, datasets.Image)], "image", self.path, names
        )
        label = self.label_column or _only(
            [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
            or [c for c in ("label", "labels") if c in features],
            "label",
            self.path,
            names,
        )
        return image, label

    def tables(self, seed: int) -> tuple[Any, Any, str, str]:
        """The training and test splits as ``datasets.Dataset`` tables, and the image and label columns."""
        splits = self._open()
        train = splits[self.train_split]
        image, label = self._columns(train)
        if self.test_split is not None:
            return train, splits[self.test_split], image, label
        train_idx, test_idx = _stratified_split(_column(train, label), self.test_fraction, seed)
        # select keeps the rows on disk: an index mapping, not a copy
        return train.select(train_idx), train.select(test_idx), image, label

    def columns(self, seed: int) -> tuple[dict[str, np.ndarray], str]:
        """The training split's plain columns (labels as class numbers, client IDs, ...) and the label column."""
        train, test, image, label = self.tables(seed)
        targets, _, _ = self._targets(train, test, label)
        return _plain_columns(train, image, label, targets), label

    def _targets(self, train: Any, test: Any, label: str) -> tuple[np.ndarray, np.ndarray, int]:
        datasets = import_datasets()
        feature = train.features[label]
        train_labels, test_labels = _column(train, label), _column(test, label)
        if isinstance(feature, datasets.ClassLabel):
            return train_labels.astype(np.int64), test_labels.astype(np.int64), int(feature.num_classes)
        if train_labels.dtype.kind in "iu":
            count = int(max(train_labels.max(initial=0), test_labels.max(initial=0))) + 1
            return train_labels.astype(np.int64), test_labels.astype(np.int64), count
        classes = np.unique(train_labels)
        unknown = np.setdiff1d(test_labels, classes)
        if len(unknown):
            raise ConfigError(
                f"the test split of {self.path!r} has labels the training split lacks ({unknown[0]!r}, ...); "
                "choose splits with the same classes"
            )
        return np.searchsorted(classes, train_labels), np.searchsorted(classes, test_labels), len(classes)

    def load(self, transform: Transform, seed: int) -> Splits:
        train, test, image, label = self.tables(seed)
        train_targets, test_targets, num_classes = self._targets(train, test, label)
        return Splits(
            train=ArrowImages(train, image, train_targets, transform),
            train_targets=train_targets,
            test=ArrowImages(test, image, test_targets, transform),
            num_classes=num_classes,
            columns=_plain_columns(train, image, label, train_targets),
            label_column=label,
        )


def _offline_unless_reachable(datasets: Any) -> None:
    """Without network, fail at once (or load from the cache) instead of after two minutes of retries."""
    from huggingface_hub import constants

    from fedpeft_pl.backbone import _check_hub_reachable

    _check_hub_reachable()
    if constants.HF_HUB_OFFLINE:
        datasets.config.HF_HUB_OFFLINE = True  # datasets keeps its own copy, read at its import


def _only(candidates: list[str], kind: str, path: str, names: str) -> str:
    if len(candidates) != 1:
        found = f"several ({', '.join(candidates)})" if candidates else "none"
        raise ConfigError(
            f"cannot tell the {kind} column of {path!r}: {found} among its columns {names}; set "
            f"data.dataset.{kind}_column"
        )
    return candidates[0]


def _column(table: Any, name: str) -> np.ndarray:
    """One column as a NumPy array, read without the others (no image is decoded)."""
    return np.asarray(table.select_columns([name]).with_format("numpy")[name])


def _plain_columns(table: Any, image: str, label: str, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Every scalar column but the image, for partitioners that split by one (a writer's ID); labels as numbers."""
    datasets = import_datasets()
    scalar = (datasets.Value, datasets.ClassLabel)
    names = [c for c, f in table.features.items() if c not in (image, label) and isinstance(f, scalar)]
    return {label: targets, **{c: _column(table, c) for c in names}}
