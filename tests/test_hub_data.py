"""Hugging Face data sets and Flower Datasets partitioners, offline: a small parquet copy the tests write."""

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import sgd, tiny_backbone, tiny_trainer

from fedpeft_pl import ConfigError, FederatedDataModule, FedPEFTModule
from fedpeft_pl.data import HuggingFace
from fedpeft_pl.peft import Bias, Head, trainable_state

datasets = pytest.importorskip("datasets")
flwr_partitioner = pytest.importorskip("flwr_datasets.partitioner")

REPO = Path(__file__).resolve().parents[1]
WRITERS = 6
CLASSES = 4
DIRICHLET = {"class_path": "flwr_datasets.partitioner.DirichletPartitioner", "init_args": {"alpha": 0.5}}
PATHOLOGICAL = {
    "class_path": "flwr_datasets.partitioner.PathologicalPartitioner",
    "init_args": {"num_classes_per_partition": 2},
}
NATURAL = {"class_path": "flwr_datasets.partitioner.NaturalIdPartitioner", "init_args": {"partition_by": "writer_id"}}


def write_parquet_copy(root: Path, sizes=(("train", 240), ("test", 60))) -> str:
    """A hub-like data set: ``data/<split>-*.parquet`` with an image, a class label and a writer's ID per row.

    Each class has its own brightness, so a tiny ViT learns something in two rounds.
    """
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[f"class{c}" for c in range(CLASSES)]),
            "writer_id": datasets.Value("string"),
        }
    )
    (root / "data").mkdir(parents=True)
    for split, size in sizes:
        labels = rng.integers(0, CLASSES, size)
        images = [rng.integers(0, 60, (16, 16, 3), dtype=np.uint8) + np.uint8(60 * label) for label in labels]
        rows = {
            "image": [datasets.Image().encode_example(image) for image in images],
            "label": labels.tolist(),
            "writer_id": [f"writer{w}" for w in rng.integers(0, WRITERS, size)],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return str(root)


@pytest.fixture(scope="module")
def hub_copy(tmp_path_factory):
    return write_parquet_copy(tmp_path_factory.mktemp("hub"))


def ready(datamodule: FederatedDataModule) -> FederatedDataModule:
    datamodule.data_config = {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
    }
    datamodule.setup("fit")
    return datamodule


def hub_datamodule(path: str, partition, **kwargs) -> FederatedDataModule:
    kwargs.setdefault("batch_size", 16)
    return FederatedDataModule(HuggingFace(path), partition=partition, **kwargs)


def test_the_source_reads_splits_labels_and_columns(hub_copy):
    splits = HuggingFace(hub_copy).load(lambda image: np.asarray(image), seed=0)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (240, 60, CLASSES)
    image, label = splits.train[5]
    assert image.shape == (16, 16, 3) and label == splits.train_targets[5]
    assert splits.label_column == "label" and set(splits.columns) == {"label", "writer_id"}
    # the brightness written for each row's class comes back with that row
    means = np.array([np.asarray(splits.train[i][0]).mean() for i in range(40)])
    assert np.all(np.abs(means - (30 + 60 * splits.train_targets[:40])) < 10)


def test_a_held_out_test_split_is_stratified_and_seeded(tmp_path):
    path = write_parquet_copy(tmp_path, sizes=(("train", 200),))
    a = HuggingFace(path, test_split=None, test_fraction=0.25).load(lambda image: image, seed=1)
    b = HuggingFace(path, test_split=None, test_fraction=0.25).load(lambda image: image, seed=1)
    assert (len(a.train), len(a.test)) == (150, 50)
    assert np.array_equal(a.train_targets, b.train_targets)
    with pytest.raises(ConfigError, match=r"no split 'test'.*test_split: null"):
        HuggingFace(path).load(lambda image: image, seed=1)


@pytest.mark.parametrize("partition", [DIRICHLET, PATHOLOGICAL], ids=["dirichlet", "pathological"])
def test_flower_partitioners_split_every_sample_once_by_data_seed(hub_copy, partition):
    a = ready(hub_datamodule(hub_copy, partition, num_clients=4, seed=3))
    b = ready(hub_datamodule(hub_copy, partition, num_clients=4, seed=3))
    c = ready(hub_datamodule(hub_copy, partition, num_clients=4, seed=4))
    joined = np.concatenate(a.client_indices)
    assert len(a.client_indices) == 4 and sorted(joined.tolist()) == list(range(240))
    assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))
    assert not all(np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices))
    histogram = a.label_histogram
    assert histogram.shape == (4, CLASSES) and histogram.sum() == 240
    if partition is PATHOLOGICAL:
        assert ((histogram > 0).sum(axis=1) <= 2).all()


