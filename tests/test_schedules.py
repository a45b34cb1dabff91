"""Schedules on the virtual clock: over-selection and deadlines, FedBuff and FedAsync, their events and their state."""

import math

import pytest
import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer

from fedpeft_pl.clock import Constant, LogNormal, PerClient, VirtualClock
from fedpeft_pl.data import Dirichlet
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientResult, Plan
from fedpeft_pl.hooks import FederatedCallback
from fedpeft_pl.peft import Bias, HetLoRA, trainable_state
from fedpeft_pl.schedules import (
    Constant as NoDiscount,
)
from fedpeft_pl.schedules import (
    FedAsync,
    FedBuff,
    Hinge,
    Polynomial,
    Synchronous,
    Task,
    Timeline,
)
from fedpeft_pl.strategies import FedAdam, Scaffold


def clock(speed=None):
    return VirtualClock(
        speed=speed if speed is not None else LogNormal(50.0, 1.0),
        upload=Constant(1.0e5),
        download=Constant(5.0e5),
        latency=Constant(0.1),
    )


class Replies(FederatedCallback):
    """What each server update took in: the clients whose replies were accepted, and its staleness."""

    def __init__(self):
        self.accepted, self.staleness = [], []

    def on_round_end(self, trainer, pl_module, round):
        pending = trainer.aggregation.server.pending
        self.accepted.append([client for client, _, _ in pending.reports])
        self.staleness.append(list(pending.staleness))


def fit(tmp_path, schedule, runner="sequential", rounds=3, clients=6, per_round=2, speed=None, **kwargs):
    torch.manual_seed(0)
    module = tiny_module(Bias())
    replies = Replies()
    trainer = tiny_trainer(
        tmp_path,
        num_rounds=rounds,
        clients_per_round=per_round,
        clock=clock(speed),
        schedule=schedule,
        client_runner=runner,
        callbacks=[replies, *kwargs.pop("callbacks", [])],
        **kwargs,
    )
    data = tiny_datamodule(num_clients=clients, partition=Dirichlet(alpha=0.5, min_samples=10))
    trainer.fit(module, datamodule=data)
    return trainer, module, replies


# -- the parts, by hand ---------------------------------------------------------------------------


def test_staleness_weights_are_what_their_papers_say():
    assert [Polynomial()(t) for t in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert Polynomial(1.0)(4) == 0.2
    assert [Hinge(slope=10, cutoff=4)(t) for t in (0, 4, 5, 6)] == [1.0, 1.0, 1 / 11, 1 / 21]
    assert NoDiscount()(100) == 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: Polynomial(-1.0),
        lambda: Hinge(slope=-1.0),
        lambda: Synchronous(over_selection=-0.1),
        lambda: Synchronous(deadline=0.0),
        lambda: FedBuff(concurrency=4, buffer_size=5),
        lambda: FedBuff(concurrency=0, buffer_size=0),
        lambda: FedAsync(concurrency=4, mixing=1.5),
    ],
)
def test_bad_settings_are_one_line_config_errors(make):
    with pytest.raises(ConfigError) as error:
        make()
    assert "\n" not in str(error.value)


def test_over_selection_keeps_the_first_arrivals_and_a_deadline_cuts_the_round():
    arrivals = {0: 5.0, 1: 2.0, 2: 9.0, 3: 2.0, 4: 7.0}
    assert Synchronous(over_selection=0.5).cohort(4, 10) == 6
    assert Synchronous(over_selection=0.5).cohort(4, 5) == 5  # never more than the federation
    assert Synchronous(over_selection=0.25).cohort(4, 10) == 5
    assert Synchronous().on_time(arrivals, 3) == ([1, 3, 0], 5.0)  # ties: the lower client first
    assert Synchronous().on_time(arrivals, 9) == ([1, 3, 0, 4, 2], 9.0)  # fewer than m: the last arrival
    assert Synchronous(deadline=6.0).on_time(arrivals, 4) == ([1, 3, 0], 6.0)  # the deadline ends it
    assert Synchronous(deadline=6.0).on_time(arrivals, 2) == ([1, 3], 2.0)  # m arrived before it
    assert Synchronous(deadline=10.0).on_time(arrivals, 9) == ([1, 3, 0, 4, 2], 9.0)  # nobody left to wait for
    assert Synchronous(deadline=1.0).on_time(arrivals, 2) == ([], 1.0)


