import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_module
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedpeft_pl import ConfigError, Federation
from fedpeft_pl.peft import Adapter, Bias, Full, LoRA, Prompt, trainable_parameters
from fedpeft_pl.privacy import DPFedAvg, LocalDP, _append, clipped_gradient_sum
from fedpeft_pl.strategies import ClientUpdate

METHODS = [Prompt(num_tokens=3, deep=True), Adapter(reduction_factor=4), LoRA(rank=2), Bias(), Full()]


def perturbed(peft):
    """A tiny module whose identity-at-start paths are already non-zero, so every tensor has a gradient."""
    torch.manual_seed(0)
    module = tiny_module(peft)
    with torch.no_grad():
        for param in trainable_parameters(module).values():
            param.add_(0.02 * torch.randn_like(param))
    return module


def batch(size=6):
    torch.manual_seed(1)
    return torch.randn(size, 3, 32, 32), torch.randint(0, 10, (size,))


@pytest.mark.parametrize("peft", METHODS, ids=lambda p: type(p).__name__)
def test_per_sample_clipping_equals_an_explicit_loop(peft):
    module = perturbed(peft)
    images, labels = batch()
    clip = 0.05
    sums, losses = clipped_gradient_sum(module, images, labels, max_grad_norm=clip, chunk_size=4)
    expected = {name: torch.zeros_like(p) for name, p in trainable_parameters(module).items()}
    for i in range(len(labels)):
        module.zero_grad()
        loss = F.cross_entropy(module(images[i : i + 1]), labels[i : i + 1])
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainable_parameters(module).items()}
        norm = torch.stack([g.norm() for g in grads.values()]).norm()
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for name, g in grads.items():
            expected[name] += g * factor
        torch.testing.assert_close(losses[i], loss.detach())
    for name in expected:
        torch.testing.assert_close(sums[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("peft", [Prompt(num_tokens=3), Full()], ids=["prompt", "full"])
def test_without_noise_or_clipping_the_private_gradient_is_the_ordinary_one(peft):
    module = perturbed(peft)
    images, labels = batch(8)
    sums, _ = clipped_gradient_sum(module, images, labels, max_grad_norm=math.inf, chunk_size=3)
    module.zero_grad()
    F.cross_entropy(module(images), labels).backward()
    for name, param in trainable_parameters(module).items():
        torch.testing.assert_close(sums[name] / len(labels), param.grad, rtol=1e-4, atol=1e-6)


def test_per_client_accounting_matches_opacus_across_participations():
    dp = LocalDP(epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
    sigma, rate = 1.1, 0.05
    for steps in (20, 20, 13):  # three participations of a client
        dp._histories[4] = _append(dp._histories.get(4, []), sigma, rate, steps)
    reference = RDPAccountant()
    for _ in range(53):
        reference.step(noise_multiplier=sigma, sample_rate=rate)
    assert dp.spent(4) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert dp.spent(9) == 0.0


def test_calibrated_sigma_reaches_the_target_epsilon():
    sigma = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-3, sample_rate=0.1, steps=200, accountant="rdp")
    accountant = RDPAccountant()
    accountant.history = [(sigma, 0.1, 200)]
    assert 1.9 < accountant.get_epsilon(1e-3) <= 2.0


def test_dp_fedavg_clips_each_update_and_accounts_each_round():
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=0.0)
    strategy.setup(Federation(10, 2, 5, sampling="poisson", seed=0))
    global_state = {"w": torch.zeros(2)}
    updates = [
        ClientUpdate(0, 5, {"w": torch.tensor([3.0, 4.0])}),
        ClientUpdate(1, 50, {"w": torch.tensor([0.1, 0.0])}),
    ]
    result = strategy.aggregate_fit(1, global_state, updates)
    # [3, 4] has norm 5 -> clipped to [0.6, 0.8]; unweighted sum over the expected 2 clients
    torch.testing.assert_close(result["w"], torch.tensor([(0.6 + 0.1) / 2, 0.8 / 2]))
    noisy = DPFedAvg(clip_norm=1.0, epsilon=5.0, delta=1e-3)
    noisy.setup(Federation(10, 2, 5, sampling="poisson", seed=0))
    noisy.aggregate_fit(1, global_state, updates)
    assert noisy.epsilon_spent() > 0
    noisy.aggregate_fit(2, global_state, updates)
    reference = RDPAccountant()
    for _ in range(2):
        reference.step(noise_multiplier=noisy.noise_multiplier, sample_rate=0.2)
    assert noisy.epsilon_spent() == pytest.approx(reference.get_epsilon(1e-3))


def test_dp_fedavg_refuses_fixed_size_client_sampling():
    with pytest.raises(ConfigError, match="client_sampling: poisson"):
        DPFedAvg().setup(Federation(10, 2, 5, sampling="uniform", seed=0))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LocalDP(epsilon=0.0),
        lambda: LocalDP(epsilon=-1.0),
        lambda: LocalDP(delta=0.0),
        lambda: LocalDP(delta=1.0),
        lambda: LocalDP(max_grad_norm=0.0),
        lambda: LocalDP(accountant="gdp-ish"),
        lambda: LocalDP(epsilon=None, noise_multiplier=None),
        lambda: DPFedAvg(clip_norm=-1.0),
        lambda: DPFedAvg(delta=1.5),
        lambda: DPFedAvg(epsilon=0.0),
    ],
)
def test_invalid_privacy_parameters_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


