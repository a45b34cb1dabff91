"""Simulated time: distributions, a client task's seconds by hand, a round's time, and a run with a clock."""

import math

import numpy as np
import pytest
import torch
from helpers import build_overlay, tiny_datamodule, tiny_module, tiny_trainer

from fedpeft_pl.clock import Constant, Exponential, HalfNormal, LogNormal, PerClient, VirtualClock, format_seconds
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientResult, Federation, Plan, Round
from fedpeft_pl.peft import Bias, trainable_state
from fedpeft_pl.server import Server
from fedpeft_pl.strategies import FedAvg


def test_a_task_takes_its_transfers_its_samples_and_its_latency():
    clock = VirtualClock(
        speed=PerClient([10.0, 40.0]),
        upload=Constant(1000.0),
        download=Constant(4000.0),
        latency=Constant(0.5),
    )
    # client 1: 8000 B down at 4000 B/s, 120 samples at 40/s, 3000 B up at 1000 B/s, 0.5 s
    task = clock.task_time(seed=0, server_round=3, client=1, download_bytes=8000, samples=120, upload_bytes=3000)
    assert (task.download, task.compute, task.upload, task.latency) == (2.0, 3.0, 3.0, 0.5)
    assert task.total == 8.5
    assert clock.task_time(0, 3, 0, 8000, 120, 3000).compute == 12.0


def test_profiles_are_seeded_per_client_and_jitter_per_round():
    clock = VirtualClock(speed=LogNormal(median=50.0, sigma=1.0), jitter=0.2)
    assert clock.profile(7, 3) == clock.profile(7, 3)
    assert clock.profile(7, 3) != clock.profile(7, 4) and clock.profile(7, 3) != clock.profile(8, 3)
    first, second = clock.task_time(7, 1, 3, 0, 100, 0), clock.task_time(7, 2, 3, 0, 100, 0)
    assert first.compute != second.compute  # the same device, another round's jitter
    assert clock.task_time(7, 1, 3, 0, 100, 0) == first
    steady = VirtualClock(speed=LogNormal(median=50.0, sigma=1.0))
    assert steady.task_time(7, 1, 3, 0, 100, 0).compute == steady.task_time(7, 2, 3, 0, 100, 0).compute


def test_distributions_draw_what_they_say():
    rng = np.random.default_rng(0)
    draws = np.array([LogNormal(median=50.0, sigma=1.0).draw(rng, 0) for _ in range(20000)])
    assert abs(np.median(draws) / 50.0 - 1) < 0.03
    # sigma 1: the 90th percentile over the 10th is exp(2 * 1.2816), about 13
    assert abs(np.percentile(draws, 90) / np.percentile(draws, 10) / math.exp(2 * 1.2816) - 1) < 0.08
    exponential = np.array([Exponential(mean=2.0).draw(rng, 0) for _ in range(20000)])
    assert abs(exponential.mean() / 2.0 - 1) < 0.03 and abs(np.median(exponential) / Exponential(2.0).median - 1) < 0.05
    half = np.array([HalfNormal(scale=1.0, offset=0.1).draw(rng, 0) for _ in range(20000)])
    assert half.min() >= 0.1 and abs(np.median(half) / HalfNormal(1.0, 0.1).median - 1) < 0.03
    assert PerClient([1.0, 2.0, 3.0]).draw(rng, 4) == 2.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: Constant(0),
        lambda: LogNormal(-1),
        lambda: PerClient([]),
        lambda: VirtualClock(jitter=-1),
        lambda: Exponential(float("inf")),
    ],
)
def test_bad_settings_are_one_line_config_errors(make):
    with pytest.raises(ConfigError) as refused:
        make()
    assert "\n" not in str(refused.value)