def test_fedbuff_weights_a_stale_change_from_its_own_start_and_fedasync_mixes_into_the_current_state():
    started, trained, current = {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([10.0])}
    # FedBuff: x + s(tau) * (y - x_v) = 10 + (1 / sqrt(4)) * (3 - 1) = 11
    assert FedBuff(4, 2).reweigh(trained, started, current, 3)["w"].item() == 11.0
    assert FedBuff(4, 2, NoDiscount()).reweigh(trained, started, current, 3)["w"].item() == 12.0
    # FedAsync: x + a * s(tau) * (y - x) = 10 + 0.5 * 0.5 * (3 - 10) = 8.25
    assert FedAsync(4, mixing=0.5).reweigh(trained, started, current, 3)["w"].item() == 8.25
    assert repr(FedAsync(4, mixing=0.5)) == "FedAsync(concurrency=4, mixing=0.5, staleness=Polynomial(exponent=0.5))"


def test_the_timeline_orders_arrivals_breaks_ties_by_dispatch_and_round_trips_its_state():
    timeline = Timeline()
    plan = Plan(False, 3, False, 3)
    for sequence, (client, arrival) in enumerate([(4, 2.0), (1, 1.0), (2, 2.0)]):
        timeline.push(Task(client, 0, 1, sequence, 0.0, arrival, plan))
    timeline.tasks[0].result = ClientResult(1, 7, {"w": torch.ones(2)}, metrics={"steps": 3.0}, version=0)
    copy = Timeline()
    copy.load_state_dict(timeline.state_dict())
    assert [(t.client, t.arrival) for t in copy.tasks] == [(1, 1.0), (4, 2.0), (2, 2.0)]
    assert torch.equal(copy.tasks[0].result.payload["w"], torch.ones(2)) and copy.tasks[0].result.num_samples == 7
    assert copy.pop().client == 1 and copy.now == 1.0
    assert copy.candidates(6) == [0, 3, 5], "a client whose reply is in the buffer waits for the update"
    assert [copy.pop().client for _ in range(2)] == [4, 2] and copy.now == 2.0
    copy.new_version()
    assert copy.candidates(6) == list(range(6))
    assert timeline.candidates(6) == [0, 3, 5]
    picks = [Timeline().choose(seed, [0, 3, 5]) for seed in range(20)]
    assert picks == [Timeline().choose(seed, [0, 3, 5]) for seed in range(20)] and set(picks) == {0, 3, 5}


# -- runs ------------------------------------------------------------------------------------------


def test_synchronous_rounds_without_over_selection_or_deadline_are_the_plain_rounds_to_the_bit(tmp_path):
    _, plain, _ = fit(tmp_path / "a", None)
    _, scheduled, _ = fit(tmp_path / "b", Synchronous())
    a, b = trainable_state(plain), trainable_state(scheduled)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_over_selection_aggregates_the_fastest_and_counts_the_late_in_bytes(tmp_path):
    # even clients compute a thousand times faster: of each round's cohort the even ones arrive first
    speed = PerClient([1.0e4, 10.0])
    trainer, _, replies = fit(tmp_path, Synchronous(over_selection=1.0), per_round=2, speed=speed)
    metrics = trainer.callback_metrics
    assert metrics["round/clients_aggregated"] == 2 and metrics["round/clients_late"] == 2
    for accepted in replies.accepted:
        assert len(accepted) == 2
    assert any(all(c % 2 == 0 for c in accepted) for accepted in replies.accepted)
    # four clients were sent the round's message, two sent their update back
    assert metrics["comm/bytes_down"] == 2 * metrics["comm/bytes_up"]
    assert metrics["comm/bytes_late"] == metrics["comm/bytes_down"] / 2
    server = trainer.aggregation.server
    assert server.round_seconds == max(server.pending.seconds.values())  # the second arrival ends it


