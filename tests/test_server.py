"""The server in plain torch: versions, replies against the version they started from, one state object;
aggregators and server optimizers composed; capabilities and the one validator."""

import copy
import math
import subprocess
import sys

import pytest
import torch

from fedpeft_pl.capabilities import PrivacyMechanism, RunParts, check_run, releases_client_statistics
from fedpeft_pl.compression import Codec, Int8
from fedpeft_pl.deploy.secure_aggregation import check_composition, check_resolved_config
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientResult, Plan, Round
from fedpeft_pl.privacy import DPFedAvg
from fedpeft_pl.privacy import releases_client_statistics as trainer_releases
from fedpeft_pl.server import Server
from fedpeft_pl.strategies import (
    Adam,
    ClientUpdate,
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Median,
    ServerSGD,
    Strategy,
    TrimmedMean,
    WeightedMean,
)

CPU = torch.device("cpu")


def a_round(number, clients=(0, 1, 2)):
    plans = {c: Plan(dropped=False, batches=1, straggler=False) for c in clients}
    return Round(number, tuple(clients), plans, tuple(clients))


def reply(client, trained, received, codec, samples=10, version=None):
    payload = codec.encode({k: trained[k] - received[k] for k in trained}, client=client)
    codec.commit(client)
    return ClientResult(client, samples, payload, version=version)


# -- the server ---------------------------------------------------------------------------------


def test_the_server_imports_no_lightning():
    code = "import sys, fedpeft_pl.server; print(any(m.startswith('lightning') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_round_is_one_version_and_its_fedavg_equals_a_hand_computation():
    server = Server(FedAvg())
    server.start({"w": torch.tensor([0.0, 0.0])})
    assert server.version == 0
    first = a_round(1, (0, 1))
    server.begin()
    message = server.configure(first)
    assert message.version == 0
    server.accept(first, ClientResult(0, 10, {"w": torch.tensor([1.0, 2.0])}, version=0), CPU)
    server.accept(first, ClientResult(1, 30, {"w": torch.tensor([5.0, -2.0])}, version=0), CPU)
    assert server.update(first)
    # (10 * [1, 2] + 30 * [5, -2]) / 40 = [4, -1]
    torch.testing.assert_close(server.global_state["w"], torch.tensor([4.0, -1.0]))
    assert server.version == 1 and server.aggregated == 2
    assert server.pending.bytes == {"down": 2 * 8, "up": 2 * 8}
    with pytest.raises(RuntimeError, match="no global version 0 is in flight"):
        server.dispatch(0)


def test_each_reply_is_decoded_against_the_version_its_client_started_from():
    """Two versions in flight (as buffered asynchronous aggregation will have): an update encoded as a change
    from version 0 and one from version 1 each decode to their client's own trained state."""
    codec = Int8()
    server = Server(FedAvg(), upload=Int8())
    old = {"w": torch.tensor([1.0, -1.0, 0.5])}
    server.start(old)
    server.begin()
    server.configure(a_round(1))
    server.version, server.global_state = 1, {"w": torch.tensor([3.0, 3.0, -2.0])}  # a later update moved it
    server.configure(a_round(2))
    new = server.dispatch(1).received
    trained_old = {"w": old["w"] + torch.tensor([0.25, -0.5, 1.0])}
    trained_new = {"w": new["w"] + torch.tensor([-1.0, 0.5, 0.25])}
    stale = server.accept(a_round(2), reply(0, trained_old, old, codec, version=0), CPU)
    fresh = server.accept(a_round(2), reply(1, trained_new, new, codec, version=1), CPU)
    assert (stale.version, fresh.version) == (0, 1)
    torch.testing.assert_close(stale.state["w"], trained_old["w"], atol=0.01, rtol=0)
    torch.testing.assert_close(fresh.state["w"], trained_new["w"], atol=0.01, rtol=0)
    # decoded against the wrong version, the stale update would be off by the versions' difference
    assert (stale.state["w"] - (new["w"] + (trained_old["w"] - old["w"]))).abs().max() > 1


def test_a_non_finite_update_is_left_out_and_too_few_skip_the_round(caplog):
    server = Server(FedAvg(min_clients=2))
    server.start({"w": torch.zeros(2)})
    server.begin()
    first = a_round(1, (0, 1))
    server.configure(first)
    assert server.accept(first, ClientResult(0, 5, {"w": torch.tensor([float("nan"), 0.0])}), CPU) is None
    server.accept(first, ClientResult(1, 5, {"w": torch.ones(2)}), CPU)
    assert not server.update(first)
    assert torch.equal(server.global_state["w"], torch.zeros(2)) and server.aggregated == 0
    assert "client 0 sent NaN or Inf values (in w)" in caplog.text
    assert "fewer than min_clients=2" in caplog.text


