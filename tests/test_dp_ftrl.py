"""DP-FTRL (Kairouz et al., ICML 2021): the tree's noise by hand, the noise-free run is FedAvg with a server
learning rate, each client at most once per tree in a real run, the epsilon is dp-accounting's (and a
published setting's), resume, and the combinations it refuses in one line."""

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import manual_text, tiny_datamodule, tiny_trainer

from fedpeft_pl import accounting
from fedpeft_pl.availability import ClientAvailability
from fedpeft_pl.capabilities import RunParts, check_run
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import Federation, Round
from fedpeft_pl.hooks import FederatedCallback
from fedpeft_pl.noise import NoiseSource
from fedpeft_pl.peft import Prompt, trainable_state
from fedpeft_pl.privacy import DPFTRL, TreeNoise
from fedpeft_pl.schedules import FedAsync, FedBuff
from fedpeft_pl.seeds import TREE_NOISE
from fedpeft_pl.strategies import ClientUpdate, FedAvg, ServerSGD

REPO = Path(__file__).parent.parent

# each prefix of a tree as the nodes (level, index) of its binary decomposition, written out by hand
DECOMPOSITION = {
    1: [(0, 1)],
    2: [(1, 1)],
    3: [(1, 1), (0, 3)],
    4: [(2, 1)],
    5: [(2, 1), (0, 5)],
    6: [(2, 1), (1, 3)],
    7: [(2, 1), (1, 3), (0, 7)],
}


def _node(seed: int, tree: int, level: int, index: int, std: float) -> torch.Tensor:
    source = NoiseSource(TREE_NOISE, reproducible=True)
    source.open((tree, level, index), seed=seed)
    return source.gaussian((3,), std, "cpu", torch.float32, (tree, level, index))


def test_tree_noise_of_each_prefix_is_the_sum_of_its_decompositions_nodes():
    tree_noise = TreeNoise(TREE_NOISE, reproducible=True)
    like = {"w": torch.zeros(3)}
    for step, nodes in DECOMPOSITION.items():
        expected = sum(_node(7, 2, level, index, 0.5) for level, index in nodes)
        torch.testing.assert_close(tree_noise.prefix(2, step, like, 0.5, seed=7)["w"], expected, rtol=0, atol=1e-6)
    # a node is drawn once and reused: prefixes 4 to 7 share node (2, 1), prefixes 6 and 7 node (1, 3)
    assert set(tree_noise.state_dict()) == {"0", "1", "2"}


def test_the_strategys_releases_are_the_noisy_prefix_sums_by_hand():
    # server_lr 1, no momentum: global_t = global_0 + (sum of the clipped updates so far + prefix noise) / m
    strategy = DPFTRL(clip_norm=1.0, epsilon=None, noise_multiplier=0.5, reproducible_noise=True)
    strategy.setup(Federation(8, 2, 6, seed=3))  # restart every 8 // 2 = 4 rounds
    start = {"w": torch.zeros(3)}
    state, leaves = dict(start), []
    for number in range(1, 7):
        changes = [torch.tensor([3.0, 4.0, 0.0]) * number, torch.tensor([0.1, -0.2, 0.3])]
        updates = [ClientUpdate(c, 10, {"w": state["w"] + d}) for c, d in enumerate(changes)]
        leaves.append(torch.tensor([0.6, 0.8, 0.0]) + changes[1])  # the first change has norm >= 5: clipped to 1
        tree, step = divmod(number - 1, 4)
        if step == 0:
            origin, total = state["w"].clone(), torch.zeros(3)
        total = total + leaves[-1]
        noise = sum(_node(3, tree, level, index, 0.5) for level, index in DECOMPOSITION[step + 1])
        state = strategy.aggregate_fit(number, state, updates)
        torch.testing.assert_close(state["w"], origin + (total + noise) / 2, rtol=0, atol=1e-5)
    assert strategy.trees == [4, 2]


def test_noise_free_momentum_is_heavy_ball_on_the_mean_update():
    strategy = DPFTRL(clip_norm=math.inf, epsilon=None, noise_multiplier=0.0, server_lr=0.5, momentum=0.9)
    strategy.setup(Federation(8, 2, 4, seed=0))
    state, previous_step = {"w": torch.zeros(2)}, torch.zeros(2)
    rng = np.random.default_rng(0)
    for number in range(1, 5):
        changes = [torch.tensor(rng.normal(size=2), dtype=torch.float32) for _ in range(2)]
        updates = [ClientUpdate(c, 10, {"w": state["w"] + d}) for c, d in enumerate(changes)]
        step = 0.9 * previous_step + 0.5 * (changes[0] + changes[1]) / 2  # FedAvgM: server momentum on the mean
        new = strategy.aggregate_fit(number, state, updates)
        torch.testing.assert_close(new["w"], state["w"] + step, rtol=0, atol=1e-5)
        state, previous_step = new, step