# -- local DP in real federated runs ----------------------------------------------------------------


def _dp_fit(
    tmp_path,
    privacy,
    rounds=1,
    clients=2,
    num_clients=4,
    batch_size=32,
    local_epochs=1,
    logger_dir=None,
    client_test_fraction=0.0,
    **kwargs,
):
    from helpers import tiny_datamodule, tiny_trainer
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = tiny_module(Prompt(num_tokens=2))
    datamodule = tiny_datamodule(
        num_clients=num_clients, batch_size=batch_size, client_test_fraction=client_test_fraction
    )
    logged = privacy is not None or logger_dir is not None
    trainer = tiny_trainer(
        tmp_path,
        num_rounds=rounds,
        clients_per_round=clients,
        local_epochs=local_epochs,
        privacy=privacy,
        logger=CSVLogger(str(logger_dir or tmp_path), name="run") if logged else False,
        **kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, datamodule


def test_without_noise_or_clipping_a_private_run_equals_the_ordinary_run(tmp_path):
    # a batch as large as each client's data makes the Poisson batch the whole split (rate 1), as
    # the ordinary loader's single batch is; then DP-SGD with sigma 0 and C = inf is plain SGD
    from fedpeft_pl.peft import trainable_state

    _, plain, _ = _dp_fit(tmp_path / "plain", None, local_epochs=2, batch_size=1000)
    privacy = LocalDP(epsilon=None, noise_multiplier=0.0, max_grad_norm=math.inf)
    _, private, _ = _dp_fit(tmp_path / "private", privacy, local_epochs=2, batch_size=1000)
    assert plain.automatic_optimization and not private.automatic_optimization
    expected, got = trainable_state(plain), trainable_state(private)
    torch.manual_seed(0)
    initial = trainable_state(tiny_module(Prompt(num_tokens=2)))
    assert all(not torch.allclose(expected[n], initial[n]) for n in expected)  # the round really trained
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_local_dp_accounts_each_client_and_drops_it_when_its_budget_is_spent(tmp_path, caplog):
    import csv

    # each of the 4 clients trains in every round; the budget allows one participation, not two
    sigma, delta = 1.0, 1e-3
    _, _, datamodule = _dp_fit(tmp_path / "probe", None, num_clients=4, clients=4)
    rates = {c: min(1.0, 32 / datamodule.client_num_samples(c)) for c in range(4)}
    steps = {c: datamodule.client_num_batches(c) for c in range(4)}

    def opacus_epsilon(client, participations):
        accountant = RDPAccountant()
        for _ in range(participations * steps[client]):
            accountant.step(noise_multiplier=sigma, sample_rate=rates[client])
        return accountant.get_epsilon(delta)

    once = [opacus_epsilon(c, 1) for c in range(4)]
    twice = [opacus_epsilon(c, 2) for c in range(4)]
    budget = (max(once) + min(twice)) / 2
    assert max(once) < budget < min(twice)
    privacy = LocalDP(epsilon=budget, delta=delta, noise_multiplier=sigma, max_grad_norm=1.0)
    with caplog.at_level("INFO", logger="fedpeft_pl"):
        _trainer, _module, _ = _dp_fit(tmp_path / "dp", privacy, rounds=2, num_clients=4, clients=4)
    for client in range(4):
        assert privacy.spent(client) == pytest.approx(once[client], rel=1e-6)
    rows = list(csv.DictReader(open(next((tmp_path / "dp").rglob("metrics.csv")))))
    logged = [float(r["privacy/client_epsilon_max"]) for r in rows if r.get("privacy/client_epsilon_max")]
    assert logged == [pytest.approx(max(once), rel=1e-6)] * 2
    dropped = [float(r["round/clients_dropped"]) for r in rows if r.get("round/clients_dropped")]
    assert dropped == [0, 4]
    assert sum("privacy budget is spent" in r.message for r in caplog.records) == 4
    # nothing was sent to a client whose budget was spent
    down = [float(r["comm/bytes_down"]) for r in rows if r.get("comm/bytes_down")]
    assert down[1] == 0 and down[0] > 0
    # the noise multiplier a target epsilon calibrates is opacus' own
    calibrated = LocalDP(epsilon=5.0, delta=delta)
    _dp_fit(tmp_path / "calibrated", calibrated, rounds=1, num_clients=4, clients=2)
    client = next(iter(calibrated._sigma))
    assert calibrated._sigma[client] == pytest.approx(
        get_noise_multiplier(
            target_epsilon=5.0, target_delta=delta, sample_rate=rates[client], steps=1 * steps[client], accountant="rdp"
        )
    )
    assert calibrated.spent(client) <= 5.0 + 1e-6


def test_poisson_batches_have_the_expected_size_and_may_be_empty():
    import numpy as np

    from fedpeft_pl.data.datamodule import ClientBatchSampler

    sampler = ClientBatchSampler(batch_size=4, poisson=True)
    sampler.assign(np.arange(40), seed=0)
    sizes = [len(b) for _ in range(200) for b in sampler]
    assert len(list(sampler)) == len(sampler) == 10
    assert abs(np.mean(sizes) - 4) < 0.3 and 0 in sizes
    sampler.assign(np.arange(40), seed=0)
    first = list(sampler)
    sampler.assign(np.arange(40), seed=0)
    assert list(sampler) == first


# -- what a private run logs ---------------------------------------------------------------------------


def _logged(tmp_path):
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    return {key for row in rows for key, value in row.items() if value}


@pytest.mark.parametrize("kind", ["local", "central"])
def test_a_private_run_logs_no_per_client_statistics_unless_asked(tmp_path, caplog, kind):
    def private(**flag):  # every client takes part (q = 1), so that there is a training loss to log
        if kind == "local":
            return {"privacy": LocalDP(epsilon=None, noise_multiplier=1.0, **flag), "clients": 4}
        return {
            "privacy": None,
            "aggregation": DPFedAvg(noise_multiplier=1.0, **flag),
            "client_sampling": "poisson",
            "clients": 4,
        }

    tests = {"client_test_fraction": 0.25}  # each client also holds out a test split
    if kind == "local":  # what a run without DP logs
        _dp_fit(tmp_path / "plain", None, logger_dir=tmp_path / "plain", **tests)
        assert {"train/loss", "clients/acc_mean"} <= _logged(tmp_path / "plain")
        assert list((tmp_path / "plain").rglob("client_label_histogram.csv"))
    caplog.clear()  # only what the private run says
    with caplog.at_level("INFO", logger="fedpeft_pl"):
        _dp_fit(tmp_path / "dp", logger_dir=tmp_path / "dp", **private(), **tests)
    assert not {"train/loss", "clients/acc_mean"} & _logged(tmp_path / "dp")
    assert not list((tmp_path / "dp").rglob("client_label_histogram.csv"))
    assert any("not collected in this private run" in r.getMessage() for r in caplog.records)
    assert not any("classes per client" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("INFO", logger="fedpeft_pl"):
        _dp_fit(tmp_path / "flag", logger_dir=tmp_path / "flag", **private(release_client_statistics=True), **tests)
    assert {"train/loss", "clients/acc_mean"} <= _logged(tmp_path / "flag")
    assert list((tmp_path / "flag").rglob("client_label_histogram.csv"))
    assert any(r.levelname == "WARNING" and "un-noised per-client statistics" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("overlay", ["central", "local", "ftrl", "distributed", "adaptive"])
@pytest.mark.parametrize("hidden", ["opacus", "dp_accounting", "scipy"])
def test_without_the_dp_extra_a_private_config_is_a_one_line_error_naming_it(overlay, hidden, monkeypatch, capsys):
    """opacus, dp-accounting and SciPy are the ``dp`` extra: a DP config without one of them says how to install it,
    before anything is built or trained."""
    import sys
    from pathlib import Path

    from fedpeft_pl.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setitem(sys.modules, hidden, None)  # as if not installed
    config = ["--config", "configs/quickstart.yaml", "--config", f"configs/experiments/dp/{overlay}.yaml"]
    with pytest.raises(SystemExit) as exited:
        main(["comm", *config])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    name = {"dp_accounting": "dp-accounting"}.get(hidden, hidden)
    assert len(err.splitlines()) == 1 and "pip install 'fedpeft-pl[dp]'" in err and name in err, err


def test_the_default_install_pulls_in_no_scipy():
    """torchmetrics imports scipy.signal at every start where SciPy is installed: no default dependency may bring it
    (read from the installed distributions' metadata, the extras' requirements left out)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    closure, todo = set(), ["fedpeft-pl"]
    while todo:
        name = todo.pop()
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in needs:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in closure:
                closure.add(dependency)
                todo.append(dependency)
    assert {"torch", "lightning", "timm", "torchmetrics"} <= closure, closure
    assert not closure & {"scipy", "scikit-learn", "opacus", "dp-accounting", "transformers"}, closure
