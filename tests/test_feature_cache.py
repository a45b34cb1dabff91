"""The Head feature cache: every image through the backbone once, and the same run as without it."""

import logging
import re

import pytest
import torch
from helpers import sgd, tiny_backbone, tiny_trainer
from torch.utils.data import Dataset
from torchvision.transforms import v2

from fedpeft_pl import ClientAvailability, ConfigError, FederatedDataModule, FedPEFTModule
from fedpeft_pl.data import Digits, Dirichlet, Splits
from fedpeft_pl.peft import Bias, Head, trainable_state


def run(tmp_path, cache, runner="sequential", dataset=None, rounds=2, trainer_kwargs=None, **backbone):
    """Rounds of Head on unequal clients with stragglers and per-client tests; the state, metrics,
    bytes and the number of images the backbone's first block saw."""
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(**backbone), Head(), optimizer=sgd(0.05, weight_decay=1e-4))
    datamodule = FederatedDataModule(
        dataset or Digits(),
        num_clients=4,
        partition=Dirichlet(alpha=0.5, min_samples=10),
        batch_size=24,
        eval_batch_size=50,
        client_test_fraction=0.2,
    )
    seen = []
    module.model.blocks[0].register_forward_hook(lambda layer, inputs, output: seen.append(len(output)))
    trainer = tiny_trainer(
        tmp_path,
        num_rounds=rounds,
        clients_per_round=3,
        local_epochs=2,
        client_runner=runner,
        feature_cache=cache,
        availability=ClientAvailability(stragglers=0.5, straggler_work=(0.3, 0.6)),
        **(trainer_kwargs or {}),
    )
    server, evaluations = trainer.aggregation.server, []
    record = server.record_client_evaluations
    server.record_client_evaluations = lambda each: (evaluations.extend(each), record(each))
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("round/seconds")}
    for e in evaluations:  # each client's accuracy and loss on its own test split, every round
        metrics.update({f"client {e.client} {key} #{len(metrics)}": value for key, value in e.metrics.items()})
    # after the run the module and the data module are as they were: images, and the whole ViT
    assert not module.takes_features and datamodule.splits.train[0][0].dim() == datamodule.splits.test[0][0].dim() == 3
    return trainable_state(module), metrics, trainer.aggregation.cumulative_bytes, sum(seen), datamodule


@pytest.mark.parametrize("runner", ["sequential", "vectorized", "auto"])
def test_the_cache_runs_the_backbone_once_per_image_and_ends_where_the_backbone_does(tmp_path, runner, caplog):
    plain, plain_metrics, plain_bytes, plain_images, _ = run(tmp_path, "off", runner)
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        cached, metrics, sent, images, datamodule = run(tmp_path, "auto", runner)
    for name, tensor in plain.items():
        torch.testing.assert_close(cached[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert sent == plain_bytes
    assert metrics.keys() == plain_metrics.keys() and any(k.startswith("client ") for k in metrics)
    for key, value in plain_metrics.items():  # server and per-client accuracy and loss, bytes, stragglers
        assert metrics[key] == pytest.approx(value, abs=1e-5), key
    pool = len(datamodule.splits.train) + len(datamodule.splits.test)
    assert images == pool < plain_images
    assert f"feature cache: the backbone ran once over {len(datamodule.splits.train):,} training and" in caplog.text
    if runner == "auto":  # on CPU auto trains vectorised, and on cached features only the classifier runs
        assert re.search(r"vectorized \(auto: [^)]*\) client runner", caplog.text), caplog.text[-2000:]


def test_limit_val_batches_counts_the_same_samples_with_the_cache(tmp_path):
    """On features evaluation runs in large batches, except where limit_val_batches counts batches."""
    limit = {"limit_val_batches": 2}
    plain = run(tmp_path, "off", "auto", trainer_kwargs=limit)[1]
    cached = run(tmp_path, "auto", "auto", trainer_kwargs=limit)[1]
    for key in ("server/acc", "server/loss"):
        assert cached[key] == pytest.approx(plain[key], abs=1e-5), key


class _Lazy(Dataset):
    """Digits transformed at every read, as a folder of image files would be."""

    def __init__(self, images, targets, transform):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.transform(self.images[index]), int(self.targets[index])


class _Jitter:
    """A random transform no name gives away."""

    def __call__(self, image):
        return image + 0.01 * torch.randn_like(image)


class _AugmentedDigits(Digits):
    def __init__(self, augmentation=None):
        super().__init__()
        self.augmentation = augmentation

    def load(self, transform, seed):
        splits = super().load(v2.Identity(), seed)
        images, targets = splits.train.tensors
        train = _Lazy(images, targets.numpy(), v2.Compose([transform, self.augmentation]))
        return Splits(train, splits.train_targets, _Lazy(*splits.test.tensors, transform), 10)


@pytest.mark.parametrize(
    "augmentation, named", [(v2.RandomHorizontalFlip(), "RandomHorizontalFlip"), (_Jitter(), "reads differently")]
)
def test_random_transforms_turn_the_cache_off_with_a_reason(tmp_path, caplog, augmentation, named):
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        _, _, _, images, datamodule = run(tmp_path, "auto", dataset=_AugmentedDigits(augmentation), rounds=1)
    (line,) = [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]
    assert line.startswith("feature cache off: the training images' transforms are random") and named in line, line
    assert images > len(datamodule.splits.train) + len(datamodule.splits.test)  # every step ran the backbone


def test_a_stochastic_layer_turns_the_cache_off_and_memory_says_how_to_fix_it(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        run(tmp_path, "auto", rounds=1, kwargs={"drop_path_rate": 0.1})
    assert (
        "feature cache off: blocks.1.drop_path1 (DropPath) acts randomly in training, before the classifier"
        in caplog.text
    )
    with pytest.raises(
        ConfigError, match=r"memory cannot be exact here: .*DropPath.*; set trainer.feature_cache: auto or off"
    ):
        run(tmp_path, "memory", rounds=1, kwargs={"drop_path_rate": 0.1})


def test_other_methods_never_cache_and_only_an_explicit_request_complains(tmp_path, caplog):
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(), Bias(), optimizer=sgd())
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        tiny_trainer(tmp_path, num_rounds=1, clients_per_round=1).fit(
            module, datamodule=FederatedDataModule(Digits(), num_clients=4)
        )
    assert "feature cache" not in caplog.text
    with pytest.raises(
        ConfigError, match=r"memory serves linear probing only, but Bias\(\) trains tensors inside the backbone"
    ):
        tiny_trainer(tmp_path, feature_cache="memory").fit(
            module, datamodule=FederatedDataModule(Digits(), num_clients=4)
        )


def test_settings_are_checked_and_the_size_bound_is_explained(tmp_path, caplog):
    with pytest.raises(ConfigError, match="feature_cache must be 'auto', 'memory' or 'off', got 'disk'"):
        tiny_trainer(tmp_path, feature_cache="disk")
    with pytest.raises(ConfigError, match="feature_cache_max_gib must be > 0"):
        tiny_trainer(tmp_path, feature_cache_max_gib=0)
    bound = 1e-4  # about 100 KiB; digits' 1,797 features of 48 floats take 0.3 MiB
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(), Head(), optimizer=sgd())
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        tiny_trainer(tmp_path, feature_cache_max_gib=bound).fit(
            module, datamodule=FederatedDataModule(Digits(), num_clients=4)
        )
    assert "over trainer.feature_cache_max_gib (0.0001); raise it where memory allows" in caplog.text