def test_processes_pending_updates_merge_in_one_processs_order():
    """Under DDP each process fills its own Pending; gathered whole, every process holds one process's order."""
    whole = a_round(1, (4, 2, 7))
    processes = []
    for share in ((4, 7), (2,)):
        server = Server(FedAvg())
        server.start({"w": torch.zeros(1)})
        server.begin()
        server.configure(whole)
        for client in share:
            server.accept(whole, ClientResult(client, client, {"w": torch.tensor([float(client)])}), CPU)
        processes.append(server)
    parts = [{"pending": s.pending.to_cpu(), "wire": s.wire.bytes, "upload": {}} for s in processes]
    for server in processes:
        server.gather(whole, lambda mine: parts, CPU)
        assert [u.client for u in server.pending.updates] == [4, 2, 7]
        assert server.pending.bytes == {"down": 3 * 4, "up": 3 * 4}
        server.update(whole)
    assert torch.equal(processes[0].global_state["w"], processes[1].global_state["w"])
    # (4 * 4 + 2 * 2 + 7 * 7) / 13
    torch.testing.assert_close(processes[0].global_state["w"], torch.tensor([69 / 13]))


def test_the_servers_whole_state_is_one_object_that_resumes_exactly():
    def run(server, rounds):
        for number in rounds:
            current = a_round(number, (0, 1))
            server.begin()
            server.configure(current)
            for client in (0, 1):
                trained = {"w": server.global_state["w"] + (client + 1) * 0.1 * number}
                server.accept(current, ClientResult(client, 3, {"w": trained["w"]}), CPU)
            server.update(current)

    straight = Server(FedAdam(lr=0.05))
    straight.start({"w": torch.ones(3)})
    run(straight, (1, 2, 3))
    first = Server(FedAdam(lr=0.05))
    first.start({"w": torch.ones(3)})
    run(first, (1, 2))
    saved = copy.deepcopy(first.state_dict())
    assert saved["version"] == 2 and set(saved["strategy"]["server_optimizer"]) == {"m", "v"}
    resumed = Server(FedAdam(lr=0.05))
    resumed.check_resume(saved)
    resumed.load_state_dict(saved)
    resumed.start(dict(first.global_state))
    run(resumed, (3,))
    assert resumed.version == 3 and resumed.cumulative_bytes == straight.cumulative_bytes
    assert torch.equal(resumed.global_state["w"], straight.global_state["w"])
    with pytest.raises(ConfigError, match=r"written with trainer\.aggregation FedAdam, this run has FedAvg"):
        Server(FedAvg()).check_resume(saved)


# -- aggregators and server optimizers, composed ---------------------------------------------------


def updates_of(values, counts=None):
    counts = counts or [1] * len(values)
    return [ClientUpdate(i, n, {"w": torch.tensor(v)}) for i, (v, n) in enumerate(zip(values, counts))]


def test_a_median_fed_to_adam_equals_a_hand_computation():
    strategy = FedAvg(aggregator=Median(), server_optimizer=Adam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01))
    state = {"w": torch.tensor([0.0, 1.0])}
    # median of [1, 5], [2, -3], [100, 2] = [2, 2] -> delta [2, 1]
    result = strategy.aggregate_fit(1, state, updates_of([[1.0, 5.0], [2.0, -3.0], [100.0, 2.0]]))
    m = [0.1 * 2.0, 0.1 * 1.0]
    v = [0.01 * 4.0, 0.01 * 1.0]
    expected = [0.0 + 0.1 * m[0] / (math.sqrt(v[0]) + 0.01), 1.0 + 0.1 * m[1] / (math.sqrt(v[1]) + 0.01)]
    torch.testing.assert_close(result["w"], torch.tensor(expected))
    assert strategy.needs_individual_updates
    assert repr(strategy) == (
        "FedAvg(min_clients=1, aggregator=Median(), server_optimizer=Adam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01))"
    )


def test_a_server_learning_rate_moves_part_of_the_way_to_a_trimmed_mean():
    strategy = FedTrimmedAvg(beta=0.25, server_optimizer=ServerSGD(lr=0.5))
    # trimmed mean of 0, 1, 2, 100 (one cut from each end) = 1.5; halfway from 0.5 = 1.0
    result = strategy.aggregate_fit(1, {"w": torch.tensor([0.5])}, updates_of([[0.0], [1.0], [2.0], [100.0]]))
    assert result["w"].item() == 1.0


