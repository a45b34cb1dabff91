"""Secure aggregation settings and refusals (fast; the deployment itself is tested in test_flower.py)."""

import pytest
from test_cli import QUICKSTART

from fedpeft_pl.deploy.secure_aggregation import (
    SecureAggregation,
    check_composition,
    check_resolved_config,
    split_arguments,
)
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.strategies import FedAdam, FedAvg, FedDyn, FedMedian, FedProx, FedTrimmedAvg, Scaffold


@pytest.mark.parametrize("strategy", [FedAvg, FedProx, FedAdam])
def test_strategies_of_the_weighted_mean_compose(strategy):
    check_composition(strategy, None)


@pytest.mark.parametrize(
    "strategy, message",
    [
        (FedMedian, "cannot run FedMedian: it needs every client's individual update"),
        (FedTrimmedAvg, "cannot run FedTrimmedAvg: it needs every client's individual update"),
        (Scaffold, "cannot run Scaffold: the server sees only the sample-weighted sum"),
        (FedDyn, "cannot run FedDyn: the server sees only the sample-weighted sum"),
    ],
)
def test_strategies_that_need_individual_updates_are_refused(strategy, message):
    with pytest.raises(ConfigError, match=message):
        check_composition(strategy, None)


def test_dp_fedavg_composes_and_its_server_takes_the_clipped_sum_as_it_is():
    """Clients clip before masking; the server must not clip the sum again, and adds its noise to the sum."""
    import torch

    from fedpeft_pl.deploy.secagg import clip_update
    from fedpeft_pl.privacy import DPFedAvg
    from fedpeft_pl.strategies import ClientUpdate

    check_composition(DPFedAvg, None)
    generator = torch.Generator().manual_seed(0)
    start = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    updates = [
        {k: torch.randn(v.shape, generator=generator) * scale for k, v in start.items()} for scale in (0.1, 3.0, 5.0)
    ]
    strategy = DPFedAvg(clip_norm=1.0, epsilon=None, noise_multiplier=0.0)
    strategy._expected_clients = 3.0
    one_by_one = strategy.aggregate_fit(1, start, [ClientUpdate(i, 10, u) for i, u in enumerate(updates)])
    clipped = [dict(zip(u, clip_update([t.numpy() for t in u.values()], 1.0))) for u in updates]
    for c in clipped[1:]:  # the large updates end on the clipping norm
        assert abs(sum(float((torch.as_tensor(t) ** 2).sum()) for t in c.values()) ** 0.5 - 1.0) < 1e-5
    summed = {k: sum(torch.as_tensor(c[k]) for c in clipped) for k in start}
    secure = strategy.aggregate_fit(1, start, [ClientUpdate(0, 30, summed, aggregate_of=(0, 1, 2))])
    for k in start:
        torch.testing.assert_close(secure[k], one_by_one[k])


def test_an_upload_codec_is_refused():
    from fedpeft_pl.compression import Codec, Int8

    check_composition(FedAvg, Codec)
    with pytest.raises(ConfigError, match=r"cannot use trainer.compress_upload \(Int8\)"):
        check_composition(FedAvg, Int8())
    with pytest.raises(ConfigError, match=r"cannot use trainer\.compress_upload"):
        check_resolved_config({"aggregation": None, "compress_upload": {"class_path": "fedpeft_pl.compression.Int8"}})
    check_resolved_config({"aggregation": "fedpeft_pl.strategies.FedProx", "compress_upload": None})


def test_settings_round_trip_through_the_run_config():
    settings, rest = split_arguments(
        [
            "--config",
            "x.yaml",
            "--secure-aggregation",
            "--num-shares",
            "5",
            "--reconstruction-threshold=3",
            "--clipping-range",
            "0.5",
            "--trainer.seed",
            "1",
        ]
    )
    assert rest == ["--config", "x.yaml", "--trainer.seed", "1"]
    assert settings == SecureAggregation(num_shares=5, reconstruction_threshold=3, clipping_range=0.5)
    assert SecureAggregation.from_run_config(settings.to_run_config()) == settings
    assert SecureAggregation.from_run_config({"node-timeout": 3}) is None
    assert split_arguments(["--config", "x.yaml"]) == (None, ["--config", "x.yaml"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-shares", "3"], "--num-shares only apply with --secure-aggregation"),
        (["--secure-aggregation", "--num-shares", "2"], "num_shares must be an int > 2"),
        (
            ["--secure-aggregation", "--num-shares", "3", "--reconstruction-threshold", "3"],
            "must be an int >= 2 below num_shares",
        ),
        (["--secure-aggregation", "--clipping-range", "0"], "clipping_range must be > 0"),
        (["--secure-aggregation", "--max-weight", "many"], "--max-weight must be a number"),
    ],
)
def test_wrong_settings_are_one_clear_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        split_arguments(argv)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trainer.aggregation", "fedpeft_pl.strategies.FedMedian"], "cannot run FedMedian"),
        (["--trainer.compress_upload", "fedpeft_pl.compression.Int8"], "cannot use trainer.compress_upload"),
        (["--num-shares", "1.5"], "num_shares as a fraction must be in"),
    ],
    ids=["median", "int8", "shares"],
)
def test_flower_app_refuses_with_one_line_and_exit_2(tmp_path, extra, message, monkeypatch, capsys):
    from fedpeft_pl.cli import main

    monkeypatch.chdir(tmp_path)  # in this process (tests/test_cli.py runs the console script's exit status)
    with pytest.raises(SystemExit) as exited:
        main(["flower-app", str(tmp_path / "app"), "--config", QUICKSTART, "--secure-aggregation", *extra])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fedpeft: error: secure aggregation") and message in last, last
    assert not (tmp_path / "app").exists()


