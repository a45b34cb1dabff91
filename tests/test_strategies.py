import math

import pytest
import torch

from fedpeft_pl import ClientContext, ConfigError
from fedpeft_pl.availability import ClientAvailability
from fedpeft_pl.comm import payload_bytes
from fedpeft_pl.compression import BFloat16, Codec, Float16, Int8
from fedpeft_pl.strategies import (
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    weighted_average,
)


def updates_from(values, counts=None):
    counts = counts or [1] * len(values)
    return [
        ClientUpdate(i, n, {"w": torch.tensor(v, dtype=torch.float32)}) for i, (v, n) in enumerate(zip(values, counts))
    ]


def test_fedavg_matches_a_hand_computation():
    updates = [
        ClientUpdate(0, 10, {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}),
        ClientUpdate(3, 30, {"w": torch.tensor([5.0, -2.0]), "b": torch.tensor([4.0])}),
        ClientUpdate(7, 60, {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([-1.0])}),
    ]
    # w = (10*[1,2] + 30*[5,-2] + 60*[0,1]) / 100 = [1.6, 0.2]; b = (0 + 120 - 60) / 100 = 0.6
    result = FedAvg().aggregate_fit(1, {}, updates)
    torch.testing.assert_close(result["w"], torch.tensor([1.6, 0.2]))
    torch.testing.assert_close(result["b"], torch.tensor([0.6]))


def test_weighted_average_keeps_dtype_and_shape():
    updates = [ClientUpdate(i, i + 1, {"x": torch.full((2, 3), float(i), dtype=torch.float16)}) for i in range(3)]
    result = weighted_average(updates)
    assert result["x"].dtype == torch.float16 and result["x"].shape == (2, 3)
    # (0*1 + 1*2 + 2*3) / 6
    torch.testing.assert_close(result["x"].float(), torch.full((2, 3), 8 / 6), atol=1e-3, rtol=0)


def test_fedavg_of_identical_states_is_that_state():
    state = {"w": torch.randn(4, 4)}
    updates = [ClientUpdate(i, n, {"w": state["w"].clone()}) for i, n in enumerate([1, 7, 100])]
    torch.testing.assert_close(FedAvg().aggregate_fit(1, {}, updates)["w"], state["w"])


def test_updates_without_samples_cannot_be_averaged():
    with pytest.raises(ValueError):
        weighted_average([ClientUpdate(0, 0, {"w": torch.zeros(1)})])


def test_fedadam_matches_a_hand_computation_over_two_rounds():
    strategy = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    state = {"w": torch.tensor([1.0, -2.0])}
    # round 1: mean of clients = [1.5, -1.0] -> delta = [0.5, 1.0]
    state = strategy.aggregate_fit(1, state, updates_from([[1.0, -1.0], [2.0, -1.0]]))
    m = [0.1 * 0.5, 0.1 * 1.0]
    v = [0.01 * 0.25, 0.01 * 1.0]
    expected = [1.0 + 0.1 * m[0] / (math.sqrt(v[0]) + 0.01), -2.0 + 0.1 * m[1] / (math.sqrt(v[1]) + 0.01)]
    torch.testing.assert_close(state["w"], torch.tensor(expected))
    # round 2: both clients send the current state plus 1 -> delta = [1, 1]
    state = strategy.aggregate_fit(2, state, updates_from([(state["w"] + 1).tolist()] * 2))
    m = [0.9 * m[0] + 0.1, 0.9 * m[1] + 0.1]
    v = [0.99 * v[0] + 0.01, 0.99 * v[1] + 0.01]
    expected = [e + 0.1 * mi / (math.sqrt(vi) + 0.01) for e, mi, vi in zip(expected, m, v)]
    torch.testing.assert_close(state["w"], torch.tensor(expected))


def test_fedyogi_and_fedadagrad_second_moments():
    delta = torch.tensor([2.0])
    assert FedAdagrad().second_moment(torch.tensor([1.0]), delta).item() == 5.0
    # v - (1 - beta2) * delta^2 * sign(v - delta^2) = 1 - 0.01 * 4 * (-1)
    assert FedYogi(beta2=0.99).second_moment(torch.tensor([1.0]), delta).item() == pytest.approx(1.04)


def test_server_optimizer_state_round_trips_through_a_checkpoint():
    first = FedYogi(lr=0.05)
    state = {"w": torch.zeros(3)}
    state = first.aggregate_fit(1, state, updates_from([[1.0, 2.0, 3.0]]))
    second = FedYogi(lr=0.05)
    second.load_state_dict(first.state_dict())
    updates = updates_from([[0.5, 0.5, 0.5]])
    torch.testing.assert_close(
        first.aggregate_fit(2, state, updates)["w"], second.aggregate_fit(2, state, updates)["w"]
    )


def test_fedprox_adds_its_proximal_term_on_the_client_and_aggregates_like_fedavg():
    updates = updates_from([[1.0], [3.0]], counts=[1, 3])
    received = {"w": torch.tensor([1.0, 2.0])}
    context = ClientContext(0, 1, received)
    term = FedProx(mu=0.1).client_loss({"w": torch.tensor([2.0, 0.0])}, context)
    assert term.item() == pytest.approx(0.1 / 2 * (1.0 + 4.0))
    assert FedProx(mu=0.0).client_loss({"w": torch.tensor([2.0, 0.0])}, context) is None
    torch.testing.assert_close(
        FedProx(mu=0.1).aggregate_fit(1, {}, updates)["w"], FedAvg().aggregate_fit(1, {}, updates)["w"]
    )


