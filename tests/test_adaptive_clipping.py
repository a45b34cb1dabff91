"""Adaptive clipping for central DP (Andrew et al., NeurIPS 2021): the update rule and the noise split by hand,
the clip norm following its quantile, and what it cannot run with."""

import math

import pytest
import torch

from fedpeft_pl.capabilities import RunParts, check_run
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import Federation
from fedpeft_pl.privacy import AdaptiveClipping, DPFedAvg
from fedpeft_pl.strategies import ClientUpdate


def test_the_noise_split_and_the_step_by_hand():
    adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2)
    # z^-2 = z_update^-2 + (2 sigma_b)^-2 with z = 1, sigma_b = 2: z_update = (1 - 1/16)^-1/2
    assert adaptive.update_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    assert adaptive.next_clip(2.0, 0.75) == pytest.approx(2.0 * math.exp(-0.2 * 0.25))
    assert adaptive.next_clip(2.0, 0.5) == 2.0
    with pytest.raises(ConfigError, match=r"count_noise 0\.4 is too small for noise multiplier 1") as error:
        adaptive.update_multiplier(1.0, 0.4)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("quantile, expected", [(0.5, 5.0), (0.9, 9.0)])
def test_the_clip_norm_follows_its_quantile_of_the_update_norms(quantile, expected):
    """Updates with norms uniform in [0, 10]: from a clip norm of 50 the clip norm settles at the quantile."""
    strategy = DPFedAvg(
        clip_norm=50.0,
        epsilon=None,
        noise_multiplier=1.0,
        reproducible_noise=True,
        adaptive=AdaptiveClipping(target_quantile=quantile),
    )
    strategy.setup(Federation(num_clients=100, clients_per_round=50, num_rounds=300, sampling="poisson"))
    generator = torch.Generator().manual_seed(0)
    global_state = {"w": torch.zeros(4)}
    clips = []
    for server_round in range(1, 301):
        norms = torch.rand(50, generator=generator) * 10
        updates = [ClientUpdate(c, 1, {"w": torch.tensor([float(n), 0.0, 0.0, 0.0])}, {}) for c, n in enumerate(norms)]
        strategy.aggregate_fit(server_round, global_state, updates)
        clips.append(strategy.current_clip_norm)
    settled = sum(clips[-100:]) / 100
    assert settled == pytest.approx(expected, rel=0.1)
    assert clips[0] < 50.0 and "privacy/unclipped_share" in strategy.round_metrics()
    # the update's noise is raised so that both releases spend what the run's multiplier does
    assert strategy._update_multiplier == pytest.approx((1.0 - (2 * 50 / 20) ** -2) ** -0.5)


@pytest.mark.parametrize("clients, z", [(8, 0.677), (8, 1.67), (200, 1.0)])
def test_the_counts_noise_by_default_spends_at_most_a_tenth_of_the_budget(clients, z):
    """The paper's m / 20 for a large cohort; for 8 clients a round it would take most of the budget (at z 1.67 all
    of it: refused), so the default is raised until the update's noise rises by 5.4 % at most."""
    strategy = DPFedAvg(epsilon=None, noise_multiplier=z, adaptive=AdaptiveClipping())
    strategy.setup(Federation(num_clients=2 * clients, clients_per_round=clients, num_rounds=10, sampling="poisson"))
    count = strategy._count_noise
    assert count == pytest.approx(max(clients / 20, z / (2 * math.sqrt(0.1))))
    assert (2 * count) ** -2 <= 0.1 * z**-2 + 1e-12  # the count's share of the RDP budget
    assert z < strategy._update_multiplier <= z / math.sqrt(0.9) + 1e-9  # 5.4 % more at most
    if clients == 200:
        assert count == 10.0  # the paper's own, where it costs little
    with pytest.raises(ConfigError, match="too small for noise multiplier"):  # a count_noise given is kept
        given = DPFedAvg(epsilon=None, noise_multiplier=z, adaptive=AdaptiveClipping(count_noise=z / 2))
        given.setup(Federation(num_clients=2 * clients, clients_per_round=clients, num_rounds=10, sampling="poisson"))


def test_secure_aggregation_refuses_adaptive_clipping_in_one_line():
    with pytest.raises(ConfigError, match=r"needs (every client.s individual update|each client.s own)"):
        check_run(RunParts(strategy=DPFedAvg(adaptive=AdaptiveClipping()), secure_aggregation=True))
    check_run(RunParts(strategy=DPFedAvg(), secure_aggregation=True))  # fixed clipping: each client clips its own


def test_the_plan_says_the_counts_noise_and_what_it_leaves_the_update():
    from fedpeft_pl.privacy import default_count_noise

    federation = Federation(num_clients=64, clients_per_round=8, num_rounds=50, sampling="poisson")
    strategy = DPFedAvg(clip_norm=0.1, epsilon=5.0, adaptive=AdaptiveClipping())
    plan = strategy.privacy_plan(federation)
    z = float(plan.split("noise multiplier ")[1].split(" ")[0])
    count = default_count_noise(8, z)
    assert f"count noise {count:.4g} leaves the update's noise multiplier " in plan
    update = float(plan.rsplit("noise multiplier ", 1)[1])
    assert update == pytest.approx(AdaptiveClipping().update_multiplier(z, count), abs=1e-4) and update > z
    given = DPFedAvg(clip_norm=0.1, epsilon=5.0, adaptive=AdaptiveClipping(count_noise=0.2)).privacy_plan(federation)
    assert "count noise 0.2 (given): AdaptiveClipping count_noise 0.2 is too small" in given
    assert "count noise" not in DPFedAvg(epsilon=5.0).privacy_plan(federation)
