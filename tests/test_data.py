import math
import re

import numpy as np
import pytest
import torch
from helpers import tiny_backbone, tiny_datamodule, tiny_module, tiny_trainer
from PIL import Image

from fedpeft_pl import ConfigError, FederatedDataModule
from fedpeft_pl.backbone import data_config
from fedpeft_pl.data import CIFAR100, Dirichlet, ImageFolder
from fedpeft_pl.peft import Head

CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}


def ready(datamodule: FederatedDataModule, config=CONFIG) -> FederatedDataModule:
    datamodule.data_config = config
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_digits_are_transformed_to_the_backbones_input():
    datamodule = ready(tiny_datamodule(num_clients=4))
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
    assert -1.0 <= images.min() < -0.9 and 0.9 < images.max() <= 1.2  # normalised with mean=std=0.5
    assert len(datamodule.splits.train) + len(datamodule.splits.test) == 1797
    assert labels.dtype == torch.long


@pytest.mark.parametrize(
    ("name", "mean"), [("vit_tiny_patch16_224", (0.5, 0.5, 0.5)), ("deit_tiny_patch16_224", (0.485, 0.456, 0.406))]
)
def test_the_data_config_comes_from_the_backbone(name, mean):
    model = tiny_backbone(name=name, img_size=48).build(10)
    config = data_config(model)
    assert config["input_size"] == (3, 48, 48)
    assert config["mean"] == mean


def test_a_client_loader_yields_exactly_that_clients_samples_in_a_seeded_order():
    datamodule = ready(tiny_datamodule(num_clients=4, batch_size=16, partition=Dirichlet(alpha=0.5)))
    sampler = datamodule._sampler

    def order(client, seed):
        datamodule.client_dataloader(client, seed)
        return [i for batch in sampler for i in batch]

    for client in range(4):
        seen = order(client, seed=1)
        assert sorted(seen) == datamodule.client_indices[client].tolist()
    assert order(2, seed=1) == order(2, seed=1)
    assert order(2, seed=1) != order(2, seed=2)
    loader = datamodule.client_dataloader(2, 1)
    assert len(loader) == datamodule.client_num_batches(2)
    assert sum(len(labels) for _, labels in loader) == datamodule.client_num_samples(2)


def test_partition_and_test_split_depend_on_the_data_seed_only():
    a = ready(tiny_datamodule(num_clients=4, seed=3, partition=Dirichlet(alpha=0.3)))
    b = ready(tiny_datamodule(num_clients=4, seed=3, partition=Dirichlet(alpha=0.3)))
    c = ready(tiny_datamodule(num_clients=4, seed=4, partition=Dirichlet(alpha=0.3)))
    assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))
    assert not all(np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices))
    assert a.label_histogram.shape == (4, 10) and a.label_histogram.sum() == len(a.splits.train)


def test_a_head_that_does_not_match_the_classes_is_a_config_error(tmp_path):
    module = tiny_module(Head())
    module.num_classes = 7
    with pytest.raises(ConfigError, match=r"model\.num_classes: 10"):
        tiny_trainer(tmp_path).fit(module, datamodule=tiny_datamodule())


def make_image_folder(root, classes=("forest", "river", "sea"), per_class=6, size=(20, 14)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "test", per_class=2)
    datamodule = ready(FederatedDataModule(ImageFolder(str(tmp_path)), num_clients=3, batch_size=4))
    assert datamodule.splits.num_classes == 3
    assert len(datamodule.splits.train) == 18 and len(datamodule.splits.test) == 6
    images, _ = next(iter(datamodule.val_dataloader()))
    assert images.shape[1:] == (3, 32, 32)


def test_image_folder_without_subfolders_is_split_stratified(tmp_path):
    make_image_folder(tmp_path, per_class=10)
    datamodule = ready(FederatedDataModule(ImageFolder(str(tmp_path), test_fraction=0.2), num_clients=2))
    assert len(datamodule.splits.test) == 6
    assert np.bincount(datamodule.splits.train_targets).tolist() == [8, 8, 8]


def test_image_folder_with_mismatched_class_folders_is_refused(tmp_path):
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "test", classes=("forest", "desert"))
    with pytest.raises(ConfigError, match="differ"):
        ready(FederatedDataModule(ImageFolder(str(tmp_path)), num_clients=2))


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_image_folder_without_images_is_a_config_error(tmp_path, layout):
    root = tmp_path / "resisc45"
    if layout == "empty":
        root.mkdir()
    with pytest.raises(ConfigError, match="resisc45"):
        ready(FederatedDataModule(ImageFolder(str(root)), num_clients=2))


def test_cifar_without_files_and_without_download_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="download: true"):
        ready(FederatedDataModule(CIFAR100(root=str(tmp_path), download=False), num_clients=2))


@pytest.mark.parametrize(
    "kwargs",
    [{"num_clients": 0}, {"batch_size": 0}, {"eval_batch_size": 0}, {"num_workers": -1}],
)
def test_invalid_data_arguments_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        FederatedDataModule(**kwargs)


def test_without_a_logger_no_histogram_file_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_trainer(tmp_path).fit(tiny_module(Head()), datamodule=tiny_datamodule())
    assert not list(tmp_path.rglob("client_label_histogram.csv"))


def test_the_shipped_digits_are_scikit_learns_and_their_split_is_scikit_learns_index_for_index():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fedpeft_pl.data.datasets import DIGITS_FILE, _stratified_split

    digits = load_digits()
    with np.load(DIGITS_FILE) as shipped:
        assert np.array_equal(shipped["images"].astype(np.float64), digits.images)
        assert np.array_equal(shipped["targets"], digits.target)
    rng = np.random.default_rng(0)
    cases = [(digits.target, fraction, seed) for fraction in (0.1, 0.2, 0.33, 0.5, 0.75) for seed in (0, 1, 7)]
    for _ in range(20):  # unbalanced classes of other sizes, where the largest-remainder ties decide
        k = int(rng.integers(2, 9))
        labels = np.concatenate([rng.integers(0, k, int(rng.integers(3 * k, 120))), np.repeat(np.arange(k), 2)])
        cases.append((labels, float(rng.uniform(0.1, 0.6)), int(rng.integers(0, 2**31))))
    compared = 0
    for targets, fraction, seed in cases:
        if min(math.ceil(fraction * len(targets)), len(targets) - math.ceil(fraction * len(targets))) < len(
            np.unique(targets)
        ):
            continue  # scikit-learn refuses those too (below)
        train, test = _stratified_split(targets, fraction, seed)
        theirs = train_test_split(np.arange(len(targets)), test_size=fraction, stratify=targets, random_state=seed)
        assert np.array_equal(train, np.sort(theirs[0])) and np.array_equal(test, np.sort(theirs[1]))
        compared += 1
    assert compared >= 30


@pytest.mark.parametrize(
    "targets, fraction, says",
    [
        (np.array([0, 0, 1, 1, 2]), 0.4, "at least 2 samples of each class"),
        (np.array([0, 0, 1, 1, 2, 2, 3, 3]), 0.2, "each split needs at least one sample a class"),
        (np.array([0, 0, 1, 1]), 1.0, "test_fraction must be in (0, 1)"),
    ],
)
def test_a_stratified_split_that_cannot_be_made_is_refused_in_one_line(targets, fraction, says):
    from fedpeft_pl.data.datasets import _stratified_split

    with pytest.raises(ConfigError, match=re.escape(says)) as caught:
        _stratified_split(targets, fraction, 0)
    assert "\n" not in str(caught.value)
