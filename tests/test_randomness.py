"""Secret DP noise and independent random streams.

DP noise must not follow from the run's seed (the seed sits in the config, and a Flower app ships
the config to every machine): two identical private runs draw different noise unless the user opts
into reproducible noise. Every consumer of randomness draws from its own stream.
"""

import logging

import numpy as np
import pytest
import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer

from fedpeft_pl import FederatedCallback, Federation
from fedpeft_pl.peft import Prompt, trainable_state
from fedpeft_pl.privacy import DPFedAvg, LocalDP
from fedpeft_pl.seeds import derive_seed
from fedpeft_pl.strategies import ClientUpdate


def dp_fedavg_round(**kwargs):
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, **kwargs)
    strategy.setup(Federation(10, 2, 5, sampling="poisson", seed=0))
    updates = [ClientUpdate(0, 5, {"w": torch.tensor([3.0, 4.0, 0.0])})]
    return strategy.aggregate_fit(1, {"w": torch.zeros(3)}, updates)["w"]


def test_central_dp_noise_is_secret_unless_reproducible_noise_is_asked_for(caplog):
    # the same seed, round and updates: an adversary who knows the config must not be able to redo the noise
    with caplog.at_level(logging.WARNING, logger="fedpeft_pl"):
        assert not torch.equal(dp_fedavg_round(), dp_fedavg_round())
    assert not any("NOT private" in r.message for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="fedpeft_pl"):
        assert torch.equal(dp_fedavg_round(reproducible_noise=True), dp_fedavg_round(reproducible_noise=True))
    assert any(
        r.levelname == "WARNING" and "DPFedAvg" in r.message and "NOT private" in r.message for r in caplog.records
    )


def private_fit(tmp_path, **privacy_kwargs):
    torch.manual_seed(0)
    module = tiny_module(Prompt(num_tokens=2))
    privacy = LocalDP(epsilon=None, noise_multiplier=1.0, max_grad_norm=1.0, **privacy_kwargs)
    trainer = tiny_trainer(tmp_path, num_rounds=1, clients_per_round=2, privacy=privacy, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_datamodule(num_clients=8, batch_size=64))
    return trainable_state(module)


def test_local_dp_noise_is_secret_unless_reproducible_noise_is_asked_for(tmp_path, caplog):
    first, second = private_fit(tmp_path / "a"), private_fit(tmp_path / "b")
    assert any(not torch.equal(first[n], second[n]) for n in first), "two private runs drew the same noise"
    with caplog.at_level(logging.WARNING, logger="fedpeft_pl"):
        repeat = [private_fit(tmp_path / f"r{i}", reproducible_noise=True) for i in range(2)]
    for name in repeat[0]:
        assert torch.equal(repeat[0][name], repeat[1][name]), name
    assert any("NOT private" in r.message for r in caplog.records)


def test_comm_says_a_run_with_reproducible_noise_is_not_private():
    for component in (LocalDP(reproducible_noise=True), DPFedAvg(reproducible_noise=True)):
        assert "NOT private" in component.describe()
    for component in (LocalDP(), DPFedAvg()):
        assert "NOT private" not in component.describe()


def test_local_dp_noise_is_usable_per_client_and_shaped_like_its_reference():
    privacy = LocalDP(noise_multiplier=1.0)
    like = torch.zeros(3, 4, dtype=torch.float64)
    noise = privacy.noise(client=7, like=like, std=2.0)
    assert noise.shape == like.shape and noise.dtype == like.dtype and noise.device == like.device
    assert noise.std() > 0 and not torch.equal(noise, privacy.noise(client=7, like=like, std=2.0))


# -- independent streams ------------------------------------------------------------------------------


def test_keys_of_different_lengths_do_not_collide():
    assert derive_seed(5, 3, 0) != derive_seed(5, 3)
    assert derive_seed(5, 0) != derive_seed(5)
    assert derive_seed(5, 3, 0, 0) != derive_seed(5, 3, 0)
    assert derive_seed(5, 3) == derive_seed(5, 3)


def test_each_consumer_of_a_client_round_draws_from_its_own_stream(tmp_path, monkeypatch):
    """Batch sampling, dropout (the torch global generator) and DP noise of one client in one round
    are seeded from different keys, so their draws are not the same sequence."""
    datamodule = tiny_datamodule(num_clients=4, batch_size=64)
    seen = {}
    original = datamodule.client_dataloader

    def client_dataloader(client, seed):
        seen.setdefault("sampler", seed)
        return original(client, seed)

    monkeypatch.setattr(datamodule, "client_dataloader", client_dataloader)
    module = tiny_module(Prompt(num_tokens=2))
    step = module.training_step

    def training_step(batch, batch_idx):
        seen.setdefault("global", torch.initial_seed())
        return step(batch, batch_idx)

    monkeypatch.setattr(module, "training_step", training_step)
    # the sequential runner's streams (the vectorised runner's are the next test's)
    trainer = tiny_trainer(tmp_path, num_rounds=1, clients_per_round=1, client_runner="sequential")
    trainer.fit(module, datamodule=datamodule)
    assert seen["sampler"] != seen["global"]
    sampler_draws = torch.rand(16, generator=torch.Generator().manual_seed(seen["sampler"]))
    global_draws = torch.rand(16, generator=torch.Generator().manual_seed(seen["global"]))
    assert not torch.equal(sampler_draws, global_draws)