@pytest.fixture
def client_process(monkeypatch):
    """The task identity Flower's runtime gives an app process; Messages need it."""
    from flwr.supercore.task_identity import TaskIdentity

    for attribute, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attribute, value)


def test_a_secure_deployment_client_refuses_a_plain_train_message(client_process):
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from fedpeft_pl.deploy.secagg import secure_train_mod

    mod = secure_train_mod("fedpeft.yaml")
    message = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1, message_type=MessageType.TRAIN)
    secure = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=SecureAggregation().to_run_config()
    )
    with pytest.raises(ConfigError, match="refuses to send its update in the clear"):
        mod(message, secure, lambda m, c: pytest.fail("the train handler ran"))
    plain = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"node-timeout": 300})
    assert mod(message, plain, lambda m, c: "trained") == "trained"


@pytest.mark.parametrize("dp", [False, True], ids=["fedavg", "dpfedavg"])
def test_a_secure_client_hands_secagg_its_update_weighted_or_clipped(tmp_path, client_process, dp):
    """What a SuperNode's train handler gives SecAgg+ to mask: its update (trained minus received),
    weighted by its sample count; under DPFedAvg clipped to clip_norm and weighted 1, so that the
    server's unmasked result is the plain sum of clipped updates to which it adds its noise."""
    pytest.importorskip("flwr")
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fedpeft_pl.config import resolve_config
    from fedpeft_pl.deploy.secagg import _NAMES, _SAMPLES, _train_from_fitins

    clip = 0.5
    extra = (
        [
            "--trainer.client_sampling",
            "poisson",
            "--trainer.aggregation",
            "fedpeft_pl.privacy.DPFedAvg",
            "--trainer.aggregation.clip_norm",
            str(clip),
        ]
        if dp
        else []
    )
    config = tmp_path / "fedpeft.yaml"
    config.write_text(resolve_config(["--config", QUICKSTART, "--trainer.logger", "false", *extra]))
    received = {"w": np.zeros((2, 3), np.float32), "b": np.full(3, 0.5, np.float32)}
    trained = {"w": np.full((2, 3), 2.0, np.float32), "b": np.full(3, -0.5, np.float32)}
    fitins = FitIns(ndarrays_to_parameters(list(received.values())), {_NAMES: "w\nb", "fedpeft.client": 1})
    message = Message(
        compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1, message_type=MessageType.TRAIN
    )
    settings = SecureAggregation(max_weight=1000.0)

    def train(m, context):  # the ordinary train handler: the client's trained state and its sample count
        assert set(m.content["arrays"].to_torch_state_dict()) == {"w", "b"}
        reply = RecordDict(
            {
                "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in trained.items()}),
                "metrics": MetricRecord({"num-examples": 40, "train_loss": 1.5}),
            }
        )
        return Message(reply, reply_to=m)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=settings.to_run_config())
    fitres = compat.recorddict_to_fitres(
        _train_from_fitins(message, context, train, settings, str(config)).content, keep_input=True
    )
    update = parameters_to_ndarrays(fitres.parameters)
    plain = [trained[k] - received[k] for k in ("w", "b")]
    norm = float(np.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in plain)))
    assert fitres.metrics[_SAMPLES] == 40  # the real count travels beside the SecAgg+ weight
    if dp:
        assert fitres.num_examples == 1000  # weight max_weight / max_weight = 1: the server gets the sum
        for got, want in zip(update, plain):
            np.testing.assert_allclose(got, want * clip / norm, rtol=1e-5)
    else:
        assert fitres.num_examples == 40
        for got, want in zip(update, plain):
            np.testing.assert_array_equal(got, want)


def test_a_secure_runner_keeps_the_run_configs_node_timeout_and_query_batch():
    # both govern the partition queries of SuperNodes that join later; the secure runner once dropped them
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict

    from fedpeft_pl.deploy.secagg import SecureFlowerRunner

    server = SimpleNamespace(wire=SimpleNamespace(measured=False))
    kept = []  # the callbacks the runner adds to the run (its key, into the checkpoints)
    run = SimpleNamespace(privacy=None, keep_in_checkpoints=kept.append)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    runner = SecureFlowerRunner(
        SimpleNamespace(context=run, server=server),
        None,
        {},
        60,
        context,
        SecureAggregation(),
        node_timeout=7,
        query_batch=2,
    )
    assert (runner.node_timeout, runner.query_batch, runner.reply_timeout) == (7, 2, 60)
    assert server.wire.measured, "the wire bytes are the real messages'"
    assert kept == [runner.run_key]