class _Participation(FederatedCallback):
    """Who each round drew, and who sent an update."""

    def __init__(self) -> None:
        self.drawn: dict[int, tuple[int, ...]] = {}
        self.contributed: dict[int, list[int]] = {}

    def on_round_start(self, trainer, pl_module, round: Round) -> None:
        self.drawn[round.number] = round.clients

    def on_client_end(self, trainer, pl_module, round, result) -> None:
        self.contributed.setdefault(round.number, []).append(result.client)


def _fit(tmp_path, strategy, rounds, clients, num_clients=4, **kwargs):
    torch.manual_seed(0)
    from helpers import tiny_module

    module = tiny_module(Prompt(num_tokens=2))
    datamodule = tiny_datamodule(num_clients=num_clients, batch_size=256)  # one or two steps a client
    trainer = tiny_trainer(tmp_path, num_rounds=rounds, clients_per_round=clients, aggregation=strategy, **kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer, module


class _SameDraw(FedAvg):
    """FedAvg drawing the clients a DP-FTRL strategy draws: the same run, but for the server update."""

    def __init__(self, server_lr: float, draws: DPFTRL) -> None:
        super().__init__(server_optimizer=ServerSGD(server_lr))
        self._draws = draws

    def draw_clients(self, federation, server_round, size):
        return self._draws.draw_clients(federation, server_round, size)


def test_noise_free_dp_ftrl_with_one_tree_equals_fedavg_with_a_server_learning_rate(tmp_path):
    # one client a round of eight: one tree of three rounds (each client at most once), and the mean of one
    # update is the update whatever its weight
    def ftrl():
        return DPFTRL(clip_norm=math.inf, epsilon=None, noise_multiplier=0.0, server_lr=0.7)

    _, private = _fit(tmp_path / "ftrl", ftrl(), rounds=3, clients=1, num_clients=8)
    draws = ftrl()
    draws.setup(Federation(8, 1, 3))
    _, plain = _fit(tmp_path / "fedavg", _SameDraw(0.7, draws), rounds=3, clients=1, num_clients=8)
    expected, got = trainable_state(plain), trainable_state(private)
    torch.manual_seed(0)
    from helpers import tiny_module

    initial = trainable_state(tiny_module(Prompt(num_tokens=2)))
    assert all(not torch.allclose(expected[n], initial[n]) for n in expected)  # the rounds really trained
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_each_client_takes_part_at_most_once_per_tree_in_a_real_run_with_dropouts(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    counter = _Participation()
    strategy = DPFTRL(clip_norm=1.0, epsilon=None, noise_multiplier=1.0)
    _fit(
        tmp_path,
        strategy,
        rounds=7,
        clients=2,
        num_clients=6,
        availability=ClientAvailability(dropout=0.3),
        callbacks=[counter],
        logger=CSVLogger(str(tmp_path), name="run"),
        check_val_every_n_epoch=7,  # the server evaluates once, at the end
    )
    # restart every 6 // 2 = 3 rounds: trees {1, 2, 3}, {4, 5, 6}, {7}
    trees = [[1, 2, 3], [4, 5, 6], [7]]
    for rounds in trees:
        drawn = [c for r in rounds for c in counter.drawn[r]]
        assert len(drawn) == len(set(drawn)) == 2 * len(rounds)  # nobody twice in a tree
        contributed = [c for r in rounds for c in counter.contributed.get(r, [])]
        assert len(contributed) == len(set(contributed))
    assert len(set(counter.drawn[1]) | set(counter.drawn[2]) | set(counter.drawn[3])) == 6  # a tree is a pass
    assert sum(len(v) for v in counter.contributed.values()) < 14, "some clients dropped out"
    assert strategy.trees == [3, 3, 1]
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [float(r["privacy/epsilon"]) for r in rows if r.get("privacy/epsilon")]
    assert len(logged) == 7 and logged == sorted(logged)
    assert logged[-1] == pytest.approx(accounting.tree_epsilon("rdp", 1.0, [3, 3, 1], 1e-3))


def test_resume_continues_the_tree_exactly():
    def fresh():
        strategy = DPFTRL(clip_norm=1.0, epsilon=None, noise_multiplier=1.0, momentum=0.5, reproducible_noise=True)
        strategy.setup(Federation(8, 2, 6, seed=1))
        return strategy

    def round_updates(state, number):
        return [ClientUpdate(c, 10, {"w": state["w"] + 0.1 * (c + number)}) for c in range(2)]

    whole, state = fresh(), {"w": torch.zeros(4)}
    for number in (1, 2):
        state = whole.aggregate_fit(number, state, round_updates(state, number))
    resumed = fresh()
    resumed.load_state_dict(copy.deepcopy(whole.state_dict()))
    for number in (3, 4, 5):
        a = whole.aggregate_fit(number, state, round_updates(state, number))
        b = resumed.aggregate_fit(number, state, round_updates(state, number))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        state = a
    assert resumed.epsilon_spent() == whole.epsilon_spent()


# -- accounting ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("z, trees, delta", [(1.0, [3, 3, 1], 1e-3), (2.5, [100] * 4, 1e-5), (0.8, [8], 1e-5)])
def test_epsilon_is_dp_accountings_for_the_same_events(z, trees, delta):
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    rdp = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for leaves in trees:  # one tree after another, each client once in each
        rdp.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, leaves))
    spent = accounting.tree_cross_check(z, trees, delta)
    assert spent["rdp"] == pytest.approx(rdp.get_epsilon(delta), rel=1e-9)
    # the tree's RDP is one Gaussian's of multiplier z / sqrt(sum of depths): opacus agrees within 1 %,
    # and the tight accountants of that Gaussian agree with each other and with the exact epsilon
    gaussian = rdp_privacy_accountant.RdpAccountant()
    gaussian.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(accounting.tree_depth(trees))))
    np.testing.assert_allclose(rdp._rdp, gaussian._rdp, rtol=1e-12)
    assert spent["rdp/opacus"] == pytest.approx(spent["rdp"], rel=0.01)
    assert spent["prv"] == pytest.approx(spent["pld"], rel=0.01)
    from test_accounting import analytic_gaussian_epsilon

    exact = analytic_gaussian_epsilon(z / math.sqrt(accounting.tree_depth(trees)), delta)
    assert spent["pld"] == pytest.approx(exact, rel=1e-3)
    assert spent["pld"] <= spent["rdp"]


