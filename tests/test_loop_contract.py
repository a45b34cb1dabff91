"""The contract between FederatedLoop and Lightning, on two tiny rounds.

loop.py is the only module that uses private Lightning API. If a Lightning release changes
that API, these tests are where it shows.
"""

import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer

from fedpeft_pl import ClientUpdate, FedAvg, FederatedCallback
from fedpeft_pl.federation import sample_clients
from fedpeft_pl.peft import Prompt, trainable_state


class Recorder(FederatedCallback):
    def __init__(self):
        self.events = []
        self.global_at_round_start = {}
        self.received = {}
        self.sent = {}
        self.after_round = {}
        self.fresh_optimizer = []
        self._first_batch = False

    def on_train_epoch_start(self, trainer, pl_module):
        self.events.append(("epoch_start", trainer.current_epoch))

    def on_round_start(self, trainer, pl_module, round):
        self.events.append(("round_start", round.number, tuple(round.clients)))
        self.global_at_round_start[round.number] = trainable_state(pl_module)

    def on_client_start(self, trainer, pl_module, round, client):
        self.events.append(("client_start", client))
        self._first_batch = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._first_batch:
            self.fresh_optimizer.append(len(trainer.optimizers[0].state) == 0)
            self._first_batch = False
        self.events.append(("batch",))

    def on_client_end(self, trainer, pl_module, round, result):
        self.events.append(("client_end", result.client, result.num_samples))
        self.sent[(round.number, result.client)] = ClientUpdate(
            result.client, result.num_samples, trainable_state(pl_module)
        )

    def on_round_end(self, trainer, pl_module, round):
        self.events.append(("round_end", round.number))

    def on_validation_start(self, trainer, pl_module):
        self.events.append(("validation",))
        self.after_round[trainer.current_epoch + 1] = trainable_state(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.events.append(("epoch_end", trainer.current_epoch))


def run(tmp_path, seed=0, rounds=2, clients_per_round=2, local_epochs=2):
    torch.manual_seed(0)
    recorder = Recorder()
    module = tiny_module(Prompt(num_tokens=2), lr=0.05)
    datamodule = tiny_datamodule(num_clients=4, batch_size=128)
    trainer = tiny_trainer(
        tmp_path,
        num_rounds=rounds,
        clients_per_round=clients_per_round,
        local_epochs=local_epochs,
        seed=seed,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, datamodule, recorder


def test_two_rounds_follow_the_documented_hook_order(tmp_path):
    trainer, _module, datamodule, recorder = run(tmp_path)
    expected = []
    for server_round in (1, 2):
        clients = sample_clients(0, server_round, 4, 2)
        expected += [("epoch_start", server_round - 1), ("round_start", server_round, tuple(clients))]
        for client in clients:
            expected.append(("client_start", client))
            expected += [("batch",)] * (2 * datamodule.client_num_batches(client))
            expected.append(("client_end", client, datamodule.client_num_samples(client)))
        expected += [("round_end", server_round), ("validation",), ("epoch_end", server_round - 1)]
    assert recorder.events == expected
    assert trainer.current_epoch == 2
    assert trainer.global_step == sum(e == ("batch",) for e in recorder.events)


def test_every_client_starts_from_the_global_state_with_a_fresh_optimizer(tmp_path):
    _, module, _, recorder = run(tmp_path)
    assert recorder.fresh_optimizer == [True] * 4
    # the server aggregated exactly what the clients sent, and evaluated that
    for server_round in (1, 2):
        updates = [u for (r, _), u in recorder.sent.items() if r == server_round]
        expected = FedAvg().aggregate_fit(server_round, {}, updates)
        for name, tensor in expected.items():
            torch.testing.assert_close(recorder.after_round[server_round][name], tensor)
    # round 2 started from round 1's aggregate
    for name, tensor in recorder.after_round[1].items():
        assert torch.equal(recorder.global_at_round_start[2][name], tensor)
    for name, tensor in trainable_state(module).items():
        assert torch.equal(recorder.after_round[2][name], tensor)


def test_runs_repeat_exactly_for_a_seed_and_differ_across_seeds(tmp_path):
    _, first, _, _ = run(tmp_path / "a", seed=5)
    _, second, _, _ = run(tmp_path / "b", seed=5)
    _, other, _, _ = run(tmp_path / "c", seed=6)
    a, b, c = trainable_state(first), trainable_state(second), trainable_state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_client_sampling_is_seeded_per_round_and_without_replacement():
    rounds = [sample_clients(1, r, 64, 8) for r in range(1, 51)]
    assert rounds == [sample_clients(1, r, 64, 8) for r in range(1, 51)]
    assert all(len(set(c)) == 8 and all(0 <= x < 64 for x in c) for c in rounds)
    assert len({tuple(c) for c in rounds}) > 45
    assert sample_clients(1, 3, 16, 16) == list(range(16))


def test_resuming_from_a_round_end_checkpoint_equals_an_uninterrupted_run(tmp_path):
    def fit(rounds, root, ckpt_path=None):
        torch.manual_seed(0)
        module = tiny_module(Prompt(num_tokens=2), lr=0.05)
        trainer = tiny_trainer(root, num_rounds=rounds, enable_checkpointing=True)
        trainer.fit(module, datamodule=tiny_datamodule(num_clients=4, batch_size=128), ckpt_path=ckpt_path)
        return trainer, module

    _, straight = fit(3, tmp_path / "straight")
    first, _ = fit(2, tmp_path / "interrupted")
    last = first.checkpoint_callback.last_model_path
    resumed_trainer, resumed = fit(3, tmp_path / "interrupted", ckpt_path=last)
    assert resumed_trainer.current_epoch == 3
    assert resumed_trainer.aggregation.cumulative_bytes == 3 * first.aggregation.cumulative_bytes / 2
    a, b = trainable_state(straight), trainable_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_as_a_federated_run_needs_it(tmp_path):
    """No buffer broadcast before every forward (processes train different clients for different numbers
    of steps), unless the user asks for it; read from the arguments Lightning passes to DDP (private)."""
    from lightning.pytorch.strategies import DDPStrategy

    for strategy in ("ddp", "ddp_spawn", DDPStrategy()):
        trainer = tiny_trainer(tmp_path, strategy=strategy, devices=2)
        assert trainer.strategy._ddp_kwargs["broadcast_buffers"] is False, strategy
    trainer = tiny_trainer(tmp_path, strategy=DDPStrategy(broadcast_buffers=True), devices=2)
    assert trainer.strategy._ddp_kwargs["broadcast_buffers"] is True
