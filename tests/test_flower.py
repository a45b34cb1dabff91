"""Deployment with Flower: three SuperNodes, one per partition, two rounds.

A deployed run must end with the global state of the in-process simulation of the same config
(same seed, same client selection), log the same TensorBoard tags and count the same bytes. The
settings run over a loopback grid (``flower_loopback.py``: Flower's messages, serialisation and node
contexts, in this process); the fault test runs a real SuperLink and real SuperNode processes on
127.0.0.1, kills some and restarts them.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from flower_loopback import run_loopback
from test_cli import QUICKSTART, REPO, fedpeft, scalars
from test_distributed import assert_same_rounds, flat

from fedpeft_pl.cli import main
from fedpeft_pl.deploy.local import LocalFederation

pytest.importorskip("flwr", reason='Flower is an optional dependency: pip install -e ".[flower]"')

NUM_NODES = 3


DEPLOYMENTS = {
    # codecs with per-client state on the SuperNode (error-feedback residuals), and a client-side
    # strategy whose extra tensors travel both ways and whose control variates stay on the SuperNode
    "int8-feedback-scaffold": [
        "--trainer.compress_upload",
        "fedpeft_pl.compression.Int8",
        "--trainer.compress_upload.error_feedback",
        "true",
        "--trainer.aggregation",
        "fedpeft_pl.strategies.Scaffold",
        # seed 0 drops client 1 in round 1: the deployment sends it nothing, and the simulation counts nothing
        "--trainer.availability",
        "fedpeft_pl.ClientAvailability",
        "--trainer.availability.dropout",
        "0.3",
    ],
    # a local head kept on each SuperNode, trained alone before the prompts (FedRep's two phases),
    # FedDyn's per-client tensors there too, and per-client evaluation with Flower's evaluate messages
    "feddyn-fedrep": [
        "--config",
        str(REPO / "configs" / "quickstart" / "personal" / "fedrep.yaml"),
        "--trainer.logger.init_args.name",
        "prompt",
        "--trainer.aggregation",
        "fedpeft_pl.strategies.FedDyn",
        "--trainer.aggregation.alpha",
        "0.01",
    ],
    # local DP-SGD on each SuperNode, accounted there: client 1 (sampled in rounds 1 and 2) has spent
    # epsilon 1.66 of 2.0 after round 1, and round 2 would bring it to 2.11, so it declines round 2
    "local-dp": [
        "--trainer.privacy",
        "fedpeft_pl.privacy.LocalDP",
        "--trainer.privacy.epsilon",
        "2.0",
        "--trainer.privacy.noise_multiplier",
        "1.0",
        "--trainer.privacy.reproducible_noise",
        "true",
    ],
    # FLoRA at heterogeneous ranks: each client is sent its own view; client 0 misses round 1 and
    # receives round 1's merged update with its round-2 message
    "flora-hetero-ranks": [
        "--config",
        str(REPO / "configs" / "quickstart" / "beyond" / "flora.yaml"),
        "--trainer.logger.init_args.name",
        "prompt",
        "--model.peft.init_args.rank_choices",
        "null",
        "--model.peft.init_args.client_ranks",
        "{0: 1, 1: 2, 2: 4}",
    ],
}


def write_deployment(tmp_path: Path, capsys, *options: str, rounds: int = 2, per_round: int = 2) -> Path:
    """``fedpeft flower-app`` for the quickstart on three partitions, logging under ``tmp_path/deployed``."""
    app = tmp_path / "app"
    main(
        [
            "flower-app",
            str(app),
            "--config",
            QUICKSTART,
            "--data.num_clients",
            str(NUM_NODES),
            "--trainer.num_rounds",
            str(rounds),
            "--trainer.clients_per_round",
            str(per_round),
            "--trainer.local_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            *options,
            "--model.backbone.weights_file",
            str(REPO / "fedpeft_pl" / "assets" / "vit_pico_mnist.safetensors"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "deployed"),
        ]
    )
    assert "wrote the Flower app" in capsys.readouterr().out
    return app


def simulate(app: Path, save_dir: Path, capsys) -> Path:
    """The same experiment as one ``fedpeft fit`` (in this process); its log folder."""
    main(["fit", "--config", str(app / "fedpeft.yaml"), "--trainer.logger.init_args.save_dir", str(save_dir)])
    capsys.readouterr()
    return save_dir / "prompt" / "version_0"


@pytest.mark.parametrize(
    "setting",
    # one setting in the fast tier, the others (about 10 s each) in the slow one
    [s if s == "int8-feedback-scaffold" else pytest.param(s, marks=pytest.mark.slow) for s in sorted(DEPLOYMENTS)],
)
def test_a_deployment_on_flower_reaches_the_simulations_state(tmp_path, capsys, setting):
    """Over a loopback grid (``flower_loopback.py``): Flower's messages, serialisation and node contexts,
    a fresh ClientApp for every message; the real processes are in the fault test below."""
    app = write_deployment(tmp_path, capsys, *DEPLOYMENTS[setting])
    assert {p.name for p in app.iterdir()} == {"pyproject.toml", "fedpeft_app.py", "fedpeft.yaml"}
    grid = run_loopback(app, NUM_NODES)
    assert grid.messages >= NUM_NODES + 4  # the partition queries, then two rounds of two clients
    deployed_dir = tmp_path / "deployed" / "prompt" / "version_0"
    assert (deployed_dir / "checkpoints" / "round=2.ckpt").is_file()
    simulated_dir = simulate(app, tmp_path / "simulated", capsys)

    deployed = torch.load(deployed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    reference = torch.load(simulated_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert deployed["state_dict"].keys() == reference["state_dict"].keys()
    for name, tensor in reference["state_dict"].items():
        torch.testing.assert_close(deployed["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    deployed_logs, simulated_logs = scalars(deployed_dir), scalars(simulated_dir)
    if setting == "local-dp":
        # the client that declines round 2 was sent its message (the simulation's server sends it nothing)
        for tag in ("comm/bytes_down", "comm/cumulative_bytes"):
            assert deployed_logs[tag][0] == simulated_logs[tag][0], tag
            assert deployed_logs[tag][1][1] > simulated_logs[tag][1][1], tag
            deployed_logs[tag] = simulated_logs[tag]
    assert_same_rounds(deployed_logs, simulated_logs, rounds=2)
    if setting == "local-dp":
        assert [v for _, v in deployed_logs["round/clients_dropped"]] == [0, 1]
        assert [v for _, v in deployed_logs["round/clients_aggregated"]] == [2, 1]
        # the epsilon the server logs is what the clients' own accountants report
        for tag in ("privacy/client_epsilon_max", "privacy/client_epsilon_mean"):
            assert [s for s, _ in deployed_logs[tag]] == [1, 2], tag
            for (_, value), (_, expected) in zip(deployed_logs[tag], simulated_logs[tag]):
                assert value == pytest.approx(expected, rel=1e-9), tag
        assert max(v for _, v in deployed_logs["privacy/client_epsilon_max"]) <= 2.0
        return
    if setting == "flora-hetero-ranks":
        # FLoRA's merged update lives in the server's state, outside the module's state_dict
        merged = deployed["callbacks"]["ServerAggregation"]["peft"]["merged"]
        expected = reference["callbacks"]["ServerAggregation"]["peft"]["merged"]
        assert any(float(m.abs().max()) > 0 for m in expected)
        for got, want in zip(merged, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    if setting == "feddyn-fedrep":
        for tag in ("clients/acc_mean", "clients/acc_p10", "comm/bytes_eval_down"):
            assert [step for step, _ in deployed_logs[tag]] == [1, 2], tag
            for (_, value), (_, expected) in zip(deployed_logs[tag], simulated_logs[tag]):
                assert value == pytest.approx(expected, abs=1e-6), tag
    else:
        assert [v for _, v in deployed_logs["round/clients_dropped"]] == [1, 0]
    # the deployment logs the sizes of the real messages it sent and received (FlowerRunner); the
    # simulation, the messages it would have sent: the same bytes in each direction, every round
    for tag in ("comm/wire_bytes_down", "comm/wire_bytes_up"):
        assert deployed_logs[tag] == simulated_logs[tag], tag
        assert all(value > 0 for _, value in deployed_logs[tag]), tag


def test_secure_aggregation_gives_the_server_only_the_mean(tmp_path, capsys):
    """Flower's SecAgg+ over the loopback grid: one client drops out mid-protocol in each round.

    The server is handed only means of at least two clients (recorded by a probe on the server),
    none equal to one client's update; round 1's mean equals the simulation's sample-weighted
    mean of the same clients' updates within SecAgg+'s quantisation error, and the run ends near
    the simulation's state.
    """
    from fedpeft_pl.availability import ClientAvailability

    dropout, rounds, clipping, levels = 0.4, 2, 1.0, 2**22
    plans = [[ClientAvailability(dropout=dropout).plan(0, r, c, 1).dropped for c in range(NUM_NODES)] for r in (1, 2)]
    assert all(sum(p) == 1 for p in plans), plans  # one dropout a round, two clients left: the threshold
    app = write_deployment(
        tmp_path,
        capsys,
        "--trainer.availability",
        "fedpeft_pl.ClientAvailability",
        "--trainer.availability.dropout",
        str(dropout),
        "--trainer.callbacks+=secagg_probe.RecordResults",
        "--secure-aggregation",
        "--num-shares",
        "3",
        "--reconstruction-threshold",
        "2",
        "--clipping-range",
        str(clipping),
        rounds=rounds,
        per_round=NUM_NODES,
    )
    assert "secure-aggregation = true" in (app / "pyproject.toml").read_text()
    run_loopback(app, NUM_NODES)
    deployed_dir = tmp_path / "deployed" / "prompt" / "version_0"
    assert (deployed_dir / "checkpoints" / "last.ckpt").is_file()
    # the clients' steps are counted, so Lightning writes the round checkpoints a resume starts from
    assert (deployed_dir / "checkpoints" / f"round={rounds}.ckpt").is_file()
    simulated_dir = simulate(app, tmp_path / "simulated", capsys)

    seen = torch.load(deployed_dir / "results.pt")  # everything the server was handed
    individual = torch.load(simulated_dir / "results.pt")
    assert [(r, agg) for r, _, _, agg, _ in seen] == [(1, (0, 2)), (2, (0, 1))]
    assert all(not agg for *_, agg, _ in individual)
    # round 1 starts from the same state in both runs: the mean is exact up to SecAgg+'s rounding
    _, _, samples, clients, mean = seen[0]
    mine = [(n, p) for r, c, n, _, p in individual if r == 1 and c in clients]
    expected = {k: sum(n * p[k].double() for n, p in mine) / samples for k in mean}
    weight = sum(n for n, _ in mine) / 1000.0  # the sum of the clients' SecAgg+ weights (max_weight 1000)
    # one quantisation step per client over the total weight, and the float32 rounding of the result
    bound = len(mine) * 2 * clipping / levels / weight + 4 * torch.finfo(torch.float32).eps * max(
        float(e.abs().max()) for e in expected.values()
    )
    error = max(float((mean[k].double() - expected[k]).abs().max()) for k in mean)
    assert error <= bound, (error, bound)
    for server_round, _, samples, clients, mean in seen:
        mine = [(n, p) for r, c, n, _, p in individual if r == server_round and c in clients]
        assert samples == sum(n for n, _ in mine)
        for _, update in mine:  # the server never holds one client's update
            assert max(float((mean[k] - update[k]).abs().max()) for k in mean) > 100 * bound
    deployed = torch.load(deployed_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    reference = torch.load(simulated_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, tensor in reference.items():  # round 2 trains from a state that differs by the rounding above
        torch.testing.assert_close(deployed[name], tensor, rtol=0, atol=1e-4, msg=name)
    deployed_logs, simulated_logs = scalars(deployed_dir), scalars(simulated_dir)
    for tag in ("comm/bytes_down", "comm/bytes_up", "round/clients_aggregated", "round/clients_dropped"):
        assert deployed_logs[tag] == simulated_logs[tag], tag
    # the wire bytes are the protocol's messages: keys, shares and masked int64 vectors, also to and
    # from the client that drops out mid-protocol; more each way than the plain messages of the simulation
    for tag in ("comm/wire_bytes_down", "comm/wire_bytes_up"):
        assert [r for r, _ in deployed_logs[tag]] == [r for r, _ in simulated_logs[tag]], tag
        for (_, secure), (_, plain) in zip(deployed_logs[tag], simulated_logs[tag]):
            assert secure > plain > 0, (tag, secure, plain)
    print(f"secure aggregation: round-1 error {error:.2e} (bound {bound:.2e})")


@pytest.mark.slow
def test_distributed_dp_under_secure_aggregation_equals_its_simulation_and_noises_the_sum(tmp_path, capsys):
    """DistributedDP over the loopback grid, reproducible noise, one client dropping out mid-protocol each round.

    Each client clips, rotates, rounds and noises its update into integers before SecAgg+ masks them; the server
    is handed only the decoded noised sum of the two survivors, never one client's update: it differs from every
    client's trained state by noise of the expected scale (the survivors' shares, ``z c sqrt(2 / 3)``); and with
    reproducible noise the run ends where its simulation does (the same integer vectors, summed without masks).
    """
    from fedpeft_pl.availability import ClientAvailability

    dropout, rounds, z = 0.4, 2, 0.05
    plans = [[ClientAvailability(dropout=dropout).plan(0, r, c, 1).dropped for c in range(NUM_NODES)] for r in (1, 2)]
    assert all(sum(p) == 1 for p in plans), plans
    app = write_deployment(
        tmp_path,
        capsys,
        "--trainer.availability",
        "fedpeft_pl.ClientAvailability",
        "--trainer.availability.dropout",
        str(dropout),
        "--trainer.client_sampling",
        "poisson",
        "--trainer.aggregation",
        "fedpeft_pl.privacy.DistributedDP",
        "--trainer.aggregation.epsilon",
        "null",
        "--trainer.aggregation.noise_multiplier",
        str(z),
        "--trainer.aggregation.reproducible_noise",
        "true",
        "--trainer.callbacks+=secagg_probe.RecordResults",
        "--secure-aggregation",
        "--num-shares",
        "3",
        "--reconstruction-threshold",
        "2",
        rounds=rounds,
        per_round=NUM_NODES,
    )
    run_loopback(app, NUM_NODES)
    deployed_dir = tmp_path / "deployed" / "prompt" / "version_0"
    simulated_dir = simulate(app, tmp_path / "simulated", capsys)
    seen = torch.load(deployed_dir / "results.pt")
    individual = torch.load(simulated_dir / "results.pt")
    assert [(r, agg) for r, _, _, agg, _ in seen] == [(1, (0, 2)), (2, (0, 1))]
    for server_round, _, _, clients, handed in seen:
        for r, c, _, _, trained in individual:
            if r == server_round and c in clients:  # the noise of two of three shares, on every coordinate
                gap = torch.cat([(handed[k].double() - trained[k].double()).flatten() for k in handed])
                assert 0.6 * z * (2 / 3) ** 0.5 < float(gap.std()) < 1.5 * z * (2 / 3) ** 0.5 + 0.05, float(gap.std())
    deployed = torch.load(deployed_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    reference = torch.load(simulated_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, tensor in reference.items():  # only float32 rounding of the decoded sum differs
        torch.testing.assert_close(deployed[name], tensor, rtol=0, atol=1e-5, msg=name)
    deployed_logs, simulated_logs = scalars(deployed_dir), scalars(simulated_dir)
    for tag in ("privacy/epsilon", "privacy/noise_clients", "privacy/noise_shares", "round/clients_aggregated"):
        assert deployed_logs[tag] == simulated_logs[tag], tag
    assert [v for _, v in deployed_logs["privacy/noise_clients"]] == [2.0, 2.0]


@pytest.fixture
def serverapp_process(monkeypatch):
    """The task identity Flower's runtime gives a ServerApp process; Messages need it."""
    from flwr.supercore.task_identity import TaskIdentity

    for attribute, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attribute, value)