@pytest.mark.parametrize("z, published", [(1.13, 19.74), (8.83, 2.04)])
def test_the_stackoverflow_setting_of_kairouz_et_al(z, published):
    # StackOverflow, 100 of 342,477 clients a round for 1,600 rounds: one tree, each client at most once,
    # delta 1e-6 (tensorflow_privacy's tree_aggregation_accountant_test gives the paper's epsilons). The
    # paper converted RDP to (epsilon, delta) with eps = min_a rdp(a) + log(1/delta) / (a - 1) over
    # tensorflow_privacy's orders; the same tree RDP gives its numbers to the printed digits, and
    # dp-accounting's tighter conversion less
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    rdp = orders * accounting.tree_depth([1600]) / (2 * z**2)
    assert round(float(np.min(rdp + math.log(1e6) / (orders - 1))), 2) == published
    ours = accounting.tree_epsilon("rdp", z, [1600], 1e-6)
    assert 0.85 * published < ours < published


def test_calibration_spends_the_target_and_no_more():
    trees = accounting.restart_trees(30, 4)
    assert trees == [4] * 7 + [2]
    z = accounting.tree_noise_multiplier("rdp", 5.0, 1e-3, trees)
    assert 4.99 <= accounting.tree_epsilon("rdp", z, trees, 1e-3) <= 5.0
    assert accounting.tree_epsilon("rdp", 0.0, trees, 1e-3) == math.inf
    assert accounting.tree_epsilon("pld", 1.0, [], 1e-3) == 0.0


