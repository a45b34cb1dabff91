"""Training samples transformed once per run (runners/device_data.py): the same bits, or off with a reason."""

import logging

import numpy as np
import pytest
import torch
from helpers import sgd, tiny_backbone, tiny_trainer
from torch.utils.data import Dataset, TensorDataset, default_collate
from torchvision.transforms import v2

from fedpeft_pl import ConfigError, FederatedDataModule, FedPEFTModule
from fedpeft_pl.data import Digits
from fedpeft_pl.data.datasets import Splits, image_transform
from fedpeft_pl.peft import Prompt, trainable_state
from fedpeft_pl.runners.device_data import DeviceData, ResidentSamples, step_batches

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}


class Lazy(Dataset):
    """uint8 images transformed at every read, as torchvision's and folder data sets do; counts its reads."""

    def __init__(self, images, targets, transform):
        self.images, self.targets, self.transform = images, targets, transform
        self.reads = 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        self.reads += 1
        return self.transform(self.images[index]), int(self.targets[index])


def lazy_digits(count=60, transform=None):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 1, 8, 8), dtype=torch.uint8, generator=generator)
    return Lazy(images, np.arange(count) % 10, transform or image_transform(CONFIG))


# unequal clients: a short batch, an empty (Poisson) batch, a client with fewer steps
PLANS = [[[3, 1, 4], [15, 9]], [[2, 6, 5, 35]], [[], [8, 9, 7, 59]]]


def transformed(dataset, batches):
    """What the transforms give for the padded batches, read one sample at a time (the reference)."""
    width = max(1, max(len(b) for b in batches))
    probe = next(b[0] for b in batches if b)
    rows = [default_collate([dataset[i] for i in list(b) + [b[0] if b else probe] * (width - len(b))]) for b in batches]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def test_gathered_batches_are_bit_identical_to_the_transforms_output(caplog):
    dataset = lazy_digits()
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        samples = DeviceData(max_gib=1.0).materialise(dataset, torch.device("cpu"))
    assert isinstance(samples, ResidentSamples) and samples.images.dtype == torch.float32
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("training data: 60 samples transformed once") and "kept on cpu" in line, line
    for source in (samples, dataset):  # gathered rows, and the loader that transforms at every step
        steps = list(step_batches(source, PLANS, torch.device("cpu")))
        assert len(steps) == 2
        for step, (images, labels, mask) in enumerate(steps):
            batches = [p[step] for p in PLANS if step < len(p)]
            expected_images, expected_labels = transformed(dataset, batches)
            assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
            assert mask.tolist() == [[1.0] * len(b) + [0.0] * (images.shape[1] - len(b)) for b in batches]


def test_workers_transform_the_same_samples_as_this_process():
    dataset = lazy_digits()
    here = list(step_batches(dataset, PLANS[:2], torch.device("cpu")))
    there = list(step_batches(dataset, PLANS[:2], torch.device("cpu"), num_workers=2))
    for a, b in zip(here, there, strict=True):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_a_bound_smaller_than_the_data_falls_back_and_says_so_before_transforming_anything(caplog, monkeypatch):
    dataset = lazy_digits()
    size = len(dataset) * (3 * 32 * 32 * 4 + 8)
    data = DeviceData(max_gib=size / 2 / 2**30)
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        served = data.materialise(dataset, torch.device("cpu"))
    assert served is dataset  # nothing kept: every step transforms its samples
    assert dataset.reads <= 4  # the random-transform check and one sample's size; no sample set materialised
    (line,) = [r.getMessage() for r in caplog.records]
    assert "60 transformed samples would take 0.7 MiB, over trainer.device_data_max_gib" in line, line
    assert "DataLoader workers" in line
    # on an accelerator the samples stay in host memory instead, when the host has room
    where, why = data.placement(dataset, torch.device("cuda", 0))
    assert where == torch.device("cpu") and "host memory" in why and "cuda:0" in why, why
    assert DeviceData(max_gib=1.0).placement(dataset, torch.device("cuda", 0))[0] == torch.device("cuda", 0)
    # with CUDA, training samples kept in host memory are pinned, a kept test split never is (and says so)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "kept in pinned host memory and each step" in data.placement(dataset, torch.device("cuda", 0))[1]
    test_why = data.placement(dataset, torch.device("cuda", 0), kind="test")[1]
    assert "kept in host memory and each evaluation copies its rows to cuda:0" in test_why, test_why


def test_random_transforms_are_never_kept():
    dataset = lazy_digits(transform=v2.Compose([image_transform(CONFIG), v2.RandomHorizontalFlip()]))
    data = DeviceData()
    assert data.materialise(dataset, torch.device("cpu")) is dataset
    assert data.note.startswith("training data: the transforms are random (RandomHorizontalFlip)")


def test_a_negative_bound_is_a_config_error():
    with pytest.raises(ConfigError, match="device_data_max_gib must be >= 0"):
        DeviceData(max_gib=-1)


class LazyDigits(Digits):
    def load(self, transform, seed):
        splits = super().load(v2.Identity(), seed)
        images, targets = splits.train.tensors
        test = TensorDataset(transform(splits.test.tensors[0]), splits.test.tensors[1])
        return Splits(Lazy(images, targets.numpy(), transform), splits.train_targets, test, 10)


