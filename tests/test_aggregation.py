import pytest
import torch

from fedpeft_pl import ClientUpdate, FedAvg
from fedpeft_pl.aggregation import weighted_average


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