# -- refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DPFTRL(clip_norm=0.0), "clip_norm must be > 0"),
        (lambda: DPFTRL(delta=1.0), "delta must be in"),
        (lambda: DPFTRL(epsilon=None, noise_multiplier=None), "needs a target epsilon"),
        (lambda: DPFTRL(noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
        (lambda: DPFTRL(server_lr=0.0), "server_lr must be > 0"),
        (lambda: DPFTRL(momentum=1.0), "momentum must be in"),
        (lambda: DPFTRL(restart_every=0), "restart_every must be >= 1"),
        (lambda: DPFTRL(restart_every=2.5), "whole number"),
        (lambda: DPFTRL(accountant="moments"), "accountant must be one of"),
        (lambda: DPFTRL().setup(Federation(10, 2, 5, sampling="poisson")), "client_sampling: uniform"),
        (lambda: DPFTRL(restart_every=6).setup(Federation(10, 2, 5)), "set restart_every <= 5"),
        (lambda: DPFTRL(noise_multiplier=1.0).draw_clients(Federation(10, 2, 5), 5, 3), "set restart_every <= 3"),
        (lambda: check_run(RunParts(strategy=DPFTRL(), schedule=FedBuff(4, 2), clock=object())), "FedBuff cannot"),
        (lambda: check_run(RunParts(strategy=DPFTRL(), schedule=FedAsync(4), clock=object())), "FedAsync cannot"),
        (lambda: check_run(RunParts(strategy=DPFTRL(), secure_aggregation=True)), "secure aggregation cannot"),
        (lambda: DPFTRL().privacy_plan(Federation(10, 2, 5), buffered=True), "asynchronous schedule cannot"),
    ],
)
def test_what_cannot_hold_is_refused_in_one_line(make, message):
    with pytest.raises(ConfigError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_the_plan_states_the_epsilon_before_training():
    strategy = DPFTRL(clip_norm=1.0, epsilon=None, noise_multiplier=2.0, delta=1e-3)
    line = strategy.privacy_plan(Federation(16, 8, 30))
    expected = accounting.tree_epsilon("rdp", 2.0, [2] * 15, 1e-3)
    assert "15 tree(s) of up to 2 rounds" in line
    assert f"spends epsilon {expected:.3f} at delta 0.001 by the rdp accountant" in line
    assert "cross-check: prv" in line and "pld" in line


@pytest.mark.slow  # builds the quickstart and trains it for three rounds
def test_the_experiment_config_trains_and_comm_prints_its_epsilon(tmp_path, monkeypatch, capsys):
    from helpers import build_overlay

    from fedpeft_pl.cli import main

    monkeypatch.chdir(REPO)
    main(["comm", "--config", "configs/quickstart.yaml", "--config", "configs/experiments/dp/ftrl.yaml"])
    printed = capsys.readouterr().out
    z = accounting.tree_noise_multiplier("rdp", 5.0, 1e-3, [2] * 15)  # 16 clients, 8 a round, 30 rounds
    assert f"noise multiplier {z:.4f} per tree node spends epsilon" in printed
    overlay = "trainer:\n  num_rounds: 3\n  local_epochs: 1\n  logger: false\n  enable_checkpointing: false\n"
    trainer, module, datamodule = build_overlay(
        tmp_path, overlay, "configs/quickstart.yaml", "configs/experiments/dp/ftrl.yaml"
    )
    trainer.fit(module, datamodule=datamodule)
    strategy = trainer.aggregation.server.strategy
    assert isinstance(strategy, DPFTRL) and strategy.trees == [2, 1]
    assert 0 < strategy.epsilon_spent() < 5.0


def test_the_readme_rows_are_what_the_accountants_give():
    from test_accounting import analytic_gaussian_epsilon

    rows = [line for line in manual_text().splitlines() if line.startswith("| DP-FTRL")]
    z = accounting.tree_noise_multiplier("rdp", 5.0, 1e-3, [2] * 15)
    settings = [(1.13, [1600], 1e-6), (8.83, [1600], 1e-6), (2.5, [100] * 4, 1e-5), (z, [2] * 15, 1e-3)]
    assert len(rows) == len(settings)
    for row, (z, trees, delta) in zip(rows, settings):
        cells = [c.strip() for c in row.strip("|").split("|")]
        spent = accounting.tree_cross_check(z, trees, delta)
        exact = analytic_gaussian_epsilon(z / math.sqrt(accounting.tree_depth(trees)), delta)
        expected = [spent["rdp/opacus"], spent["rdp"], spent["prv"], spent["pld"], exact]
        assert float(cells[1]) == delta and cells[2:] == [f"{value:.3f}" for value in expected], row


def test_synchronous_rounds_on_the_virtual_clock_draw_the_cohort_once_per_tree(tmp_path):
    from fedpeft_pl.clock import Constant, LogNormal, VirtualClock
    from fedpeft_pl.schedules import Synchronous

    clock = VirtualClock(
        speed=LogNormal(50.0, 1.0), upload=Constant(1.0e5), download=Constant(5.0e5), latency=Constant(0.1)
    )
    counter = _Participation()
    strategy = DPFTRL(clip_norm=1.0, epsilon=None, noise_multiplier=1.0, restart_every=2)
    # two of a cohort of three count each round (over-selection 50 %): a tree of two rounds takes all six clients
    _fit(
        tmp_path,
        strategy,
        rounds=4,
        clients=2,
        num_clients=6,
        clock=clock,
        schedule=Synchronous(over_selection=0.5),
        callbacks=[counter],
        check_val_every_n_epoch=4,
    )
    for rounds in ([1, 2], [3, 4]):
        drawn = [c for r in rounds for c in counter.drawn[r]]
        assert len(drawn) == len(set(drawn)) == 6
    assert strategy.trees == [2, 2]
    with pytest.raises(ConfigError, match=r"over-selection included.*set restart_every <= 2"):
        _fit(
            tmp_path / "default",
            DPFTRL(clip_norm=1.0, epsilon=None, noise_multiplier=1.0),  # N // m = 3 rounds a tree: 9 clients
            rounds=1,
            clients=2,
            num_clients=6,
            clock=clock,
            schedule=Synchronous(over_selection=0.5),
        )
