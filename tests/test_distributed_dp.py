"""Distributed DP (the distributed discrete Gaussian): conditioning, stated error bounds, accounting and refusals."""

import math

import numpy as np
import pytest
import torch

from fedpeft_pl import distributed_noise as ddg
from fedpeft_pl.capabilities import RunParts, check_run
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import Federation
from fedpeft_pl.privacy import DistributedDP
from fedpeft_pl.strategies import ClientUpdate

DIM, CLIENTS = 3000, 8


def _updates(seed, clients=CLIENTS, dim=DIM, norm=2.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=dim) * norm / math.sqrt(dim) for _ in range(clients)]


def test_the_hadamard_rotation_is_orthonormal_and_its_own_inverse():
    x = np.random.default_rng(0).normal(size=1024)
    y = ddg.hadamard(x)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x))
    np.testing.assert_allclose(ddg.hadamard(y), x, atol=1e-12)


def test_the_discrete_gaussian_has_integer_draws_of_the_asked_spread():
    draws = ddg.discrete_gaussian(100_000, 5.5, torch.Generator().manual_seed(1))
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 0.1 and draws.std() == pytest.approx(5.5, rel=0.02)


def test_rounding_and_wrap_around_stay_within_the_stated_bound():
    """Without noise, the decoded sum of the clients' integer vectors is their clipped sum up to rounding of L2
    norm at most error_bound, and nothing wraps around; also when every update points the same way."""
    cond = ddg.conditioning(1.0, 1.0, CLIENTS, DIM, bits=16, beta=math.exp(-0.5), k_stddevs=4.0)
    signs = ddg.rotation_signs(7, 1, cond.padded)
    gen = torch.Generator().manual_seed(0)
    aligned = [np.full(DIM, 1.0 / math.sqrt(DIM))] * CLIENTS  # the worst case for wrap-around: all at the clip norm
    for updates in (_updates(0), aligned):
        clipped = [u * min(1.0, 1.0 / np.linalg.norm(u)) for u in updates]
        total = ddg.wrap(sum(ddg.encode(u, cond, signs, gen, noised=False) for u in updates), cond.modulus)
        decoded = ddg.decode(total, cond, signs)
        error = float(np.linalg.norm(decoded - sum(clipped)))
        assert error <= ddg.error_bound(cond, CLIENTS), (error, ddg.error_bound(cond, CLIENTS))
        assert error >= 0.25 * ddg.error_bound(cond, CLIENTS)  # the rounding is there: about half the bound
    assert ddg.wrap_probability(cond, CLIENTS) < 1e-3
    # a rounded vector never exceeds its sensitivity bound
    vector = ddg.encode(aligned[0] * 5, cond, signs, gen, noised=False)
    assert np.linalg.norm(vector.astype(float)) <= cond.norm_bound


def test_too_few_bits_wrap_around_visibly():
    """The bound is not vacuous: with the modulus far below the sum's spread, the decoded sum is wrong."""
    cond = ddg.conditioning(1.0, 1.0, CLIENTS, DIM, bits=16, beta=0.0, k_stddevs=4.0)
    small = ddg.Conditioning(cond.clip, cond.gamma, cond.beta, 4, cond.dim, cond.local_std)
    signs = ddg.rotation_signs(7, 1, cond.padded)
    gen = torch.Generator().manual_seed(0)
    updates = [np.full(DIM, 1.0 / math.sqrt(DIM))] * CLIENTS
    total = ddg.wrap(sum(ddg.encode(u, small, signs, gen, noised=False) for u in updates), small.modulus)
    assert np.linalg.norm(ddg.decode(total, small, signs) - sum(updates)) > 10 * ddg.error_bound(small, CLIENTS)


def test_the_server_side_sum_is_noised_at_the_expected_scale():
    """The sum the server decodes differs from the noise-free sum by noise of standard deviation
    ``z c sqrt(survivors / noise_clients)`` per coordinate (plus the rounding's), not less."""
    z = 1.3
    cond = ddg.conditioning(1.0, z, CLIENTS, DIM, bits=20, beta=math.exp(-0.5), k_stddevs=4.0)
    signs = ddg.rotation_signs(3, 2, cond.padded)
    gen = torch.Generator().manual_seed(5)
    updates = _updates(1)
    clipped = sum(u * min(1.0, 1.0 / np.linalg.norm(u)) for u in updates)
    for survivors in (CLIENTS, CLIENTS - 3):  # dropouts take their noise shares with them
        total = ddg.wrap(sum(ddg.encode(u, cond, signs, gen) for u in updates[:survivors]), cond.modulus)
        noise = ddg.decode(total, cond, signs) - sum(u * min(1.0, 1.0 / np.linalg.norm(u)) for u in updates[:survivors])
        expected = math.sqrt(z**2 * survivors / CLIENTS + survivors * cond.gamma**2 / 4)
        assert noise.std() == pytest.approx(expected, rel=0.1), (survivors, noise.std(), expected)
    assert np.linalg.norm(clipped) < 0.1 * np.linalg.norm(noise)