class FakeGrid:
    """Answers the server's partition queries as SuperNodes with the given node configs would."""

    def __init__(self, partitions: dict[int, tuple[int, int]]) -> None:
        self.partitions = partitions
        self.batches: list[int] = []  # the number of queries each send_and_receive carried

    def get_node_ids(self):
        return list(self.partitions)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, Message, RecordDict

        replies = []
        self.batches.append(len(messages))
        for message in messages:
            pid, count = self.partitions[message.metadata.dst_node_id]
            record = ConfigRecord({"partition-id": pid, "num-partitions": count})
            replies.append(Message(RecordDict({"partition": record}), reply_to=message))
        return replies


def test_the_server_maps_partitions_to_supernodes(serverapp_process):
    from fedpeft_pl.deploy.flower import discover_clients
    from fedpeft_pl.errors import ConfigError

    assert discover_clients(FakeGrid({11: (1, 2), 22: (0, 2)}), 2, timeout=5) == {0: 22, 1: 11}
    # query-batch: a few SuperNodes at a time (each query starts a ClientApp process on its node)
    grid = FakeGrid({10 + i: (i, 5) for i in range(5)})
    assert discover_clients(grid, 5, timeout=5, batch=2) == {i: 10 + i for i in range(5)}
    assert grid.batches == [2, 2, 1]
    grid = FakeGrid({10 + i: (i, 5) for i in range(5)})
    discover_clients(grid, 5, timeout=5)
    assert grid.batches == [5]
    with pytest.raises(ConfigError, match="query-batch must be >= 0"):
        discover_clients(grid, 5, timeout=5, batch=-1)