def test_a_round_ends_when_its_last_client_arrives():
    clock = VirtualClock(
        speed=PerClient([10.0, 20.0]), upload=Constant(100.0), download=Constant(200.0), latency=Constant(1.0)
    )
    server = Server(FedAvg(), clock=clock)
    server.wire.enabled = False  # payload bytes: what a hand computation can count
    server.start({"w": torch.zeros(50)})  # 200 bytes each way
    server.setup(Federation(num_clients=2, clients_per_round=2, num_rounds=1, local_epochs=2))
    plans = {0: Plan(False, 4, False, 4), 1: Plan(False, 1, True, 4)}  # client 1 straggles: a quarter of its work
    current = Round(1, (0, 1), plans, (0, 1))
    server.begin()
    server.configure(current)
    for client, samples in ((0, 30), (1, 80)):
        server.accept(current, ClientResult(client, samples, {"w": torch.ones(50)}), torch.device("cpu"))
    server.update(current)
    # client 0: 200/200 + 2 epochs * 30 samples / 10 + 200/100 + 1 = 10 s
    # client 1: 200/200 + 2 epochs * 80 samples * 1/4 / 20 + 200/100 + 1 = 6 s
    assert server.pending.seconds == {0: 10.0, 1: 6.0}
    assert server.round_seconds == 10.0 and server.simulated_seconds == 10.0
    assert server.state_dict()["simulated_seconds"] == 10.0


def test_a_run_with_a_clock_logs_simulated_time_and_trains_as_without(tmp_path, caplog):
    def run(clock):
        torch.manual_seed(0)
        module = tiny_module(Bias())
        trainer = tiny_trainer(tmp_path, num_rounds=2, clients_per_round=2, clock=clock, client_runner="sequential")
        trainer.fit(module, datamodule=tiny_datamodule(num_clients=3))
        return trainer, trainable_state(module)

    clock = VirtualClock(speed=Constant(25.0), upload=Constant(1.0e4), download=Constant(5.0e4), latency=Constant(0.2))
    with caplog.at_level("INFO", logger="fedpeft_pl"):
        timed, state = run(clock)
    _, plain = run(None)
    assert all(torch.equal(state[k], plain[k]) for k in state), "the clock only measures"
    server = timed.aggregation.server
    assert server.simulated_seconds > 0 and timed.callback_metrics  # logged each round
    assert "simulated " in caplog.text and "(total " in caplog.text
    assert f"simulated time: {format_seconds(server.simulated_seconds)}" in caplog.text


@pytest.mark.parametrize("method, low, high", [("full", 200.0, 300.0), ("bias", 0.1, 1.0)])
def test_comm_estimates_the_papers_vit_b16_upload_over_a_10_mbit_link(method, low, high, tmp_path, monkeypatch, capsys):
    """FedPEFT's point in the unit users feel: ViT-B/16's ~330 MB a client sends under full fine-tuning take
    about 260 s over 10 Mbit/s; BitFit's ~0.7 MB well under a second."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    overlay = (
        "trainer:\n  clock:\n    class_path: fedpeft_pl.clock.VirtualClock\n"
        "    init_args: {upload: {class_path: fedpeft_pl.clock.Constant, init_args: {value: 1.25e+6}}}\n"
    )
    trainer, module, datamodule = build_overlay(tmp_path, overlay, "configs/paper.yaml", f"configs/{method}.yaml")
    report = trainer.comm(module, datamodule)
    clock = trainer.aggregation.server.clock
    _, upload = clock.median_transfer_seconds(0, report.upload_wire_bytes or report.upload_bytes)
    assert low < upload < high
    assert f"{format_seconds(upload)} uploading" in capsys.readouterr().out


def test_the_report_gives_a_clocked_runs_simulated_hours():
    from pathlib import Path

    from fedpeft_pl.analysis import Run, format_table, summarize

    clocked = Run(
        "clocked",
        Path("a"),
        "Bias",
        {"comm/cumulative_bytes": [(1, 10.0), (2, 20.0)], "time/simulated_seconds": [(1, 1800.0), (2, 5400.0)]},
    )
    plain = Run("plain", Path("b"), "Bias", {"comm/cumulative_bytes": [(1, 10.0)]})
    rows = summarize([clocked, plain])
    assert rows[0]["simulated_hours"] == 1.5 and rows[1]["simulated_hours"] is None
    assert "simulated_hours" in format_table(rows) and "simulated_hours" not in summarize([plain])[0]