@pytest.mark.parametrize("strategy", [FedMedian(), FedTrimmedAvg(beta=0.2)], ids=repr)
def test_robust_aggregation_resists_one_huge_update(strategy):
    torch.manual_seed(0)
    honest = [torch.randn(1000) * 0.1 + 1.0 for _ in range(9)]
    attack = torch.full((1000,), 1e6)
    updates = [ClientUpdate(i, 10, {"w": w}) for i, w in enumerate([*honest, attack])]
    honest_mean = torch.stack(honest).mean(0)
    robust = strategy.aggregate_fit(1, {}, updates)["w"]
    assert (robust - honest_mean).abs().max() < 0.15
    assert (FedAvg().aggregate_fit(1, {}, updates)["w"] - honest_mean).abs().min() > 1e4


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    result = FedMedian().aggregate_fit(1, {}, updates_from([[1.0], [2.0], [10.0], [4.0]]))
    assert result["w"].item() == 3.0


def test_trimmed_mean_drops_both_ends():
    result = FedTrimmedAvg(beta=0.25).aggregate_fit(1, {}, updates_from([[0.0], [1.0], [2.0], [100.0]]))
    assert result["w"].item() == 1.5


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedProx(mu=-1),
        lambda: FedAdam(lr=0),
        lambda: FedYogi(beta1=1.0),
        lambda: FedTrimmedAvg(beta=0.5),
        lambda: FedAvg(min_clients=0),
    ],
)
def test_invalid_strategy_arguments_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


# -- compression ------------------------------------------------------------------------------------


def sample_state():
    torch.manual_seed(0)
    return {"a": torch.randn(100, 30), "b": torch.randn(7) * 1e-3, "zero": torch.zeros(4)}


def test_int8_error_is_at_most_half_a_step_per_tensor():
    state = sample_state()
    decoded = Int8().decode(Int8().encode(state), state)
    for name, tensor in state.items():
        step = tensor.abs().max() / 127
        assert (decoded[name] - tensor).abs().max() <= step / 2 + 1e-7
        assert decoded[name].dtype == tensor.dtype


@pytest.mark.parametrize(
    ("codec", "expected"),
    [
        (Codec(), (3000 + 7 + 4) * 4),
        (Float16(), (3000 + 7 + 4) * 2),
        (BFloat16(), (3000 + 7 + 4) * 2),
        (Int8(), (3000 + 7 + 4) * 1 + 3 * 4),  # one float32 scale per tensor
    ],
    ids=["none", "fp16", "bf16", "int8"],
)
def test_compressed_byte_counts_are_exact(codec, expected):
    assert payload_bytes(codec.encode(sample_state())) == expected


def test_int8_upload_is_about_four_times_smaller():
    state = {"w": torch.randn(10_000)}
    assert payload_bytes(state) / payload_bytes(Int8().encode(state)) > 3.99


def test_error_feedback_carries_the_quantization_error_to_the_next_message():
    codec = Int8(error_feedback=True)
    update = {"w": torch.tensor([1.0, 0.003, -0.3])}  # 0.003 is under half a step (1/254)
    sent_total = torch.zeros(3)
    for _ in range(200):
        sent_total += codec.decode(codec.encode(update, client=5), update)["w"]
        codec.commit(5)
    # without feedback the small coordinate would round to zero every time
    torch.testing.assert_close(sent_total / 200, update["w"], atol=1e-3, rtol=0)
    without = Int8().decode(Int8().encode(update), update)["w"]
    assert without[1] == 0.0
    restored = Int8(error_feedback=True)
    restored.load_state_dict(codec.state_dict())
    assert torch.equal(restored._residuals[5]["w"], codec._residuals[5]["w"])


# -- availability -----------------------------------------------------------------------------------


def test_dropout_and_stragglers_are_reproducible_and_near_their_rates():
    availability = ClientAvailability(dropout=0.2, stragglers=0.5, straggler_work=(0.2, 0.6))
    plans = [availability.plan(7, r, c, 10) for r in range(1, 101) for c in range(20)]
    assert plans == [availability.plan(7, r, c, 10) for r in range(1, 101) for c in range(20)]
    assert plans != [availability.plan(8, r, c, 10) for r in range(1, 101) for c in range(20)]
    dropped = sum(p.dropped for p in plans) / len(plans)
    stragglers = [p for p in plans if p.straggler]
    assert 0.17 < dropped < 0.23
    assert 0.45 < len(stragglers) / sum(not p.dropped for p in plans) < 0.55
    assert all(2 <= p.batches <= 6 for p in stragglers)
    assert all(p.batches == 10 for p in plans if not p.dropped and not p.straggler)


def test_no_availability_model_means_everyone_does_everything():
    assert ClientAvailability().plan(0, 1, 3, 12).batches == 12


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"stragglers": 1.5},
        {"straggler_work": (0.0, 0.5)},
        {"straggler_work": (0.8, 0.2)},
    ],
)
def test_invalid_availability_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        ClientAvailability(**kwargs)