@pytest.mark.parametrize(
    "partitions, message",
    [
        ({11: (0, 2), 22: (0, 2)}, "two SuperNodes have partition-id=0"),
        ({11: (0, 3), 22: (1, 3)}, "has num-partitions=3 but data.num_clients is 2"),
        ({11: (0, 2), 22: (5, 2)}, r"no SuperNode answered for partition\(s\) \[1\]"),
        ({11: (0, 2)}, "1 SuperNode\\(s\\) connected within 0.2 s, but data.num_clients is 2"),
    ],
    ids=["doubled", "other-count", "missing", "too-few"],
)
def test_a_wrong_federation_is_one_clear_error(partitions, message, serverapp_process):
    from fedpeft_pl.deploy.flower import discover_clients
    from fedpeft_pl.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        discover_clients(FakeGrid(partitions), 2, timeout=0.2)


def test_local_dp_under_secure_aggregation_is_refused(tmp_path):
    from fedpeft_pl.deploy.secure_aggregation import SecureAggregation
    from fedpeft_pl.deploy.writer import write_app
    from fedpeft_pl.errors import ConfigError

    args = ["--config", QUICKSTART, "--trainer.privacy", "fedpeft_pl.privacy.LocalDP", "--trainer.logger", "false"]
    with pytest.raises(ConfigError, match=r"secure aggregation cannot run with local DP"):
        write_app(tmp_path / "app", args, secure_aggregation=SecureAggregation())
    assert not (tmp_path / "app").exists()