@pytest.mark.slow  # two runs: about 15 s on 2 idle cores
def test_a_vectorised_run_on_kept_samples_ends_where_one_that_transforms_every_step_does(tmp_path, caplog):
    states, notes = [], []
    for bound in (1.0, 0.0):
        torch.manual_seed(0)
        module = FedPEFTModule(10, tiny_backbone(), Prompt(num_tokens=2), optimizer=sgd(0.05))
        datamodule = FederatedDataModule(LazyDigits(), num_clients=8, batch_size=32)
        trainer = tiny_trainer(tmp_path, clients_per_round=2, client_runner="vectorized", device_data_max_gib=bound)
        with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
            trainer.fit(module, datamodule=datamodule)
        states.append(trainable_state(module))
        notes.append(trainer.device_data.note)
        reads, pool = datamodule.splits.train.reads, len(datamodule.splits.train)
        if bound > 0:  # each training sample transformed once (plus the checks' few reads)
            assert pool <= reads <= pool + 4, reads
        else:  # nothing materialised: the two clients' ~360 samples transformed as their steps came
            assert 300 < reads < pool, reads
    assert "kept on cpu" in notes[0] and "over trainer.device_data_max_gib (0)" in notes[1], notes
    for name, tensor in states[0].items():
        assert torch.equal(states[1][name], tensor), name


# ---- the server's test split, transformed once per run


class LazyTestDigits(Digits):
    """The test split transformed at every read (counting them), as a folder or hub data set's is."""

    def load(self, transform, seed):
        splits = super().load(v2.Identity(), seed)
        images, targets = splits.train.tensors
        test_images, test_targets = splits.test.tensors
        test = Lazy(test_images, test_targets.numpy(), transform)
        return Splits(TensorDataset(transform(images), targets), splits.train_targets, test, 10)


@pytest.mark.parametrize("runner", ["sequential", "vectorized"])
def test_the_servers_test_split_is_transformed_once_per_run_and_evaluates_the_same(tmp_path, runner):
    metrics, reads, notes = [], [], []
    for bound in (1.0, 0.0):
        torch.manual_seed(0)
        module = FedPEFTModule(10, tiny_backbone(), Prompt(num_tokens=2), optimizer=sgd(0.05))
        datamodule = FederatedDataModule(LazyTestDigits(), num_clients=8, batch_size=32)
        datamodule.eval_batch_size = 64  # six batches, the last one short
        trainer = tiny_trainer(
            tmp_path, num_rounds=3, clients_per_round=2, client_runner=runner, device_data_max_gib=bound
        )
        trainer.fit(module, datamodule=datamodule)
        test = datamodule.splits.test
        assert isinstance(test, Lazy), "the run left its kept test split in the data module"
        metrics.append({k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("server/")})
        reads.append(test.reads)
        notes.append(trainer.device_data.evaluation_note)
    size = len(test)
    assert notes[0].startswith(f"evaluation data: {size} samples transformed once") and "kept on cpu" in notes[0]
    assert "over trainer.device_data_max_gib (0)" in notes[1], notes
    # kept: each test image transformed once (plus the probe's reads and Lightning's sanity check);
    # not kept: once in each of the three rounds
    assert reads[0] < size + 64 and reads[1] >= 3 * size, reads
    assert metrics[0].keys() == metrics[1].keys() and "server/acc" in metrics[0]
    for name, value in metrics[0].items():
        assert torch.equal(metrics[1][name], value), (name, value, metrics[1][name])


def test_the_kept_test_split_leaves_room_for_the_training_samples():
    train, test = lazy_digits(60), lazy_digits(40)
    sample = 3 * 32 * 32 * 4 + 8
    cpu = torch.device("cpu")
    roomy = DeviceData(max_gib=100 * sample / 2**30)
    assert roomy.planned_bytes(train, cpu) == 60 * sample
    assert isinstance(roomy.evaluation(test, cpu, reserved=60 * sample), ResidentSamples)
    tight = DeviceData(max_gib=80 * sample / 2**30)  # either split fits alone, not both
    assert tight.evaluation(test, cpu, reserved=tight.planned_bytes(train, cpu)) is test
    assert "take 0.5 MiB beside 0.7 MiB of training samples, over trainer.device_data_max_gib" in tight.evaluation_note


def test_kept_evaluation_batches_are_the_plain_loaders_batches():
    from fedpeft_pl.data.datasets import evaluation_loader

    dataset = lazy_digits(50)
    kept = DeviceData(max_gib=1.0).evaluation(dataset, torch.device("cpu"))
    plain = list(torch.utils.data.DataLoader(dataset, batch_size=16))
    served = list(evaluation_loader(kept, 16))
    assert [len(b[1]) for b in served] == [16, 16, 16, 2]
    assert kept[torch.tensor(3)][0].shape == kept[3][0].shape == (3, 32, 32)  # one index is one sample
    for (images, labels), (kept_images, kept_labels) in zip(plain, served):
        assert torch.equal(images, kept_images) and torch.equal(labels, kept_labels)


def test_an_evaluation_that_reads_part_of_the_test_split_keeps_none_of_it(tmp_path):
    module = FedPEFTModule(10, tiny_backbone(), Prompt(num_tokens=2), optimizer=sgd(0.05))
    datamodule = FederatedDataModule(LazyTestDigits(), num_clients=8, batch_size=32)
    trainer = tiny_trainer(tmp_path, clients_per_round=2, client_runner="sequential", limit_val_batches=2)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.device_data.evaluation_note is None
    assert datamodule.splits.test.reads == 2 * datamodule.eval_batch_size  # the two batches, as they were read