def test_natural_ids_set_the_number_of_clients_and_say_so(hub_copy, caplog):
    datamodule = hub_datamodule(hub_copy, NATURAL)
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        assert datamodule.num_clients == WRITERS  # known before set-up: the trainer checks m against it
        ready(datamodule)
    assert f"NaturalIdPartitioner(partition_by='writer_id')): all {WRITERS} clients found in the data" in caplog.text
    writers = datamodule.splits.columns["writer_id"]
    assert sorted(writers[part[0]] for part in datamodule.client_indices) == [f"writer{w}" for w in range(WRITERS)]
    assert all(len(set(writers[part])) == 1 for part in datamodule.client_indices)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        fewer = ready(hub_datamodule(hub_copy, NATURAL, num_clients=3, seed=5))
    assert f"3 of the {WRITERS} clients it finds, chosen by data.seed" in caplog.text
    assert len(fewer.client_indices) == 3
    assert all(len(set(writers[part])) == 1 for part in fewer.client_indices)
    with pytest.raises(ConfigError, match=f"data.num_clients \\(7\\) exceeds the {WRITERS} clients"):
        ready(hub_datamodule(hub_copy, NATURAL, num_clients=7))


class WarningPartitioner(flwr_partitioner.IidPartitioner if flwr_partitioner else object):  # type: ignore[misc]
    """Flower's IID split that warns on every partition it loads, as DirichletPartitioner does on each retry."""

    def load_partition(self, partition_id):
        warnings.warn(f"partition {partition_id} was resampled", UserWarning, stacklevel=1)
        warnings.warn("a warning of someone else's", RuntimeWarning, stacklevel=2)  # attributed to the caller
        return super().load_partition(partition_id)


def test_a_partitioners_warnings_become_one_log_line(hub_copy, caplog, recwarn):
    spec = {"class_path": f"{__name__}.WarningPartitioner", "init_args": {}}
    with caplog.at_level(logging.WARNING, logger="fedpeft_pl"):
        datamodule = ready(hub_datamodule(hub_copy, spec, num_clients=4))
    assert sum(len(part) for part in datamodule.client_indices) == 240
    assert not [w for w in recwarn if "resampled" in str(w.message)], "Flower's warnings reached the console"
    assert len([w for w in recwarn if "someone else's" in str(w.message)]) == 4, "another's warnings were swallowed"
    folded = [r.getMessage() for r in caplog.records if "warned" in r.getMessage()]
    assert folded == [
        "data.partition WarningPartitioner() warned 4 time(s) while splitting, first: partition 0 was resampled"
    ], folded


def test_per_client_test_splits_come_from_each_clients_own_samples(hub_copy):
    datamodule = ready(hub_datamodule(hub_copy, NATURAL, client_test_fraction=0.25))
    assert datamodule.has_client_tests
    writers = datamodule.splits.columns["writer_id"]
    for train, test in zip(datamodule.client_indices, datamodule.client_test_indices):
        assert len(test) >= 1 and not set(train) & set(test)
        assert set(writers[test]) == set(writers[train])
    images, labels = next(iter(datamodule.client_test_dataloader(0)))
    assert images.shape[1:] == (3, 32, 32) and labels.dtype == torch.long


def test_images_are_read_from_disk_one_batch_at_a_time(hub_copy, monkeypatch):
    """Nothing is decoded at set-up: the table stays memory-mapped Arrow, and a batch decodes its own images only."""
    decoded = []
    decode = datasets.Image.decode_example

    def counting(self, value, token_per_repo_id=None):
        decoded.append(value)
        return decode(self, value, token_per_repo_id)

    monkeypatch.setattr(datasets.Image, "decode_example", counting)
    datamodule = ready(hub_datamodule(hub_copy, DIRICHLET, num_clients=4))
    assert decoded == []
    table = datamodule.splits.train.table
    assert isinstance(table.data, datasets.table.MemoryMappedTable) and table.cache_files
    images, _ = next(iter(datamodule.client_dataloader(0, seed=0)))
    assert len(decoded) == len(images) == 16