@pytest.mark.slow  # a run of twice the cohort
def test_a_deadline_ends_a_round_with_whoever_has_arrived(tmp_path):
    speed = PerClient([1.0e4, 1.0])  # odd clients need minutes; even ones well under a second of compute
    trainer, _, replies = fit(tmp_path, Synchronous(over_selection=1.0, deadline=5.0), per_round=3, speed=speed)
    server = trainer.aggregation.server
    assert all(all(c % 2 == 0 for c in accepted) for accepted in replies.accepted)
    assert trainer.callback_metrics["round/clients_late"] >= 1
    assert server.simulated_seconds <= 3 * 5.0


def test_fedbuff_counts_server_updates_buffers_k_replies_and_weighs_stale_ones(tmp_path, caplog):
    with caplog.at_level("INFO", logger="fedpeft_pl"):
        trainer, _, replies = fit(tmp_path, FedBuff(concurrency=4, buffer_size=2), rounds=4)
    assert trainer.current_epoch == 4
    assert [len(a) for a in replies.accepted] == [2, 2, 2, 2]
    assert max(max(s) for s in replies.staleness) >= 1, "with 4 in flight and 2 per update some replies are stale"
    assert trainer.aggregation.server.version == 4
    assert "replies (staleness mean" in caplog.text and "FedBuff: 4 of 6 clients in flight" in caplog.text
    # the simulated time is the last arrival of the last buffer
    assert trainer.aggregation.server.simulated_seconds == pytest.approx(trainer.fit_loop.timeline.now)


@pytest.mark.slow  # two runs
def test_fedbuff_repeats_exactly_for_a_seed_and_leaves_the_backbone_alone(tmp_path):
    _, first, one = fit(tmp_path / "a", FedBuff(concurrency=4, buffer_size=2))
    _, second, two = fit(tmp_path / "b", FedBuff(concurrency=4, buffer_size=2))
    assert one.accepted == two.accepted and one.staleness == two.staleness
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    fresh = tiny_module(Bias()).state_dict()
    trainable = set(trainable_state(first))
    assert all(torch.equal(a[k], fresh[k]) for k in a if k not in trainable), "the backbone is bit-identical"
    assert any(not torch.equal(a[k], fresh[k]) for k in trainable)


@pytest.mark.slow  # two runs each: about 10 s on 2 idle cores
@pytest.mark.parametrize("schedule", [FedBuff(concurrency=4, buffer_size=2), FedAsync(concurrency=3, mixing=0.6)])
def test_both_runners_end_in_the_same_state_under_asynchronous_schedules(tmp_path, schedule):
    _, sequential, one = fit(tmp_path / "s", schedule, runner="sequential", rounds=4)
    _, vectorised, two = fit(tmp_path / "v", schedule, runner="vectorized", rounds=4)
    assert one.accepted == two.accepted
    a, b = trainable_state(sequential), trainable_state(vectorised)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow  # two runs
def test_fedbuff_composes_with_a_server_optimizer(tmp_path):
    """FedAdam steps on each buffer's weighted mean change: its moments move and the state differs from FedAvg's."""
    trainer, adam, _ = fit(tmp_path / "adam", FedBuff(concurrency=4, buffer_size=2), aggregation=FedAdam(lr=0.01))
    _, plain, _ = fit(tmp_path / "avg", FedBuff(concurrency=4, buffer_size=2))
    moments = trainer.aggregation.strategy.state_dict()["server_optimizer"]
    assert any(torch.count_nonzero(t) for t in moments["m"].values())
    a, b = trainable_state(adam), trainable_state(plain)
    assert all(torch.isfinite(t).all() for t in a.values()) and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": FedBuff(4, 2), "aggregation": Scaffold()}, "FedBuff cannot run Scaffold"),
        ({"schedule": FedBuff(8, 2)}, "concurrency 8 exceeds the federation's 6 clients"),
        ({"schedule": FedBuff(4, 2), "clock": None}, "set trainer.clock too"),
    ],
)
def test_what_a_schedule_cannot_run_is_refused_in_one_line(tmp_path, kwargs, match):
    kwargs = dict(kwargs)
    no_clock = "clock" in kwargs and kwargs.pop("clock") is None
    torch.manual_seed(0)
    trainer = tiny_trainer(
        tmp_path, num_rounds=1, clock=None if no_clock else clock(), client_runner="sequential", **kwargs
    )
    with pytest.raises(ConfigError, match=match) as error:
        trainer.fit(tiny_module(Bias()), datamodule=tiny_datamodule(num_clients=6))
    assert "\n" not in str(error.value)