def test_the_accounting_is_the_gaussians_without_rounding_and_subsampling_bounds_the_exact_one():
    from opacus.accountants.analysis.rdp import compute_rdp

    from fedpeft_pl.accounting import epsilon

    # a huge local noise (tau vanishes) and a vanishing rounding: the discrete Gaussian's RDP is the Gaussian's
    z, n = 4.0, 10
    gamma = 1e-9
    cond = ddg.Conditioning(clip=1.0, gamma=gamma, beta=0.0, bits=30, dim=1, local_std=z / gamma / math.sqrt(n))
    sens = cond.norm_bound * gamma  # the rounding's inflation of the sensitivity: 1 + gamma
    assert sens == pytest.approx(1.0, abs=1e-6)
    ours = ddg.epsilon(10 * ddg.round_rdp(cond, n, 1.0), 1e-5)
    theirs = epsilon("rdp", [(z, 1.0, 10)], 1e-5)  # opacus' orders include fractional ones; ours are integers
    assert theirs <= ours <= 1.02 * theirs, (ours, theirs)
    # subsampled: Zhu and Wang's general bound is above opacus' exact RDP of the sampled Gaussian, and not far
    orders = [2, 8, 32, 64]
    z = 1.1
    gaussian = np.arange(65) / (2 * z * z)  # the Gaussian mechanism's RDP at each order
    general = np.array([ddg._subsampled(a, 0.05, gaussian) for a in orders])
    exact = compute_rdp(q=0.05, noise_multiplier=z, steps=1, orders=orders)
    assert np.all(general >= exact - 1e-12) and np.all(general <= 3 * exact + 1e-9)


def test_dropouts_spend_more_and_calibration_meets_the_target():
    kwargs = {"clip": 1.0, "clients": 10, "dim": DIM, "bits": 20, "beta": math.exp(-0.5), "k_stddevs": 4.0}
    z = ddg.calibrate(4.0, rate=0.1, rounds=30, delta=1e-5, **kwargs)
    full = ddg.plan_epsilon(z, rate=0.1, rounds=30, delta=1e-5, **kwargs)
    assert 3.9 <= full <= 4.0
    short = ddg.plan_epsilon(z, rate=0.1, rounds=30, delta=1e-5, survivors=7, **kwargs)
    assert short > full * 1.1