def run(tmp_path, path, name, partition, runner, peft=None, **trainer_kwargs):
    torch.manual_seed(0)
    module = FedPEFTModule(CLASSES, tiny_backbone(), peft or Bias(), optimizer=sgd(0.05))
    clients = None if partition is NATURAL else 4  # a natural split counts its writers
    datamodule = FederatedDataModule(HuggingFace(path), partition=partition, num_clients=clients, batch_size=16)
    settings = {"num_rounds": 2, "clients_per_round": 3, **trainer_kwargs}
    trainer = tiny_trainer(tmp_path / name, client_runner=runner, **settings)
    trainer.fit(module, datamodule=datamodule)
    return trainable_state(module), trainer


@pytest.mark.slow  # two runs each, like the device-data comparison: about 15 s on 2 idle cores
@pytest.mark.parametrize("partition", [DIRICHLET, PATHOLOGICAL, NATURAL], ids=["dirichlet", "pathological", "natural"])
def test_two_rounds_on_both_client_runners(tmp_path, hub_copy, partition):
    sequential, seq_trainer = run(tmp_path, hub_copy, "seq", partition, "sequential")
    vectorised, vec_trainer = run(tmp_path, hub_copy, "vec", partition, "vectorized")
    assert (seq_trainer.client_runner, vec_trainer.client_runner) == ("sequential", "vectorized")
    assert seq_trainer.current_epoch == vec_trainer.current_epoch == 2
    assert 0.0 <= float(seq_trainer.callback_metrics["server/acc"]) <= 1.0
    for name, tensor in sequential.items():
        torch.testing.assert_close(vectorised[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("runner", ["sequential", "vectorized"])
def test_the_feature_cache_bound_holds_on_a_data_set_read_from_disk(tmp_path, hub_copy, runner):
    """A bound below the features' size: the probe trains through the backbone, reading images from disk."""
    _, trainer = run(tmp_path, hub_copy, runner, DIRICHLET, runner, peft=Head(), feature_cache_max_gib=1e-6)
    note = trainer.fit_loop.feature_cache.note
    assert note is not None and "over trainer.feature_cache_max_gib (1e-06)" in note, note
    assert trainer.current_epoch == 2


@pytest.mark.slow  # two runs: about 15 s on 2 idle cores
def test_the_vectorised_runners_device_data_bound_holds_on_a_data_set_read_from_disk(tmp_path, hub_copy, monkeypatch):
    """Under the bound the run keeps every transformed sample; over it nothing is materialised, and the states agree."""
    decoded = []
    decode = datasets.Image.decode_example
    monkeypatch.setattr(
        datasets.Image, "decode_example", lambda self, *a, **k: decoded.append(1) or decode(self, *a, **k)
    )
    states, notes, reads = [], [], []
    for bound in (1.0, 1e-6):
        decoded.clear()
        state, trainer = run(
            tmp_path,
            hub_copy,
            f"bound{bound}",
            DIRICHLET,
            "vectorized",
            num_rounds=1,
            clients_per_round=2,
            device_data_max_gib=bound,
        )
        states.append(state)
        notes.append(trainer.device_data.note)
        reads.append(len(decoded))
    assert "kept on cpu" in notes[0] and "over trainer.device_data_max_gib (1e-06)" in notes[1], notes
    # kept: all 240 training images decoded once, plus the 60 test images; over the bound: only the two
    # sampled clients' images (of 4), as their steps came, plus the test images and the checks' few reads
    assert reads[0] >= 240 + 60 and reads[1] < 240, reads
    for name, tensor in states[0].items():
        torch.testing.assert_close(states[1][name], tensor, rtol=0, atol=0, msg=name)


# ---- mistakes on the command line: one line, exit status 2, no run folder


def cli_error(tmp_path, capsys, *overrides):
    from fedpeft_pl.cli import main

    args = [
        "fit",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--trainer.num_rounds",
        "1",
        "--trainer.clients_per_round",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--model.num_classes",
        str(CLASSES),
        *overrides,
    ]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fedpeft: error:")]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert not list((tmp_path / "runs").glob("*/version_*")), "a run that failed before round 1 left its folder"
    return errors[0]


def hub_source(path: str, **init_args) -> list[str]:
    return [
        "--data.dataset",
        json.dumps({"class_path": "fedpeft_pl.data.HuggingFace", "init_args": {"path": path, **init_args}}),
    ]


def partition(spec) -> list[str]:
    return ["--data.partition", json.dumps(spec)]


CLI_CASES = {
    "unknown-name-offline": (
        lambda copy: hub_source("no-such-org/no-such-data"),
        "could not load the data set 'no-such-org/no-such-data'",
    ),
    "missing-label-column": (
        lambda copy: hub_source(copy, label_column="fine_label"),
        "data.dataset.label_column 'fine_label' is not a column",
    ),
    "more-clients-than-writers": (
        lambda copy: [*hub_source(copy), *partition(NATURAL), "--data.num_clients", "7"],
        f"data.num_clients (7) exceeds the {WRITERS} clients",
    ),
    "partitioner-argument-out-of-range": (
        lambda copy: [*hub_source(copy), *partition({**DIRICHLET, "init_args": {"alpha": -1.0}})],
        "data.partition DirichletPartitioner(alpha=-1.0): Alpha values should be strictly greater than zero",
    ),
    "partitioner-argument-unknown": (
        lambda copy: [*hub_source(copy), *partition({**DIRICHLET, "init_args": {"alpah": 0.1}})],
        "DirichletPartitioner takes no argument 'alpah'",
    ),
    "flower-partitioner-as-a-bare-class-path": (
        lambda copy: [*hub_source(copy), "--data.partition", DIRICHLET["class_path"], "--data.partition.alpha", "0.1"],
        "a Flower Datasets partitioner is given with its arguments in one value: --data.partition '{class_path:",
    ),
    "classes-per-client-beyond-the-data": (
        lambda copy: [*hub_source(copy), *partition({**PATHOLOGICAL, "init_args": {"num_classes_per_partition": 9}})],
        "cannot split this data",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_a_data_mistake_gives_one_line_and_no_run_folder(case, tmp_path, capsys, monkeypatch, hub_copy):
    monkeypatch.chdir(REPO)
    make_args, message = CLI_CASES[case]
    line = cli_error(tmp_path, capsys, *make_args(hub_copy))
    assert message in line, line


DOMAIN_GAP = {
    "cifar100.yaml": "uoft-cs/cifar100",
    "resisc45.yaml": "timm/resisc45",
    "pcam.yaml": "1aurent/PatchCamelyon",
    "femnist.yaml": "flwrlabs/femnist",
}


@pytest.mark.parametrize("name", sorted(DOMAIN_GAP))
def test_a_hub_config_offline_names_its_data_set_and_the_local_way(name, tmp_path):
    config = yaml.safe_load((REPO / "configs" / "domain_gap" / name).read_text())
    source = config["data"]["dataset"]
    assert source["class_path"] == "fedpeft_pl.data.HuggingFace"
    dataset = HuggingFace(**{**source["init_args"], "cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as error:
        dataset.prepare()
    message = str(error.value)
    assert DOMAIN_GAP[name] in message and "set data.dataset.path to that folder" in message
    assert "\n" not in message


def test_a_local_copy_loads_without_download_bars_and_leaves_them_on(tmp_path, capfd):
    # a local folder is read, not downloaded; datasets' "Downloading data" bars would tell the user otherwise
    copy = write_parquet_copy(tmp_path / "copy", sizes=(("train", 20), ("test", 8)))
    capfd.readouterr()
    HuggingFace(copy, cache_dir=str(tmp_path / "cache")).prepare()
    err = capfd.readouterr().err
    assert "Downloading" not in err and "Generating" not in err, err
    assert datasets.is_progress_bar_enabled(), "a hub download afterwards would show no progress"


def test_comm_on_a_natural_federation_reads_no_data(capsys, monkeypatch):
    # the clients of FEMNIST by writer are found in the data when the run starts; comm neither downloads nor reads it
    from fedpeft_pl.cli import main

    monkeypatch.setattr(HuggingFace, "_open", lambda self: pytest.fail("comm opened the data set"))
    main(
        [
            "comm",
            "--config",
            str(REPO / "configs" / "prompt.yaml"),
            "--config",
            str(REPO / "configs/domain_gap/femnist.yaml"),
        ]
    )
    data = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data "))
    assert (
        "flwrlabs/femnist" in data
        and "a client for each partition NaturalIdPartitioner(partition_by='writer_id')" in data
    )
