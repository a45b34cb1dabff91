import numpy as np
import pytest

from fedpeft_pl import ConfigError
from fedpeft_pl.data import IID, Dirichlet, Shards, label_histogram

TARGETS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes
PARTITIONERS = [IID(), Dirichlet(alpha=0.1, min_samples=5), Dirichlet(alpha=1.0), Shards(classes_per_client=2)]


def split(partitioner, seed=0, num_clients=20, targets=TARGETS):
    return partitioner(targets, num_clients, np.random.default_rng(seed))


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=repr)
def test_parts_are_disjoint_and_cover_every_sample(partitioner):
    parts = split(partitioner)
    joined = np.concatenate(parts)
    assert len(parts) == 20
    assert len(joined) == len(np.unique(joined)) == len(TARGETS)
    assert all(len(p) > 0 and np.all(np.diff(p) > 0) for p in parts)


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=repr)
def test_parts_are_a_function_of_the_seed(partitioner):
    same = [np.array_equal(a, b) for a, b in zip(split(partitioner, seed=3), split(partitioner, seed=3))]
    other = [np.array_equal(a, b) for a, b in zip(split(partitioner, seed=3), split(partitioner, seed=4))]
    assert all(same)
    assert not all(other)


def mean_label_entropy(parts):
    histogram = label_histogram(TARGETS, parts, 10).astype(float)
    p = histogram / histogram.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return entropy.mean()


def test_small_alpha_skews_labels_and_large_alpha_approaches_iid():
    iid = mean_label_entropy(split(IID()))
    skewed = mean_label_entropy(split(Dirichlet(alpha=0.1, min_samples=5)))
    mild = mean_label_entropy(split(Dirichlet(alpha=100.0)))
    assert skewed < 0.6 * iid
    assert mild > 0.95 * iid


def test_dirichlet_respects_min_samples():
    parts = split(Dirichlet(alpha=0.1, min_samples=20))
    assert min(len(p) for p in parts) >= 20


def test_shards_give_each_client_exactly_k_classes():
    histogram = label_histogram(TARGETS, split(Shards(classes_per_client=3)), 10)
    assert np.all((histogram > 0).sum(axis=1) == 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Dirichlet(alpha=0.0),
        lambda: Dirichlet(alpha=-1.0),
        lambda: Dirichlet(min_samples=0),
        lambda: Shards(classes_per_client=0),
        lambda: split(Shards(classes_per_client=11)),
        lambda: split(Shards(classes_per_client=1), num_clients=5),
        lambda: split(Dirichlet(alpha=0.5, min_samples=100), num_clients=20),
        lambda: split(IID(), num_clients=2000),
    ],
    ids=["alpha0", "alpha<0", "min0", "k0", "k>classes", "too-few-clients-for-classes", "min-too-high", "N>samples"],
)
def test_impossible_partitions_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()