def test_distributed_dp_noises_every_update_and_a_reproducible_run_repeats():
    """The simulation's strategy: each client's vector noised before the sum; reproducible noise repeats bit for bit;
    the secret default does not; epsilon is accounted with the survivors."""
    federation = Federation(num_clients=20, clients_per_round=8, num_rounds=3, sampling="poisson", seed=4)
    global_state = {"a": torch.zeros(40, 30), "b": torch.zeros(7)}
    updates = [
        ClientUpdate(c, 10, {"a": torch.randn(40, 30) * 0.05, "b": torch.randn(7) * 0.05}) for c in range(CLIENTS)
    ]

    def run(reproducible, survivors=CLIENTS):
        dp = DistributedDP(clip_norm=1.0, noise_multiplier=1.0, reproducible_noise=reproducible)
        dp.setup(federation)
        return dp, dp.aggregate_fit(1, global_state, updates[:survivors])

    (dp, first), (_, second) = run(True), run(True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    _, secret = run(False)
    assert not torch.equal(first["a"], secret["a"])
    plain = {k: sum(u.state[k] for u in updates) / federation.clients_per_round for k in global_state}
    noise = torch.cat([(first[k] - plain[k]).flatten() for k in first]) * federation.clients_per_round
    assert float(noise.std()) == pytest.approx(1.0, rel=0.15)  # z c per coordinate: the sum is noised
    assert dp.round_metrics()["privacy/noise_clients"] == CLIENTS
    short, _ = run(True, survivors=5)
    assert short.epsilon_spent() > dp.epsilon_spent() > 0


@pytest.mark.parametrize(
    "parts, message",
    [
        ({"privacy": (object(),)}, "DistributedDP cannot run with local DP"),
        ({"live": True}, "DistributedDP needs secure aggregation on a deployment"),
        ({"schedule": type("FedBuff", (), {"asynchronous": True})(), "clock": object()}, "FedBuff cannot run"),
    ],
    ids=["local-dp", "deployed-in-the-clear", "asynchronous"],
)
def test_what_does_not_hold_is_refused_in_one_line(parts, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_run(RunParts(strategy=DistributedDP(), **parts))
    assert "\n" not in str(error.value)
    check_run(RunParts(strategy=DistributedDP(), live=True, secure_aggregation=True))


def test_arguments_and_sampling_are_checked():
    with pytest.raises(ConfigError, match="bits must be an int in"):
        DistributedDP(bits=31)
    with pytest.raises(ConfigError, match="beta must be in"):
        DistributedDP(beta=1.0)
    with pytest.raises(ConfigError, match="Poisson"):
        DistributedDP().setup(Federation(num_clients=4, clients_per_round=2, num_rounds=1))
    with pytest.raises(ConfigError, match="too few for"):
        ddg.conditioning(1.0, 1.0, 100, DIM, bits=3, beta=0.0, k_stddevs=4.0)


def test_distributed_dp_is_within_reach_of_central_dp_at_equal_epsilon():
    """At equal epsilon, 10 clients a round of 10 % and 16 bits, the distributed mechanism's error on the mean
    (noise and rounding) is at most 25 % above central DP's noise: the price of rounding's sensitivity."""
    from fedpeft_pl.accounting import noise_multiplier

    central = noise_multiplier("rdp", 5.0, 1e-3, 0.1, 50)
    kwargs = {"clip": 1.0, "clients": 10, "dim": DIM, "bits": 16, "beta": math.exp(-0.5), "k_stddevs": 4.0}
    z = ddg.calibrate(5.0, rate=0.1, rounds=50, delta=1e-3, **kwargs)
    cond = ddg.conditioning(1.0, z, 10, DIM, 16, math.exp(-0.5), 4.0)
    distributed = math.sqrt(z**2 + 10 * cond.gamma**2 / 4)
    assert central < distributed <= 1.25 * central, (central, distributed)


def test_a_poisson_cohort_of_any_size_carries_the_whole_noise_and_the_run_spends_its_target():
    """The noise shares follow the cohort the server drew, so a small Poisson round is as noised as a full one and a
    calibrated run spends its target (with the shares fixed at the expected cohort, 16 became 14 to 21). A client
    that knows only the round config it received encodes exactly as the server's simulation of it does."""
    from fedpeft_pl.privacy import NOISE_SHARES

    federation = Federation(num_clients=16, clients_per_round=8, num_rounds=10, sampling="poisson", seed=2)
    global_state = {"a": torch.zeros(60, 50)}
    dp = DistributedDP(clip_norm=1.0, epsilon=16.0, reproducible_noise=True)
    dp.setup(federation)
    cohorts, stds = [], {}
    for server_round in range(1, 11):
        cohort = dp.draw_clients(federation, server_round, federation.clients_per_round)
        _, config = dp.configure_fit(server_round, global_state)
        assert config[NOISE_SHARES] == len(cohort)
        cohorts.append(len(cohort))
        if not cohort:
            continue
        updates = [ClientUpdate(c, 10, {"a": torch.zeros(60, 50)}) for c in cohort]  # the sum is the noise alone
        result = dp.aggregate_fit(server_round, global_state, updates)
        stds[len(cohort)] = float(result["a"].std()) * federation.clients_per_round / dp.clip_norm
        assert dp.round_metrics()["privacy/noise_shares"] == len(cohort)
        client = DistributedDP(clip_norm=1.0, epsilon=16.0, reproducible_noise=True)  # a SuperNode's own copy
        delta = {"a": torch.full((60, 50), 0.01)}
        assert np.array_equal(
            client.encode_update(delta, server_round, cohort[0], federation, config=config),
            dp.encode_update(delta, server_round, cohort[0], federation),
        )
    assert len(set(cohorts)) >= 3, cohorts  # the Poisson cohort's size varied
    for size, std in stds.items():  # z c on every coordinate (plus the rounding's), whatever the cohort's size
        assert std == pytest.approx(dp.noise_multiplier, rel=0.1), (size, std, dp.noise_multiplier)
    assert dp.epsilon_spent() == pytest.approx(16.0, rel=0.01)
    cond = dp.conditioning(federation, 3000, federation.clients_per_round)  # the shares fixed at the expected 8
    fixed = ddg.epsilon(sum(ddg.round_rdp(cond, k, 0.5) for k in cohorts), dp.delta)
    assert abs(fixed - 16.0) > 0.5, (fixed, cohorts)


def test_fixed_noise_clients_and_an_old_checkpoints_accounting_keep_the_planned_shares():
    federation = Federation(num_clients=16, clients_per_round=8, num_rounds=3, sampling="poisson", seed=2)
    dp = DistributedDP(clip_norm=1.0, noise_multiplier=1.0, noise_clients=6)
    dp.setup(federation)
    dp.draw_clients(federation, 1, 8)
    assert dp.round_shares(1, federation) == 6 and "fedpeft.noise-shares" not in dp.configure_fit(1, {})[1]
    old = DistributedDP(clip_norm=1.0, noise_multiplier=1.0)
    old.setup(federation)
    old.load_state_dict({"survivors": {"5": 2}, "dim": DIM, "noise_multiplier": 1.0})
    now = DistributedDP(clip_norm=1.0, noise_multiplier=1.0)
    now.setup(federation)
    now.load_state_dict({"history": [[8, 5, 2]], "dim": DIM, "noise_multiplier": 1.0})
    assert now.epsilon_spent() > 0 and old.epsilon_spent() == pytest.approx(now.epsilon_spent())
    assert now.state_dict()["history"] == [[8, 5, 2]]