def test_the_vectorised_runner_draws_dropout_from_the_training_stream_not_the_data_order(tmp_path, monkeypatch):
    """Clients trained at once: the torch generator is seeded from LOCAL_TRAINING, the batches from DATA_ORDER."""
    from fedpeft_pl.runners import vectorized
    from fedpeft_pl.seeds import client_seed, training_seed

    module = tiny_module(Prompt(num_tokens=2))
    seen = {"jobs": [], "global": []}
    training = {"on": False}
    module.model.register_forward_pre_hook(
        lambda *_: seen["global"].append(torch.initial_seed()) if training["on"] else None
    )
    original = vectorized.train_clients

    def train_clients(network, datamodule, jobs, *args, **kwargs):
        seen["jobs"] += jobs
        training["on"] = True
        try:
            return original(network, datamodule, jobs, *args, **kwargs)
        finally:
            training["on"] = False

    monkeypatch.setattr(vectorized, "train_clients", train_clients)
    trainer = tiny_trainer(tmp_path, num_rounds=1, clients_per_round=2, client_runner="vectorized", seed=7)
    trainer.fit(module, datamodule=tiny_datamodule(num_clients=4, batch_size=64))
    jobs = seen["jobs"]
    assert len(jobs) == 2 and seen["global"]
    for job in jobs:
        assert job.seed == client_seed(7, 1, job.client)
        assert job.torch_seed() == training_seed(7, 1, job.client) != job.seed
    assert set(seen["global"]) == {jobs[0].torch_seed()}


def test_client_sampling_and_availability_use_their_own_streams():
    from fedpeft_pl.availability import ClientAvailability
    from fedpeft_pl.loop import sample_clients
    from fedpeft_pl.seeds import AVAILABILITY, CLIENT_SAMPLING, DATA_ORDER, DP_NOISE, LOCAL_TRAINING, SERVER_NOISE

    keys = [CLIENT_SAMPLING, AVAILABILITY, DATA_ORDER, LOCAL_TRAINING, DP_NOISE, SERVER_NOISE]
    assert len(set(keys)) == len(keys)
    # client sampling of round 1 is not the draw of any other stream keyed by (seed, round)
    rng = np.random.default_rng(derive_seed(0, CLIENT_SAMPLING, 1))
    assert sample_clients(0, 1, 100, 10) == sorted(int(c) for c in rng.choice(100, size=10, replace=False))
    plans = [ClientAvailability(dropout=0.5).plan(0, 1, c, 10).dropped for c in range(64)]
    expected = [np.random.default_rng(derive_seed(0, AVAILABILITY, 1, c)).random() < 0.5 for c in range(64)]
    assert plans == expected


def test_local_dp_draws_its_poisson_batches_from_the_secret_source_too(tmp_path):
    """Amplification by subsampling holds only if nobody knows which records a batch holds."""
    from fedpeft_pl.data.datamodule import ClientBatchSampler

    datamodule = tiny_datamodule(num_clients=4)
    LocalDP().attach(tiny_module(Prompt(num_tokens=2)), datamodule)
    sampler = datamodule._sampler
    batches = []
    for _ in range(2):
        sampler.assign(np.arange(200), seed=3)
        batches.append(list(sampler))
    assert batches[0] != batches[1]
    reproducible = tiny_datamodule(num_clients=4)
    LocalDP(reproducible_noise=True).attach(tiny_module(Prompt(num_tokens=2)), reproducible)
    again = []
    for _ in range(2):
        reproducible._sampler.assign(np.arange(200), seed=3)
        again.append(list(reproducible._sampler))
    assert again[0] == again[1]
    plain = ClientBatchSampler(batch_size=64, poisson=True)
    plain.assign(np.arange(200), seed=3)
    assert list(plain) == again[0]  # the reproducible sampler is the seeded one


class Sampled(FederatedCallback):
    def __init__(self):
        self.clients = []

    def on_round_start(self, trainer, pl_module, round):
        self.clients.append(round.clients)


def sampled_clients(tmp_path, **dp):
    from helpers import tiny_datamodule, tiny_module, tiny_trainer

    torch.manual_seed(0)
    recorder = Sampled()
    trainer = tiny_trainer(
        tmp_path,
        num_rounds=3,
        clients_per_round=4,
        client_sampling="poisson",
        callbacks=[recorder],
        aggregation=DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, **dp),
        limit_val_batches=0,
    )
    trainer.fit(tiny_module(Prompt(num_tokens=2)), datamodule=tiny_datamodule(num_clients=8, batch_size=256))
    return recorder.clients


@pytest.mark.slow  # several private fits
def test_central_dp_samples_clients_from_a_secret_seed_unless_reproducible_noise_is_asked_for(tmp_path):
    # DP-FedAvg's accounting amplifies by sampling: who is sampled must not follow from the config's seed
    runs = [sampled_clients(tmp_path / str(i)) for i in range(3)]
    assert len({tuple(r) for r in runs}) > 1
    assert sampled_clients(tmp_path / "a", reproducible_noise=True) == sampled_clients(
        tmp_path / "b", reproducible_noise=True
    )