def test_the_presets_are_their_two_parts():
    for preset, aggregator, step in (
        (FedAvg(), WeightedMean, ServerSGD),
        (FedAdam(lr=0.01), WeightedMean, Adam),
        (FedMedian(), Median, ServerSGD),
        (FedTrimmedAvg(beta=0.1), TrimmedMean, ServerSGD),
    ):
        assert type(preset.aggregator) is aggregator and type(preset.server_optimizer) is step
    assert repr(FedAdam(lr=0.01)) == "FedAdam(min_clients=1, lr=0.01, beta1=0.9, beta2=0.99, tau=0.001)"
    assert repr(FedMedian()) == "FedMedian(min_clients=1)"
    with pytest.raises(ConfigError):
        ServerSGD(lr=0)


def test_fedavg_with_a_unit_server_step_is_the_weighted_mean_to_the_bit():
    torch.manual_seed(0)
    updates = [ClientUpdate(i, n, {"w": torch.randn(50)}) for i, n in enumerate([3, 17, 8])]
    state = {"w": torch.randn(50)}
    assert torch.equal(FedAvg().aggregate_fit(1, state, updates)["w"], WeightedMean().aggregate(updates, state)["w"])


# -- capabilities and the one validator ----------------------------------------------------------


def test_capabilities_of_the_strategies():
    assert not FedAvg().needs_individual_updates and not FedAdam().needs_individual_updates
    assert FedMedian().needs_individual_updates and FedAvg(aggregator=TrimmedMean()).needs_individual_updates
    assert not DPFedAvg().needs_individual_updates  # its clients clip before masking; the sum suffices

    class OwnServerUpdate(Strategy):
        def aggregate_fit(self, server_round, global_state, updates):
            return global_state

    assert OwnServerUpdate().needs_individual_updates, "an aggregate_fit of its own is read as needing them"


def test_a_privacy_mechanism_withholds_client_statistics_unless_it_declares_otherwise():
    class NewMechanism(PrivacyMechanism):
        pass

    assert releases_client_statistics([object(), FedAvg()])
    assert not releases_client_statistics([FedAvg(), NewMechanism()]), "undeclared: withheld"
    declared = NewMechanism()
    declared.release_client_statistics = True
    assert releases_client_statistics([declared])

    class Trainer:
        callbacks = [type("Server", (), {"strategy": DPFedAvg()})()]

    assert not trainer_releases(Trainer())
    Trainer.callbacks[0].strategy.release_client_statistics = True
    assert trainer_releases(Trainer())


@pytest.mark.parametrize(
    "parts, message",
    [
        (RunParts(strategy=FedMedian(), secure_aggregation=True), "cannot run FedMedian: it needs every client's"),
        (
            RunParts(strategy=FedAvg(aggregator=Median()), secure_aggregation=True),
            "cannot run FedAvg: it needs every client's individual update",
        ),
        (RunParts(strategy=FedAvg(), upload=Int8(), secure_aggregation=True), r"compress_upload \(Int8\)"),
    ],
)
def test_the_validator_refuses_in_one_line(parts, message):
    with pytest.raises(ConfigError, match=message) as refused:
        check_run(parts)
    assert "\n" not in str(refused.value)


def test_what_composes_passes_the_validator():
    check_run(RunParts(strategy=FedAdam(), upload=Codec(), secure_aggregation=True))
    check_run(RunParts(strategy=FedMedian(), upload=Int8()))  # no secure aggregation: anything goes
    check_composition(DPFedAvg, None)


def test_a_resolved_config_is_checked_with_its_nested_parts():
    with pytest.raises(ConfigError, match="cannot run FedAvg: it needs every client's individual update"):
        check_resolved_config(
            {
                "aggregation": {
                    "class_path": "fedpeft_pl.strategies.FedAvg",
                    "init_args": {"aggregator": {"class_path": "fedpeft_pl.strategies.Median"}},
                }
            }
        )
    check_resolved_config(
        {
            "aggregation": {
                "class_path": "fedpeft_pl.strategies.FedAvg",
                "init_args": {
                    "server_optimizer": {"class_path": "fedpeft_pl.strategies.Adam", "init_args": {"lr": 0.01}}
                },
            }
        }
    )