def test_fedbuff_refuses_per_client_views(tmp_path):
    trainer = tiny_trainer(tmp_path, num_rounds=1, clock=clock(), schedule=FedBuff(2, 1), client_runner="sequential")
    with pytest.raises(ConfigError, match="FedBuff cannot run HetLoRA"):
        trainer.fit(tiny_module(HetLoRA(rank=4, rank_choices=[2, 4])), datamodule=tiny_datamodule(num_clients=4))


@pytest.mark.slow  # three runs with checkpoints
def test_a_fedbuff_run_killed_mid_run_resumes_to_the_same_final_state(tmp_path):
    def run(folder, rounds, ckpt_path=None):
        torch.manual_seed(0)
        module = tiny_module(Bias())
        trainer = tiny_trainer(
            folder,
            num_rounds=rounds,
            clock=clock(),
            schedule=FedBuff(concurrency=4, buffer_size=2),
            client_runner="sequential",
            enable_checkpointing=True,
        )
        data = tiny_datamodule(num_clients=6, partition=Dirichlet(alpha=0.5, min_samples=10))
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return trainer, module

    whole, reference = run(tmp_path / "whole", 4)
    first, _ = run(tmp_path / "cut", 2)
    resumed, module = run(tmp_path / "cut", 4, ckpt_path=first.checkpoint_callback.last_model_path)
    a, b = trainable_state(reference), trainable_state(module)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.aggregation.server.simulated_seconds == whole.aggregation.server.simulated_seconds


@pytest.mark.parametrize("overlay, kind", [("deadline", Synchronous), ("fedbuff", FedBuff), ("fedasync", FedAsync)])
def test_each_schedule_config_composes_on_the_quickstart_and_its_clock(tmp_path, monkeypatch, overlay, kind):
    from pathlib import Path

    from helpers import build_overlay

    monkeypatch.chdir(Path(__file__).parent.parent)
    trainer, _, datamodule = build_overlay(
        tmp_path,
        "trainer: {logger: false}\n",
        "configs/quickstart.yaml",
        "configs/quickstart/clock.yaml",
        f"configs/quickstart/{overlay}.yaml",
    )
    server = trainer.aggregation.server
    assert type(server.schedule) is kind and server.clock is not None
    server.schedule.check(datamodule.num_clients, 8)  # the quickstart's federation can run it


@pytest.mark.slow  # two runs
def test_fedprox_error_feedback_and_a_local_part_keep_their_meaning_under_fedbuff(tmp_path):
    """FedProx pulls towards the version a client started from, an Int8 residual and a personalised local part
    are the client's own from one task to its next: both runners agree, and the local part never travels."""
    from fedpeft_pl.compression import Int8
    from fedpeft_pl.peft import Personalized
    from fedpeft_pl.strategies import FedProx

    def run(runner):
        torch.manual_seed(0)
        module = tiny_module(Personalized(Bias(), local=["head"]))
        trainer = tiny_trainer(
            tmp_path / runner,
            num_rounds=4,
            clock=clock(),
            schedule=FedBuff(concurrency=4, buffer_size=2),
            aggregation=FedProx(mu=0.1),
            compress_upload=Int8(error_feedback=True),
            client_runner=runner,
        )
        trainer.fit(module, datamodule=tiny_datamodule(num_clients=6, partition=Dirichlet(alpha=0.5, min_samples=10)))
        return trainer, trainable_state(module)

    trainer, sequential = run("sequential")
    _, vectorised = run("vectorized")
    assert max((sequential[k] - vectorised[k]).abs().max().item() for k in sequential) < 1e-5
    assert trainer.aggregation.upload._residuals, "each client's residual is kept for its next task"
    own = trainer.fit_loop.client_states.get(next(iter(trainer.aggregation.upload._residuals)))
    assert any(k.startswith("local.") and "head" in k for k in own), "a client's local head is its own state"