@pytest.mark.slow  # processes: the console script
def test_flower_app_mistakes_exit_2_with_one_line(tmp_path):
    result = fedpeft("flower-app", cwd=tmp_path)
    assert result.returncode == 2 and "usage: fedpeft flower-app DIR" in result.stderr
    result = fedpeft(
        "flower-app", str(tmp_path / "app"), "--config", QUICKSTART, "--trainer.num_round", "x", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fedpeft: error: ")
    assert not (tmp_path / "app").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a SuperNode's missed heartbeats take a minute; four rounds and a restart
def test_a_deployment_survives_losing_a_supernode_and_its_server(tmp_path, capsys):
    """Faults on loopback with real processes, in one run of 4 rounds (SCAFFOLD, local DP, reproducible noise).

    Rounds sample [1, 2], [0, 1], [0, 1], [0, 2]. Partition 1's SuperNode is killed (SIGKILL) as round 1
    ends and restarted at once: round 2 goes on without client 1, which comes back in round 3 with the
    control variate and DP accountant it kept on disk (node config state-dir). The ServerApp is killed
    as round 3 ends; ``flwr run`` with ``resume=true`` runs round 4 from the round-3 checkpoint, and
    clients 0 and 2 continue from their disk state in the new Flower run. The result equals a
    simulation in which client 1 drops out of round 2; every round is logged once.
    """
    rounds = 4
    # the app names a callback of the tests (fault_probe.DropClients)
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(Path(__file__).parent)) if p)
    running = LocalFederation(tmp_path / "federation", NUM_NODES, state_dirs=True, env={"PYTHONPATH": path})
    app = write_deployment(
        tmp_path,
        capsys,
        "--trainer.aggregation",
        "fedpeft_pl.strategies.Scaffold",
        "--trainer.privacy",
        "fedpeft_pl.privacy.LocalDP",
        "--trainer.privacy.epsilon",
        "null",
        "--trainer.privacy.noise_multiplier",
        "1.0",
        "--trainer.privacy.reproducible_noise",
        "true",
        "--trainer.callbacks+=fault_probe.DropClients",
        rounds=rounds,
    )
    deployed_dir = tmp_path / "deployed" / "prompt" / "version_0"
    checkpoints = deployed_dir / "checkpoints"
    try:
        running.up()
        submitted = running.run(app, stream=False)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
        running.wait_for_round(checkpoints, 1)
        running.kill_node(1)
        running.start_node(1)
        running.wait_for_round(checkpoints, 3)
        running.kill_serverapp()
        assert not (checkpoints / "round=4.ckpt").exists(), "round 4 ended before the ServerApp was killed"
        result = running.run(app, "--run-config", "resume=true")
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:] + running.logs()
        running.wait_for_round(checkpoints, 4, timeout=30)
    finally:
        running.down()
    node_files = sorted(p.name for p in (running.root / "node-1").rglob("round-*.npz"))
    assert node_files == ["round-1.npz", "round-3.npz"], node_files  # client 1 wrote rounds 1 and 3, nothing twice

    simulated = fedpeft(
        "fit",
        "--config",
        str(app / "fedpeft.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "simulated"),
        env={"PYTHONPATH": running.env["PYTHONPATH"], "FEDPEFT_TEST_DROP": "2:1"},
    )
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    simulated_dir = tmp_path / "simulated" / "prompt" / "version_0"
    deployed = torch.load(checkpoints / "last.ckpt", weights_only=False)
    reference = torch.load(simulated_dir / "checkpoints" / "last.ckpt", weights_only=False)
    for name, tensor in reference["state_dict"].items():
        torch.testing.assert_close(deployed["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # SCAFFOLD's server control variate, too
    strategy = flat(deployed["callbacks"]["ServerAggregation"]["strategy"])
    expected_strategy = flat(reference["callbacks"]["ServerAggregation"]["strategy"])
    assert strategy.keys() == expected_strategy.keys() and strategy
    for name, value in expected_strategy.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(strategy[name], value, rtol=1e-5, atol=1e-6, msg=name)
    deployed_logs, simulated_logs = scalars(deployed_dir), scalars(simulated_dir)
    for tag, values in deployed_logs.items():  # every round once, across the two ServerApps
        if tag.startswith(("round/", "server/", "privacy/")) and tag != "server/acc_vs_cumulative_bytes":
            assert [step for step, _ in values] == list(range(1, rounds + 1)), tag
    # client 1 failed in round 2 where the simulation had it drop out; the same clients were aggregated
    assert [v for _, v in deployed_logs["round/clients_failed"]] == [0, 1, 0, 0]
    assert [v for _, v in simulated_logs["round/clients_dropped"]] == [0, 1, 0, 0]
    assert deployed_logs["round/clients_aggregated"] == simulated_logs["round/clients_aggregated"]
    # client 1's accountant survived its SuperNode's restart, the others' the ServerApp's
    for tag in ("privacy/client_epsilon_max", "privacy/client_epsilon_mean", "server/acc"):
        for (_, value), (_, expected) in zip(deployed_logs[tag], simulated_logs[tag]):
            assert value == pytest.approx(expected, rel=1e-6, abs=1e-6), tag


def test_a_node_keeps_each_clients_state_on_disk_by_round(tmp_path):
    """NodeStore with a state-dir: one file per round, the newest earlier round is read (also when the
    server repeats a round after a resume), a restarted node reads what it wrote, nothing half-written."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedpeft_pl.deploy.flower import NodeStore

    def context(**config):
        state = RecordDict({"fedpeft.run": ConfigRecord({"key": "abc"})})
        return Context(run_id=7, node_id=1, node_config=config, state=state, run_config={})

    node = context(**{"partition-id": 2, "state-dir": str(tmp_path)})
    assert NodeStore(node, 2, 1).load() == {"own": {}, "residual": None, "accountant": {}}
    NodeStore(node, 2, 1).save({"c": torch.ones(2)}, None, {"sigma": 1.0, "history": [[1.0, 0.1, 3]]})
    third = NodeStore(node, 2, 3)
    assert third.load()["own"]["c"].tolist() == [1.0, 1.0]
    third.save({"c": torch.full((2,), 3.0)}, {"r": torch.zeros(1)}, {})
    again = NodeStore(node, 2, 3).load()  # round 3 once more, after the ServerApp resumed at round 3
    assert again["own"]["c"].tolist() == [1.0, 1.0] and again["accountant"]["history"] == [[1.0, 0.1, 3]]
    restarted = context(**{"partition-id": 2, "state-dir": str(tmp_path)})  # a new process, empty memory
    fourth = NodeStore(restarted, 2, 4)
    assert fourth.load()["own"]["c"].tolist() == [3.0, 3.0]
    fourth.save({"c": torch.full((2,), 4.0)}, None, {})
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["abc/client-2/round-3.npz", "abc/client-2/round-4.npz"]  # round 1 is never read again
    assert not node.state.get("fedpeft.client-state")  # on disk, not in the context

    memory = context(**{"partition-id": 2})  # without a state-dir: the node's context
    NodeStore(memory, 2, 1).save({"c": torch.ones(1)}, None, {"sigma": 2.0, "history": []})
    kept = NodeStore(memory, 2, 2).load()
    assert kept["own"]["c"].tolist() == [1.0] and kept["accountant"]["sigma"] == 2.0


def test_a_clients_own_accountant_travels_and_declines_a_spent_budget():
    """LocalDP as a deployed client runs it: the accountant moves in and out as plain numbers, and a
    round that would exceed the budget raises ClientDropped before any noise is drawn."""
    from types import SimpleNamespace

    from fedpeft_pl.hooks import ClientDropped
    from fedpeft_pl.privacy import LocalDP

    def client_dp():
        dp = LocalDP(epsilon=2.0, noise_multiplier=1.0, reproducible_noise=True)
        dp._datamodule = SimpleNamespace(
            batch_size=32, client_num_samples=lambda c: 508, client_num_batches=lambda c: 16
        )
        dp._federation = SimpleNamespace(local_epochs=1, seed=0, num_rounds=2, clients_per_round=2, num_clients=3)
        return dp

    first = client_dp()
    first.begin(1, server_round=1)
    first.end(1, server_round=1)
    stored = json.loads(json.dumps(first.client_accountant(1)))  # as the node keeps it
    second = client_dp()  # the next round's ClientApp process
    second.load_client_accountant(1, stored)
    assert second.spent(1) == pytest.approx(first.spent(1)) and 1.6 < second.spent(1) < 2.0
    with pytest.raises(ClientDropped, match="privacy budget is spent"):
        second.begin(1, server_round=2)
    fresh = client_dp()
    fresh.load_client_accountant(1, {})
    assert fresh.spent(1) == 0.0


def test_a_rounds_end_is_its_checkpoint_with_a_complete_last_ckpt_after_it(tmp_path):
    from fedpeft_pl.deploy.local import rounds_ended

    federation = LocalFederation(tmp_path / "federation", 1)  # nothing started: only the waiting is tested
    assert rounds_ended(tmp_path) == 0
    (tmp_path / "round=2.ckpt").write_bytes(b"x")
    assert rounds_ended(tmp_path) == 0, "no last.ckpt yet: round 2 is still being saved"
    os.utime(tmp_path / "round=2.ckpt", (1000, 1000))
    (tmp_path / "last.ckpt").write_bytes(b"checkpoint")
    assert rounds_ended(tmp_path) == 2
    (tmp_path / "round=3.ckpt").write_bytes(b"x")  # newer than last.ckpt: round 3 is being saved
    assert rounds_ended(tmp_path) == 2
    federation.wait_for_round(tmp_path, 2, timeout=5)
    with pytest.raises(TimeoutError, match=r"round 3 did not end within 0\.5 s"):
        federation.wait_for_round(tmp_path, 3, timeout=0.5)


@pytest.mark.slow  # real time: a task waits out its reply timeout
def test_fedbuff_on_flower_keeps_its_tasks_in_flight_through_a_dying_node_and_stray_replies(tmp_path, capsys):
    """FedBuff as a ServerApp over the loopback grid, in real time: two tasks in flight among three SuperNodes of
    unequal delays, one of which dies with its first task; a reply to a message of no task of this server and a
    reply delivered twice are left out; every server update takes exactly its buffer."""
    app = write_deployment(
        tmp_path,
        capsys,
        "--trainer.schedule",
        "fedpeft_pl.schedules.FedBuff",
        "--trainer.schedule.concurrency",
        "2",
        "--trainer.schedule.buffer_size",
        "1",
        rounds=4,
    )
    grid = run_loopback(
        app,
        NUM_NODES,
        run_config={"reply-timeout": 2.0},
        node_configs={0: {"delay": 0.0}, 1: {"delay": 0.2}, 2: {"die-after": 0}},
        stray=True,
    )
    err = capsys.readouterr().err
    logs = scalars(tmp_path / "deployed" / "prompt" / "version_0")
    assert [v for _, v in logs["round/clients_aggregated"]] == [1, 1, 1, 1]
    assert sum(v for _, v in logs["round/clients_failed"]) >= 1, "the dead SuperNode's task failed"
    assert "which this server is not waiting for, is left out" in err
    assert "client 2 failed and is left out of this round: RuntimeError: no reply within 2 s" in err
    assert grid.pulled >= 4 + 2  # four buffers' replies, the stray and the duplicate
    assert "async/staleness_max" in logs
    assert (tmp_path / "deployed" / "prompt" / "version_0" / "checkpoints" / "round=4.ckpt").is_file()


@pytest.mark.slow  # a deployment and two simulations
def test_a_supernode_made_an_attacker_by_its_node_config_acts_as_in_the_simulation(tmp_path, capsys):
    """A backdoor with model-replacement scaling, played by partition 0's SuperNode from its node config
    (poisoned samples while it trains, its update scaled before it is sent): the deployment ends where the
    simulation with ``trainer.attack`` on client 0 ends."""
    attack = "class_path: fedpeft_pl.attacks.Backdoor\ninit_args: {target: 1, patch: 4, boost: 3.0, clients: [0]}\n"
    (tmp_path / "attack.yaml").write_text(attack)
    app = write_deployment(tmp_path, capsys)
    run_loopback(app, NUM_NODES, node_configs={0: {"attack": str(tmp_path / "attack.yaml")}})
    (tmp_path / "overlay.yaml").write_text(
        "trainer:\n  attack:\n" + "".join(f"    {line}\n" for line in attack.split("\n"))
    )
    main(
        [
            "fit",
            "--config",
            str(app / "fedpeft.yaml"),
            "--config",
            str(tmp_path / "overlay.yaml"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "simulated"),
        ]
    )
    capsys.readouterr()
    deployed = torch.load(tmp_path / "deployed/prompt/version_0/checkpoints/last.ckpt", weights_only=False)
    simulated_dir = tmp_path / "simulated/prompt/version_0"
    reference = torch.load(simulated_dir / "checkpoints/last.ckpt", weights_only=False)
    for name, tensor in reference["state_dict"].items():
        torch.testing.assert_close(deployed["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    logged = scalars(simulated_dir)
    assert sum(v for _, v in logged["attack/malicious_updates"]) >= 1  # client 0 took part and attacked
    assert "attack/success_rate" in logged
    honest = simulate(app, tmp_path / "honest", capsys)
    clean = torch.load(honest / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert any(not torch.equal(clean[n], t) for n, t in reference["state_dict"].items())


@pytest.mark.slow  # seven SuperNodes over the loopback grid
def test_a_deployed_server_refuses_the_replies_it_cannot_trust(tmp_path, capsys):
    """Six of seven SuperNodes answer with a broken reply each: unknown tensors, a wrong shape, a wrong dtype, NaN,
    an absurd sample count, an oversized message. Each is refused with one line naming the client (and, where
    the wire check refuses it, the node), the round goes on with the honest one, and nothing of the broken
    replies reaches the global state."""
    import numpy as np
    from flower_loopback import LoopbackGrid, load_app
    from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    def arrays(reply, change):
        return ArrayRecord({k: Array(change(np.asarray(a.numpy()))) for k, a in reply.content["arrays"].items()})

    breakages = [
        ("does not fit", lambda r: {"arrays": ArrayRecord({"evil": Array(np.zeros(3, np.float32))})}),
        ("does not fit", lambda r: {"arrays": arrays(r, lambda a: a.reshape(-1)[:-1].copy())}),
        ("does not fit", lambda r: {"arrays": arrays(r, lambda a: a.astype(np.float64))}),
        ("NaN", lambda r: {"arrays": arrays(r, lambda a: np.full_like(a, np.nan))}),
        (
            "1,000,000,000,000 samples",
            lambda r: {"metrics": MetricRecord({**r.content["metrics"], "num-examples": 10**12})},
        ),
        ("bytes, more than", lambda r: {"extras": ArrayRecord({"pad": Array(np.zeros(1 << 21, np.float64))})}),
    ]
    nodes = len(breakages) + 1
    app_dir = write_deployment(tmp_path, capsys, "--data.num_clients", str(nodes), rounds=1, per_round=nodes)
    app = load_app(app_dir)

    def client(message, context):
        reply = app.client(message, context)
        partition = int(context.node_config["partition-id"])
        if message.metadata.message_type != "train" or partition >= len(breakages) or reply.has_error():
            return reply
        content = {key: reply.content[key] for key in reply.content.keys()}
        content.update(breakages[partition][1](reply))
        return type(reply)(RecordDict(content), reply_to=message)

    settings = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    grid = LoopbackGrid(client, nodes, None, settings)
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
    try:
        app.server(grid, Context(1, 0, {}, RecordDict(), settings))
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    captured = capsys.readouterr()
    console = (captured.out + captured.err).splitlines()
    for partition, (what, _) in enumerate(breakages):
        lines = [line for line in console if f"client {partition} " in line and "trained on" not in line]
        assert len(lines) == 1 and what in lines[0], (partition, lines)
        if "refused" in lines[0]:
            assert f"SuperNode {1000 + partition}" in lines[0]
    logged = scalars(tmp_path / "deployed" / "prompt" / "version_0")
    assert [v for _, v in logged["round/clients_aggregated"]] == [1]
    state = torch.load(tmp_path / "deployed/prompt/version_0/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


def test_the_serverapp_pulls_replies_at_its_own_interval_and_gives_up_at_the_timeout():
    """Flower's grid waits 3 s between two pulls of a round's replies; PollingGrid waits its interval."""
    import time
    from types import SimpleNamespace

    from fedpeft_pl.deploy.polling import PollingGrid

    class SlowNodes:  # replies come 0.3 s after the push, from one node only
        def __init__(self):
            self.pulls = 0

        def push_messages(self, messages):
            self.pushed = time.monotonic()
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            ready = time.monotonic() - self.pushed >= 0.3 and "m0" in ids
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m0"))] if ready else []

        def get_node_ids(self):
            return [1, 2]

    nodes = SlowNodes()
    grid = PollingGrid(nodes, interval=0.05)
    replies = grid.send_and_receive(["to node 1"], timeout=30)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert nodes.pulls >= 3  # pulled every 0.05 s; Flower's grid would have pulled twice, 3 s apart
    replies = grid.send_and_receive(["to node 1", "to node 2"], timeout=0.5)  # m1 never comes
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.get_node_ids() == [1, 2]  # the rest is Flower's grid
    with pytest.raises(ValueError, match="pull-interval must be > 0"):
        PollingGrid(nodes, interval=0)

    class Echoes(SlowNodes):  # each reply twice, and a reply to a message nobody sent (an earlier ServerApp's)
        def pull_messages(self, ids):
            reply = lambda to: SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to))  # noqa: E731
            return [reply("m0"), reply("m0"), reply("stale"), reply("m1"), reply("m1")]

    replies = PollingGrid(Echoes(), interval=0.05).send_and_receive(["to node 1", "to node 2"], timeout=5)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m1"]  # each message's first reply


def test_a_local_federation_sets_the_superexecs_task_poll_unless_the_environment_does(tmp_path, monkeypatch):
    from fedpeft_pl.deploy.local import TASK_POLL_ENV

    monkeypatch.delenv(TASK_POLL_ENV, raising=False)
    assert LocalFederation(tmp_path, 1).env[TASK_POLL_ENV] == "0.2"
    assert LocalFederation(tmp_path, 1, task_poll_interval=0.05).env[TASK_POLL_ENV] == "0.05"
    assert TASK_POLL_ENV not in LocalFederation(tmp_path, 1, task_poll_interval=None).env  # Flower's 1 s
    assert LocalFederation(tmp_path, 1, env={TASK_POLL_ENV: "0.5"}).env[TASK_POLL_ENV] == "0.5"
