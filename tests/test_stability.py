"""Client stability, server strategies and compression in real federated runs."""

import csv
import dataclasses
import logging

import pytest
import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer
from lightning.pytorch.loggers import CSVLogger

from fedpeft_pl import ClientAvailability, FedAdam, FedAvg, FederatedCallback, FedProx, Strategy
from fedpeft_pl.compression import Float16, Int8
from fedpeft_pl.federation import sample_clients
from fedpeft_pl.peft import Prompt, trainable_state


class Events(FederatedCallback):
    def __init__(self):
        self.batches, self.dropped, self.finished, self.round_start_state = {}, [], [], {}
        self.sent = {}

    def on_round_start(self, trainer, pl_module, round):
        self.round_start_state[round.number] = trainable_state(pl_module)

    def on_client_start(self, trainer, pl_module, round, client):
        self._current = (round.number, client)
        self.batches[self._current] = 0

    def on_train_batch_end(self, trainer, *args):
        self.batches[self._current] += 1

    def on_client_dropped(self, trainer, pl_module, round, result):
        self.dropped.append((round.number, result.client))

    def on_client_end(self, trainer, pl_module, round, result):
        self.finished.append((round.number, result.client))
        self.sent[(round.number, result.client)] = trainable_state(pl_module)


def fit(tmp_path, seed=0, rounds=2, **trainer_kwargs):
    torch.manual_seed(0)
    events = Events()
    module = tiny_module(Prompt(num_tokens=2))
    datamodule = tiny_datamodule(num_clients=6, batch_size=32)
    trainer = tiny_trainer(
        tmp_path,
        num_rounds=rounds,
        clients_per_round=4,
        local_epochs=2,
        seed=seed,
        callbacks=[events],
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, datamodule, events


def test_dropout_and_stragglers_follow_the_seeded_plan_and_repeat(tmp_path):
    availability = ClientAvailability(dropout=0.3, stragglers=0.5, straggler_work=(0.2, 0.5))
    _trainer, module, datamodule, events = fit(tmp_path / "a", seed=3, rounds=3, availability=availability)
    for server_round in (1, 2, 3):
        for client in sample_clients(3, server_round, 6, 4):
            planned = 2 * datamodule.client_num_batches(client)
            plan = availability.plan(3, server_round, client, planned)
            if plan.dropped:
                assert (server_round, client) in events.dropped and events.batches[(server_round, client)] == 0
            else:
                assert events.batches[(server_round, client)] == plan.batches
                assert plan.batches < planned if plan.straggler else plan.batches == planned
    assert events.dropped, "seed 3 drops at least one client in three rounds"
    _, again, _, repeat = fit(tmp_path / "b", seed=3, rounds=3, availability=availability)
    assert repeat.dropped == events.dropped and repeat.batches == events.batches
    assert all(torch.equal(a, b) for a, b in zip(trainable_state(module).values(), trainable_state(again).values()))


def test_a_round_with_too_few_returns_is_skipped_and_the_state_stays(tmp_path, caplog):
    class NeedsMany(FedAvg):
        def __init__(self):
            super().__init__(min_clients=4)

    availability = ClientAvailability(dropout=0.5)
    with caplog.at_level(logging.WARNING, logger="fedpeft_pl"):
        _trainer, module, _, events = fit(
            tmp_path, seed=1, rounds=2, availability=availability, aggregation=NeedsMany()
        )
    skipped = [r for r in (1, 2) if sum(1 for (rr, _) in events.finished if rr == r) < 4]
    assert skipped, "with half of the clients dropping, some round gets fewer than 4 updates"
    assert "fewer than min_clients=4; the round is skipped" in caplog.text
    last = skipped[-1]
    after = events.round_start_state.get(last + 1, trainable_state(module))
    assert all(torch.equal(after[k], v) for k, v in events.round_start_state[last].items())


@pytest.mark.slow  # three fits
def test_fedprox_with_mu_zero_is_fedavg_and_with_mu_pulls_clients_towards_the_global_state(tmp_path):
    _, fedavg, _, fedavg_events = fit(tmp_path / "avg", aggregation=FedAvg())
    _, prox0, _, _ = fit(tmp_path / "prox0", aggregation=FedProx(mu=0.0))
    assert all(torch.equal(a, b) for a, b in zip(trainable_state(fedavg).values(), trainable_state(prox0).values()))
    _, _, _, prox_events = fit(tmp_path / "prox", aggregation=FedProx(mu=10.0))

    def drift(events):
        start = events.round_start_state[1]
        return sum(sum((s[k] - start[k]).norm() for k in start) for (r, _), s in events.sent.items() if r == 1)

    assert drift(prox_events) < 0.8 * drift(fedavg_events)


def test_compressed_bytes_are_logged_exactly(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    _trainer, module, _, _ = fit(tmp_path, rounds=1, compress_upload=Int8(), compress_download=Float16(), logger=logger)
    state = trainable_state(module)
    elements, tensors = sum(t.numel() for t in state.values()), len(state)
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r.get("comm/bytes_up"))
    assert float(row["comm/bytes_up"]) == 4 * (elements + 4 * tensors)  # 4 clients, int8 plus one fp32 scale a tensor
    assert float(row["comm/bytes_down"]) == 4 * 2 * elements  # fp16


def test_poisson_sampling_varies_the_count_around_m_and_is_seeded():
    counts = [len(sample_clients(0, r, 100, 10, "poisson")) for r in range(1, 201)]
    assert counts == [len(sample_clients(0, r, 100, 10, "poisson")) for r in range(1, 201)]
    assert len(set(counts)) > 5 and 9 < sum(counts) / len(counts) < 11


def test_server_optimizer_and_error_feedback_state_resume_exactly(tmp_path):
    def run(rounds, root, ckpt_path=None):
        torch.manual_seed(0)
        module = tiny_module(Prompt(num_tokens=2))
        trainer = tiny_trainer(
            root,
            num_rounds=rounds,
            clients_per_round=3,
            enable_checkpointing=True,
            aggregation=FedAdam(lr=0.05),
            compress_upload=Int8(error_feedback=True),
        )
        trainer.fit(module, datamodule=tiny_datamodule(num_clients=4, batch_size=64), ckpt_path=ckpt_path)
        return trainer, module

    _, straight = run(3, tmp_path / "straight")
    first, _ = run(2, tmp_path / "split")
    checkpoint = torch.load(first.checkpoint_callback.last_model_path, weights_only=True)
    server = checkpoint["callbacks"]["ServerAggregation"]
    assert set(server["strategy"]["server_optimizer"]) == {"m", "v"} and server["upload"]["residuals"]
    assert server["version"] == 2  # two server updates
    _, resumed = run(3, tmp_path / "split", ckpt_path=first.checkpoint_callback.last_model_path)
    assert all(torch.equal(a, b) for a, b in zip(trainable_state(straight).values(), trainable_state(resumed).values()))


def test_a_strategy_sees_the_federations_shape_before_training(tmp_path):
    class Recording(FedAvg):
        def setup(self, federation):
            self.shape = dataclasses.asdict(federation)

    strategy = Recording()
    fit(tmp_path, rounds=1, aggregation=strategy)
    assert strategy.shape == {
        "num_clients": 6,
        "clients_per_round": 4,
        "num_rounds": 1,
        "local_epochs": 2,
        "sampling": "uniform",
        "seed": 0,
        "sampling_seed": None,
    }
    assert isinstance(strategy, Strategy)


def test_invalid_client_sampling_is_a_config_error(tmp_path):
    from fedpeft_pl import ConfigError

    with pytest.raises(ConfigError, match="client_sampling"):
        tiny_trainer(tmp_path, client_sampling="stratified")
