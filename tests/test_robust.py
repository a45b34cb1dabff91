"""The defences of ``fedpeft_pl.strategies.robust``: each against an aggregate computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft_pl.capabilities import RunParts, check_run
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import Federation
from fedpeft_pl.strategies import (
    Adam,
    Bulyan,
    CenteredClipping,
    ClientUpdate,
    FedAdam,
    FedAvg,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormBound,
    SampleCounts,
    WeightedMean,
)

# the global state: three tensors of three dtypes, not at zero, so the rules must work on the updates
GLOBAL = {
    "a": torch.tensor([1.0, -1.0]),
    "b": torch.tensor([[0.5, 0.5], [0.0, 2.0]], dtype=torch.float64),
    "c": torch.tensor([3.0], dtype=torch.bfloat16),
}
# a unit vector spread over the three tensors: an update ``x * U`` lies at distance |x - y| from ``y * U``
U = {"a": torch.tensor([0.6, 0.0]), "b": torch.tensor([[0.0, 0.0], [0.8, 0.0]], dtype=torch.float64), "c": [0.0]}


def _update(client: int, x: float, samples: int = 1, direction: dict | None = None) -> ClientUpdate:
    direction = direction or U
    state = {n: GLOBAL[n] + torch.as_tensor(direction[n], dtype=GLOBAL[n].dtype) * x for n in GLOBAL}
    return ClientUpdate(client=client, num_samples=samples, state=state)


def _along(x: float) -> dict[str, torch.Tensor]:
    return {
        n: (GLOBAL[n].double() + torch.as_tensor(U[n], dtype=torch.float64) * x).to(GLOBAL[n].dtype) for n in GLOBAL
    }


def _assert_state(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert result.keys() == GLOBAL.keys()
    for name, tensor in GLOBAL.items():
        assert result[name].dtype == tensor.dtype and result[name].shape == tensor.shape
        torch.testing.assert_close(result[name], expected[name])


def _updates(*xs: float) -> list[ClientUpdate]:
    return [_update(i, x) for i, x in enumerate(xs)]


def test_krum_and_multi_krum_match_a_hand_computation():
    # n = 6, f = 1: each score sums the squared distances to the n - f - 2 = 3 nearest others:
    # 0 -> 1 + 4 + 16 = 21, 1 -> 1 + 1 + 9 = 11, 2 -> 4 + 1 + 4 = 9, 4 -> 16 + 9 + 4 = 29, 100 and -50 far more
    updates = _updates(0, 1, 2, 4, 100, -50)
    krum = Krum(f=1)
    _assert_state(krum.aggregate(updates, GLOBAL), _along(2))
    assert krum.round_metrics() == {"robust/selected": 1.0, "robust/rejected": 5.0}
    multi = MultiKrum(f=1, m=3)  # the three best scores: 2, 1, 0
    _assert_state(multi.aggregate(updates, GLOBAL), _along(1))
    assert multi.round_metrics() == {"robust/selected": 3.0, "robust/rejected": 3.0}
    # m = None keeps n - f = 5: all but the one of the highest score (100)
    _assert_state(MultiKrum(f=1).aggregate(updates, GLOBAL), _along((0 + 1 + 2 + 4 - 50) / 5))
    # f as a fraction of the round's updates: floor(0.2 * 6) = 1
    _assert_state(Krum(f=0.2).aggregate(updates, GLOBAL), _along(2))


def test_bulyan_matches_a_hand_computation():
    # n = 7, f = 1: Krum (n' - 3 neighbours, ties to the first) picks 2, 3.5, 1, 0, 6 (theta = 5) and leaves 100, -60;
    # their median is 2 and the beta = theta - 2f = 3 values nearest it are 2, 1, 3.5
    bulyan = Bulyan(f=1)
    _assert_state(bulyan.aggregate(_updates(0, 1, 2, 3.5, 6, 100, -60), GLOBAL), _along((2 + 1 + 3.5) / 3))
    assert bulyan.round_metrics() == {"robust/selected": 5.0, "robust/rejected": 2.0}


def test_bulyan_is_coordinate_wise_after_the_selection():
    # n = 7, f = 1, everything picked but the two far ones; per coordinate, the 3 values nearest the median of 5
    e1 = {"a": [1.0, 0.0], "b": [[0.0, 0.0], [0.0, 0.0]], "c": [0.0]}
    e2 = {"a": [0.0, 0.0], "b": [[0.0, 0.0], [0.0, 1.0]], "c": [0.0]}
    points = [(0, 0), (1, 0.5), (0.2, 1), (0.4, 0.1), (0.9, 0.8), (60, -40), (-70, 50)]
    updates = []
    for k, (x, y) in enumerate(points):
        state = {n: GLOBAL[n] + torch.as_tensor(e1[n], dtype=GLOBAL[n].dtype) * x for n in GLOBAL}
        state = {n: state[n] + torch.as_tensor(e2[n], dtype=GLOBAL[n].dtype) * y for n in GLOBAL}
        updates.append(ClientUpdate(client=k, num_samples=1, state=state))
    result = Bulyan(f=1).aggregate(updates, GLOBAL)
    # first coordinate 0, 1, 0.2, 0.4, 0.9: median 0.4, nearest 0.4, 0.2, 0 (0, 0.2 and 0.4 away; 0.9 is 0.5 away)
    # second coordinate 0, 0.5, 1, 0.1, 0.8: median 0.5, nearest 0.5, 0.8, 0.1 (0.3 and 0.4 away; 1 is 0.5 away)
    assert result["a"][0].item() == pytest.approx(1.0 + (0.4 + 0.2 + 0.0) / 3)
    assert result["b"][1, 1].item() == pytest.approx(2.0 + (0.5 + 0.8 + 0.1) / 3)
    torch.testing.assert_close(result["c"], GLOBAL["c"])


def test_krum_and_bulyan_agree_with_flower():
    aggregate = pytest.importorskip("flwr.server.strategy.aggregate")
    generator = torch.Generator().manual_seed(3)
    zero = {"x": torch.zeros(4, dtype=torch.float64), "y": torch.zeros(2, 3, dtype=torch.float64)}
    states = [
        {n: torch.randn(t.shape, generator=generator, dtype=torch.float64) for n, t in zero.items()} for _ in range(9)
    ]
    states[2] = {n: t * 40 for n, t in states[2].items()}
    updates = [ClientUpdate(client=k, num_samples=1, state=s) for k, s in enumerate(states)]
    results = [([s["x"].numpy(), s["y"].numpy()], 1) for s in states]
    for mine, theirs in (
        (Krum(f=2), aggregate.aggregate_krum(results, num_malicious=2, to_keep=0)),
        (MultiKrum(f=2, m=4), aggregate.aggregate_krum(results, num_malicious=2, to_keep=4)),
        (Bulyan(f=1), aggregate.aggregate_bulyan(list(results), 1, aggregate.aggregate_krum, to_keep=0)),
    ):
        got = mine.aggregate(updates, zero)
        torch.testing.assert_close(got["x"], torch.as_tensor(theirs[0]))
        torch.testing.assert_close(got["y"], torch.as_tensor(theirs[1]))


def test_geometric_median_matches_a_hand_computation():
    # on a line the geometric median is the (weighted) median: 2 of 0, 1, 2, 5, 1000
    median = GeometricMedian(max_iter=500, tol=0, nu=1e-9)
    _assert_state(median.aggregate(_updates(0, 1, 2, 5, 1000), GLOBAL), _along(2))
    # weighted by the sample counts: 7 of the 12 samples sit at 5
    weighted = [_update(k, x, samples) for k, (x, samples) in enumerate([(0, 1), (1, 1), (2, 3), (5, 7)])]
    _assert_state(median.aggregate(weighted, GLOBAL), _along(5))
    # off a line: against the plain Weiszfeld iteration of the points (0, 0), (4, 0), (0, 3), (1, 2)
    e2 = {"a": [0.0, 1.0], "b": [[0.0, 0.0], [0.0, 0.0]], "c": [0.0]}
    points = [(0, 0), (4, 0), (0, 3), (1, 2)]
    updates = []
    for k, (x, y) in enumerate(points):
        state = {n: GLOBAL[n] + torch.as_tensor(U[n], dtype=GLOBAL[n].dtype) * x for n in GLOBAL}
        updates.append(
            ClientUpdate(client=k, num_samples=1, state={**state, "a": state["a"] + torch.tensor(e2["a"]) * y})
        )
    z = torch.tensor([1.25, 1.25], dtype=torch.float64)  # the mean
    for _ in range(2000):
        b = torch.stack([1 / (torch.tensor(p, dtype=torch.float64) - z).norm().clamp(min=1e-12) for p in points])
        z = (b[:, None] * torch.tensor(points, dtype=torch.float64)).sum(0) / b.sum()
    result = median.aggregate(updates, GLOBAL)
    torch.testing.assert_close(result["a"], torch.tensor([1.0 + 0.6 * z[0].item(), -1.0 + z[1].item()]))
    assert 1 <= median.round_metrics()["robust/iterations"] <= 500


def test_centered_clipping_matches_a_hand_computation_over_two_rounds():
    clipping = CenteredClipping(tau=1.0)
    # round 1, centre 0: 0.5 and -0.5 stay, 3 and 10 are clipped to 1: v = (0.5 - 0.5 + 1 + 1) / 4 = 0.5
    _assert_state(clipping.aggregate(_updates(0.5, -0.5, 3, 10), GLOBAL), _along(0.5))
    assert clipping.round_metrics() == {"robust/clipped": 2.0}
    # round 2 around 0.5: offsets 0 -> -0.5, 1 -> 0.5, 2 -> 1.5 clipped to 1, -9.5 clipped to -1: v = 0.5 + 0 / 4
    _assert_state(clipping.aggregate(_updates(0, 1, 2, -9), GLOBAL), _along(0.5))
    assert clipping.round_metrics() == {"robust/clipped": 2.0}
    # two iterations a round: 0.5, then around 0.5 the offsets 0, -1, 2.5 and 9.5, the last two clipped to 1:
    # 0.5 + (0 - 1 + 1 + 1) / 4 = 0.75
    twice = CenteredClipping(tau=1.0, iterations=2)
    _assert_state(twice.aggregate(_updates(0.5, -0.5, 3, 10), GLOBAL), _along(0.75))


def test_centered_clipping_resumes_exactly_from_its_state_dict():
    first, resumed = CenteredClipping(tau=0.7), CenteredClipping(tau=0.7)
    first.aggregate(_updates(0.5, -2, 3, 10), GLOBAL)
    resumed.load_state_dict(first.state_dict())
    rounds = _updates(1, 2, -4, 0.3)
    _assert_state(resumed.aggregate(rounds, GLOBAL), first.aggregate(rounds, GLOBAL))
    # and the centre matters: a fresh rule clips the same updates elsewhere
    assert not torch.equal(
        CenteredClipping(tau=0.7).aggregate(rounds, GLOBAL)["a"], resumed.aggregate(rounds, GLOBAL)["a"]
    )


def test_norm_bound_matches_a_hand_computation():
    bound = NormBound(bound=2.0)
    # 1 and -1.5 stay, 10 and -8 are cut to 2 and -2; weights 1, 1, 2, 4 of 8
    updates = [_update(0, 1, 1), _update(1, -1.5, 1), _update(2, 10, 2), _update(3, -8, 4)]
    _assert_state(bound.aggregate(updates, GLOBAL), _along((1 - 1.5 + 2 * 2 - 4 * 2) / 8))
    assert bound.round_metrics() == {"robust/clipped": 2.0}


def test_norm_bound_noise_is_secret_unless_reproducible():
    updates = _updates(0, 0, 0)
    federation = Federation(num_clients=3, clients_per_round=3, num_rounds=2, seed=5)
    secret = NormBound(bound=1.0, noise_std=0.1)
    secret.setup(federation)
    first, second = (NormBound(bound=1.0, noise_std=0.1, reproducible_noise=True) for _ in range(2))
    first.setup(federation)
    second.setup(federation)
    a = first.aggregate(updates, GLOBAL)["b"]
    assert torch.equal(a, second.aggregate(updates, GLOBAL)["b"])  # the same seed, the same noise
    assert not torch.equal(a, first.aggregate(updates, GLOBAL)["b"])  # a fresh draw each server update
    assert not torch.equal(secret.aggregate(updates, GLOBAL)["b"], a)
    noise = a - GLOBAL["b"]
    assert 0 < noise.abs().max() < 1  # std 0.1 on four coordinates


def test_sample_counts_cap_equalise_or_replace_the_claimed_counts():
    # a client claims a million samples for its update at 100
    updates = [_update(0, 0, 10), _update(1, 3, 20), _update(2, 100, 1_000_000)]
    capped = SampleCounts(max_samples=20)
    _assert_state(capped.aggregate(updates, GLOBAL), _along((0 * 10 + 3 * 20 + 100 * 20) / 50))
    assert capped.round_metrics() == {"robust/capped": 1.0}
    _assert_state(SampleCounts(uniform=True).aggregate(updates, GLOBAL), _along(103 / 3))
    known = SampleCounts(known_sizes={0: 30, 1: 10, 2: 10})
    _assert_state(known.aggregate(updates, GLOBAL), _along((3 * 10 + 100 * 10) / 50))
    # a wrapped rule weighs by the rewritten counts
    median = SampleCounts(GeometricMedian(max_iter=500, tol=0, nu=1e-9), uniform=True)
    _assert_state(median.aggregate([_update(0, 0, 1), _update(1, 1, 1), _update(2, 9, 100)], GLOBAL), _along(1))


@pytest.mark.parametrize(
    "aggregator",
    [Krum(f=2), MultiKrum(f=2), Bulyan(f=1), GeometricMedian(), CenteredClipping(tau=1.0), NormBound(bound=1.0)],
    ids=lambda a: type(a).__name__,
)
def test_defences_resist_two_huge_updates(aggregator):
    honest = [0.1, -0.2, 0.3, 0.0, -0.1, 0.2, 0.05]
    updates = _updates(*honest, 1e6, -3e5)
    result = aggregator.aggregate(updates, GLOBAL)
    assert WeightedMean().aggregate(updates, GLOBAL)["a"][0] > 1e4  # the mean is wrecked
    assert (result["a"][0] - GLOBAL["a"][0]).abs() < 1.0  # the defence is not


def test_krum_feeds_fedadam_as_a_hand_computation_says():
    updates = _updates(0, 1, 2, 4, 100, -50)  # Krum picks 2 (above): delta = 2 * U
    lr, beta1, beta2, tau = 0.1, 0.9, 0.99, 1e-3
    for strategy in (
        FedAvg(aggregator=Krum(f=1), server_optimizer=Adam(lr=lr, beta1=beta1, beta2=beta2, tau=tau)),
        FedAdam(lr=lr, beta1=beta1, beta2=beta2, tau=tau, aggregator=Krum(f=1)),
    ):
        result = strategy.aggregate_fit(1, GLOBAL, updates)
        for name, tensor in GLOBAL.items():
            delta = torch.as_tensor(U[name], dtype=torch.float32) * 2
            m = (1 - beta1) * delta
            v = (1 - beta2) * delta**2
            expected = (tensor.float() + lr * m / (v.sqrt() + tau)).to(tensor.dtype)
            torch.testing.assert_close(result[name], expected)
        assert strategy.round_metrics() == {"robust/selected": 1.0, "robust/rejected": 5.0}


@pytest.mark.parametrize(
    "aggregator",
    [Krum(), MultiKrum(), Bulyan(), GeometricMedian(), CenteredClipping(), NormBound(), SampleCounts(uniform=True)],
    ids=lambda a: type(a).__name__,
)
def test_secure_aggregation_refuses_every_defence_in_one_line(aggregator):
    assert aggregator.needs_individual_updates
    with pytest.raises(ConfigError) as refused:
        check_run(RunParts(strategy=FedAdam(aggregator=aggregator), secure_aggregation=True))
    assert "\n" not in str(refused.value) and "individual update" in str(refused.value)


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: Krum(f=-1), "f must be >= 0"),
        (lambda: Krum(f=0.5), "[0, 0.5)"),
        (lambda: Krum(f=True), "int or a fraction"),
        (lambda: MultiKrum(m=0), "m must be"),
        (lambda: Bulyan(f=0.3), "[0, 0.25)"),
        (lambda: GeometricMedian(max_iter=0), "max_iter"),
        (lambda: GeometricMedian(nu=0), "nu > 0"),
        (lambda: CenteredClipping(tau=0), "tau must be > 0"),
        (lambda: CenteredClipping(iterations=0), "iterations"),
        (lambda: NormBound(bound=-1), "bound must be > 0"),
        (lambda: NormBound(noise_std=-0.1), "noise_std"),
        (lambda: SampleCounts(), "needs max_samples"),
        (lambda: SampleCounts(uniform=True, max_samples=5), "uniform"),
        (lambda: SampleCounts(max_samples=0), "max_samples must be"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(build, words):
    with pytest.raises(ConfigError) as refused:
        build()
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_too_few_updates_are_refused_in_one_line_at_setup_and_in_a_round():
    small = Federation(num_clients=10, clients_per_round=4, num_rounds=1)
    for aggregator, words in ((Krum(f=1), "more than 2f + 2 = 4"), (Bulyan(f=1), "at least 4f + 3 = 7")):
        with pytest.raises(ConfigError, match=r"sample more clients") as refused:
            FedAvg(aggregator=aggregator).setup(small)
        assert words in str(refused.value) and "\n" not in str(refused.value)
        with pytest.raises(ConfigError, match=r"sample more clients"):
            aggregator.aggregate(_updates(0, 1, 2, 3), GLOBAL)
    with pytest.raises(ConfigError, match="more than n - f"):
        Krum(f=1, m=6).aggregate(_updates(0, 1, 2, 3, 4, 5), GLOBAL)
    with pytest.raises(ConfigError, match="no size for client 2"):
        SampleCounts(known_sizes={0: 1, 1: 1}).aggregate(_updates(0, 1, 2), GLOBAL)
    # enough clients: set up without a word, and f as a fraction is counted on the round's updates
    FedAvg(aggregator=Bulyan(f=0.2)).setup(Federation(num_clients=10, clients_per_round=7, num_rounds=1))
    assert math.isfinite(float(Bulyan(f=0.2).aggregate(_updates(*range(7)), GLOBAL)["a"][0]))


def test_readme_defence_example_builds_its_parts(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from helpers import build_overlay, manual_text

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    blocks = re.findall(r"```yaml\n(.*?)```", manual_text(), flags=re.S)
    example = next(b for b in blocks if "fedpeft_pl.strategies.SampleCounts" in b)
    trainer, _, _ = build_overlay(tmp_path, example)
    strategy = trainer.aggregation.strategy
    assert type(strategy) is FedAdam and type(strategy.aggregator) is SampleCounts
    assert strategy.aggregator.max_samples == 500 and type(strategy.aggregator.aggregator) is NormBound
    assert strategy.aggregator.aggregator.bound == 1.0