def test_a_buffer_holds_one_reply_per_client_even_from_a_very_fast_one(tmp_path):
    speed = PerClient([1.0e6, 5.0, 5.0, 5.0, 5.0, 5.0])  # client 0 would otherwise reply again and again
    _, _, replies = fit(tmp_path, FedBuff(concurrency=3, buffer_size=2), rounds=4, speed=speed)
    assert all(len(set(accepted)) == len(accepted) == 2 for accepted in replies.accepted)
    assert any(0 in accepted for accepted in replies.accepted)


@pytest.mark.slow  # a run and the accountant
def test_central_dp_on_fedbuffs_buffers_is_accounted_without_amplification_by_sampling(tmp_path):
    """Each server update is a Gaussian mechanism on every client (sample rate 1): by hand, RDP of order a is
    T * a / (2 z^2), converted to epsilon as opacus does (Balle et al. 2020), minimised over opacus' orders."""
    from fedpeft_pl.privacy import DPFedAvg

    z, updates, delta = 2.0, 3, 1e-3
    strategy = DPFedAvg(clip_norm=0.5, epsilon=None, noise_multiplier=z, delta=delta, reproducible_noise=True)
    _, module, replies = fit(tmp_path, FedBuff(concurrency=4, buffer_size=2), rounds=updates, aggregation=strategy)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    by_hand = min(
        updates * a / (2 * z**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in orders
    )
    assert strategy.epsilon_spent() == pytest.approx(by_hand, rel=1e-9)
    assert "no amplification by sampling" in strategy.describe()
    assert all(torch.isfinite(t).all() for t in trainable_state(module).values())
    assert [len(a) for a in replies.accepted] == [2] * updates


@pytest.mark.slow  # two runs
def test_a_robust_aggregator_takes_fedbuffs_buffer(tmp_path):
    from fedpeft_pl.strategies import FedMedian

    _, median, replies = fit(tmp_path / "m", FedBuff(concurrency=4, buffer_size=3), aggregation=FedMedian())
    _, mean, same = fit(tmp_path / "a", FedBuff(concurrency=4, buffer_size=3))
    assert [len(a) for a in replies.accepted] == [3, 3, 3] and replies.accepted == same.accepted
    a, b = trainable_state(median), trainable_state(mean)
    assert all(torch.isfinite(t).all() for t in a.values()) and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # four rounds of twice the cohort
def test_dropouts_and_stragglers_compose_with_over_selection(tmp_path):
    """A client that availability drops is sent nothing and is neither late nor aggregated."""
    from fedpeft_pl.availability import ClientAvailability

    trainer, _, replies = fit(
        tmp_path,
        Synchronous(over_selection=1.0),
        per_round=2,
        availability=ClientAvailability(dropout=0.3, stragglers=0.3),
        rounds=4,
    )
    server = trainer.aggregation.server
    metrics = trainer.callback_metrics
    sampled = 4
    assert metrics["round/clients_aggregated"] + metrics["round/clients_late"] + metrics["round/clients_dropped"] == (
        sampled
    )
    per_client = metrics["comm/bytes_up"] / max(1, metrics["round/clients_aggregated"])
    sent = metrics["round/clients_aggregated"] + metrics["round/clients_late"]
    assert metrics["comm/bytes_down"] == pytest.approx(sent * per_client), "the dropped were sent nothing"
    assert all(len(a) <= 2 for a in replies.accepted) and server.version == 4
