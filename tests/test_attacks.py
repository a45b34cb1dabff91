"""Clients that lie (``fedpeft_pl.attacks``): each attack against a hand computation, the harness's figures,
and the same attack on both runners."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import manual_text, sgd, tiny_backbone, tiny_datamodule, tiny_trainer
from lightning.pytorch.loggers import CSVLogger

from fedpeft_pl import FedPEFTModule
from fedpeft_pl.attacks import (
    ALIE,
    IPM,
    Backdoor,
    GaussianNoise,
    LabelFlip,
    MinMax,
    MinSum,
    PoisonedData,
    QuantityInflation,
    SignFlip,
    load_attack,
)
from fedpeft_pl.capabilities import RunParts, check_run
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientContext, Federation, Round
from fedpeft_pl.peft import Head, Prompt, trainable_state
from fedpeft_pl.server import Server
from fedpeft_pl.strategies import ClientUpdate, FedAvg, Krum, MultiKrum, SampleCounts, WeightedMean

REPO = Path(__file__).resolve().parents[1]

GLOBAL = {"w": torch.tensor([1.0, -1.0, 0.5]), "b": torch.tensor([[0.25, 0.0]], dtype=torch.float64)}


def _context(client: int = 0, server_round: int = 1) -> ClientContext:
    return ClientContext(client=client, server_round=server_round, received=dict(GLOBAL))


def _state(delta: list[float]) -> dict[str, torch.Tensor]:
    flat = torch.tensor(delta, dtype=torch.float64)
    return {"w": (GLOBAL["w"].double() + flat[:3]).float(), "b": GLOBAL["b"] + flat[3:].view(1, 2)}


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[n].double() - GLOBAL[n].double()).flatten() for n in ("w", "b")])


def test_the_malicious_clients_are_a_seeded_fraction_or_a_list():
    federation = Federation(num_clients=20, clients_per_round=5, num_rounds=1, seed=3)
    attack = SignFlip(fraction=0.25)
    attack.setup(federation)
    again = SignFlip(fraction=0.25)
    again.setup(federation)
    assert len(attack.malicious) == 5 and attack.malicious == again.malicious
    other = SignFlip(fraction=0.25)
    other.setup(Federation(num_clients=20, clients_per_round=5, num_rounds=1, seed=4))
    assert other.malicious != attack.malicious  # from the run's seed
    listed = SignFlip(clients=[2, 7])
    listed.setup(federation)
    assert listed.malicious == {2, 7} and listed.is_malicious(7) and not listed.is_malicious(3)
    with pytest.raises(ConfigError, match="beyond the federation's 20 clients"):
        SignFlip(clients=[25]).setup(federation)
    for bad in ({"fraction": 1.0}, {"fraction": -0.1}, {"scale": 0.0}, {"clients": [-1]}):
        with pytest.raises(ConfigError):
            SignFlip(**bad)


def test_sign_flip_noise_and_inflation_act_on_what_the_client_sends():
    trained = _state([0.5, 0.0, -1.0, 2.0, 0.0])
    flipped = SignFlip(scale=3.0, clients=[0]).tamper(_context(), trained)
    torch.testing.assert_close(_flat(flipped), -3.0 * _flat(trained))
    assert flipped["w"].dtype == torch.float32 and flipped["b"].dtype == torch.float64

    noise = GaussianNoise(std=2.0, clients=[0, 1])
    noise.setup(Federation(num_clients=4, clients_per_round=2, num_rounds=1, seed=0))
    first = _flat(noise.tamper(_context(0, 1), trained))
    assert torch.equal(first, _flat(noise.tamper(_context(0, 1), trained)))  # seeded by round and client
    assert not torch.equal(first, _flat(noise.tamper(_context(1, 1), trained)))
    assert not torch.equal(first, _flat(noise.tamper(_context(0, 2), trained)))
    many = torch.cat([_flat(noise.tamper(_context(0, r), trained)) for r in range(400)])
    assert float(many.mean()) == pytest.approx(0.0, abs=0.15) and float(many.std()) == pytest.approx(2.0, rel=0.05)

    assert QuantityInflation(factor=50, clients=[0]).report(0, 12) == 600


def test_label_flip_and_the_backdoor_poison_their_clients_samples_only():
    flip = LabelFlip(clients=[1])
    flip.setup(Federation(num_clients=2, clients_per_round=1, num_rounds=1), num_classes=10)
    image = torch.zeros(3, 8, 8)
    assert flip.poison_sample(1, 0, image, 3)[1] == 6 and flip.poison_sample(1, 0, image, 9)[1] == 0
    assert LabelFlip(target=4, clients=[1]).poison_sample(1, 0, image, 3)[1] == 4
    with pytest.raises(ConfigError, match="not a class"):
        LabelFlip(target=10, clients=[0]).setup(Federation(2, 1, 1), num_classes=10)

    samples = [(torch.full((3, 8, 8), float(i)), i % 10) for i in range(40)]
    owners = PoisonedData.owners_of([list(range(20)), list(range(20, 40))], frozenset([1]))
    poisoned = PoisonedData(samples, flip, owners)
    assert [poisoned[i][1] for i in range(20)] == [i % 10 for i in range(20)]  # client 0 is honest
    assert [poisoned[i][1] for i in range(20, 40)] == [9 - i % 10 for i in range(20, 40)]

    backdoor = Backdoor(target=2, patch=2, value=5.0, poison_fraction=0.5, clients=[1])
    backdoor.setup(Federation(num_clients=2, clients_per_round=1, num_rounds=1), num_classes=10)
    triggered = backdoor.trigger(torch.zeros(3, 8, 8))
    assert float(triggered.sum()) == 5.0 * 3 * 4 and float(triggered[:, -2:, -2:].min()) == 5.0
    many = PoisonedData([(torch.zeros(3, 8, 8), 7)] * 2000, backdoor, dict.fromkeys(range(2000), 1))
    carried = [i for i in range(2000) if many[i][1] == 2]
    assert len(carried) == pytest.approx(1000, abs=100)  # about poison_fraction of its samples
    assert all(float(many[i][0][:, -2:, -2:].min()) == 5.0 for i in carried)
    assert all(float(many[i][0].abs().sum()) == 0 for i in range(2000) if i not in carried)
    # its success rate is measured on the triggered test images of the other classes
    test = [(torch.zeros(3, 8, 8), i % 4) for i in range(12)]
    [(name, success_set)] = backdoor.evaluation_sets(test).items()
    assert name == "attack/success_rate" and len(success_set) == 9
    assert all(label == 2 and float(img[:, -2:, -2:].min()) == 5.0 for img, label in success_set)

    boosted = Backdoor(boost=10.0, clients=[0]).tamper(_context(), _state([0.1, 0, 0, 0, 0]))
    torch.testing.assert_close(_flat(boosted), torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64), atol=1e-6, rtol=0)
    # boosted in the listed rounds only (a one-round model replacement); the other rounds' updates go out as trained
    once = Backdoor(boost=10.0, boost_rounds=[3], clients=[0])
    trained = _state([0.1, 0, 0, 0, 0])
    torch.testing.assert_close(_flat(once.tamper(_context(0, 3), trained)), _flat(boosted), atol=1e-6, rtol=0)
    for other in (1, 2, 4):
        assert once.tamper(_context(0, other), trained) is trained
    for bad in ([0], [True], [1.5]):
        with pytest.raises(ConfigError, match="boost_rounds"):
            Backdoor(boost=10.0, boost_rounds=bad, clients=[0])


def _honest() -> list[ClientUpdate]:
    deltas = [[1.0, 0.0, 0.5, 0.0, 1.0], [2.0, 1.0, 0.5, 1.0, 1.0], [0.0, 1.0, 0.5, 0.5, 1.0], [1.0, 2.0, 0.5, 0.5, 1]]
    return [ClientUpdate(i + 2, 10, _state(d)) for i, d in enumerate(deltas)]


def test_the_omniscient_attacks_craft_their_update_from_the_honest_ones():
    honest = _honest()
    malicious = [ClientUpdate(0, 10, _state([9.0] * 5)), ClientUpdate(1, 10, _state([9.0] * 5))]
    rows = torch.stack([_flat(u.state) for u in honest])
    mean, std = rows.mean(0), rows.std(0)

    # ALIE's z_max for n = 6 updates, f = 2: s = floor(6 / 2 + 1) - 2 = 2, Phi^-1((6 - 2) / 6)
    z = ALIE.z_max(6, 2)
    assert z == pytest.approx(0.4307272992954576, abs=1e-9)
    crafted = ALIE(clients=[0, 1]).collude(malicious, honest, GLOBAL)
    assert len(crafted) == 2
    for state in crafted:
        torch.testing.assert_close(_flat(state), mean - z * std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_flat(ALIE(z=1.5, clients=[0]).collude(malicious, honest, GLOBAL)[0]), mean - 1.5 * std)

    torch.testing.assert_close(_flat(IPM(epsilon=0.5, clients=[0]).collude(malicious, honest, GLOBAL)[0]), -0.5 * mean)

    # min-max: the largest gamma whose update lies no farther from any honest update than two honest ones lie apart
    widest = torch.cdist(rows, rows).max()
    for perturbation in ("std", "unit", "sign"):
        attack = MinMax(perturbation=perturbation, clients=[0])
        got = _flat(attack.collude(malicious, honest, GLOBAL)[0])
        assert float((rows - got).norm(dim=1).max()) <= float(widest) * (1 + 1e-6)  # the state holds float32
        direction = got - mean
        beyond = mean + direction * 1.01
        assert float((rows - beyond).norm(dim=1).max()) > float(widest)  # the largest gamma, within 1 %
    # min-sum: its sum of squared distances to the honest updates at most an honest update's largest such sum
    limit = torch.cdist(rows, rows).pow(2).sum(1).max()
    got = _flat(MinSum(clients=[0]).collude(malicious, honest, GLOBAL)[0])
    assert float((rows - got).pow(2).sum()) <= float(limit) * (1 + 1e-6)
    assert float((rows - (mean + (got - mean) * 1.01)).pow(2).sum()) > float(limit)
    assert not torch.allclose(got, mean)


def test_the_server_lets_an_omniscient_attack_rewrite_its_clients_updates_and_reports_their_share():
    federation = Federation(num_clients=6, clients_per_round=6, num_rounds=1)
    attack = IPM(epsilon=2.0, clients=[0, 1])
    attack.setup(federation)
    server = Server(FedAvg(aggregator=WeightedMean()), attack=attack)
    server.start(GLOBAL)
    server.setup(federation)
    server.begin()
    honest = _honest()
    server.pending.updates = [ClientUpdate(0, 30, _state([5.0] * 5)), *honest, ClientUpdate(1, 10, _state([5.0] * 5))]
    server.pending.contributors = 6
    server.update(Round(1, tuple(range(6)), {}, tuple(range(6))))
    rows = torch.stack([_flat(u.state) for u in honest])
    crafted = -2.0 * rows.mean(0)
    expected = (30 * crafted + 10 * rows.sum(0) + 10 * crafted) / 80  # the weighted mean, the crafted update twice
    torch.testing.assert_close(_flat(server.global_state), expected, rtol=1e-6, atol=1e-6)
    assert server.attack_metrics == {"attack/malicious_updates": 2.0, "attack/malicious_weight": pytest.approx(0.5)}


def test_selecting_rules_report_their_true_and_false_positive_rates():
    attack = SignFlip(clients=[0, 1])
    honest = [*_honest(), ClientUpdate(6, 10, _state([1.0, 1.0, 0.5, 0.5, 1.0]))]
    updates = [ClientUpdate(0, 1, _state([40.0] * 5)), ClientUpdate(1, 1, _state([-40.0] * 5)), *honest]
    for rule, kept in ((Krum(f=2), 1), (MultiKrum(f=2), 5)):
        rule.aggregate(updates, GLOBAL)
        metrics = attack.round_metrics(updates, rule.client_shares(), rule.rejected_clients())
        assert metrics["attack/tpr"] == 1.0 and metrics["attack/malicious_weight"] == 0.0
        assert metrics["attack/fpr"] == pytest.approx((5 - kept) / 5)
    # a capped count: the inflated client's share falls back to its fair one
    capped = SampleCounts(max_samples=10)
    inflated = [ClientUpdate(0, 10_000, _state([1.0] * 5)), *_honest()]
    capped.aggregate(inflated, GLOBAL)
    assert attack.round_metrics(inflated, capped.client_shares(), capped.rejected_clients())[
        "attack/malicious_weight"
    ] == pytest.approx(0.2)
    assert attack.round_metrics(inflated, None, None) == {"attack/malicious_updates": 1.0}


def test_what_cannot_hold_is_refused_in_one_line(tmp_path):
    for attack in (ALIE(), SignFlip()):  # a deployment's attackers are its SuperNodes, by their node config
        with pytest.raises(ConfigError, match=r"simulation only.*node config's attack"):
            check_run(RunParts(attack=attack, live=True))
    with pytest.raises(ConfigError, match=r"omniscient.*secure aggregation"):
        check_run(RunParts(attack=MinMax(), secure_aggregation=True))
    check_run(RunParts(attack=SignFlip(), secure_aggregation=True))  # its clients tamper before masking
    spec = tmp_path / "attack.yaml"
    spec.write_text("class_path: fedpeft_pl.attacks.SignFlip\ninit_args: {scale: 2.5}\n")
    loaded = load_attack(str(spec))
    assert type(loaded) is SignFlip and loaded.scale == 2.5
    assert type(load_attack("LabelFlip")) is LabelFlip
    with pytest.raises(ConfigError, match="not an attack"):
        load_attack("fedpeft_pl.strategies.FedAvg")
    spec.write_text("class_path: SignFlip\ninit_args: {speed: 2}\n")
    with pytest.raises(ConfigError, match="speed"):
        load_attack(str(spec))


def _fit(tmp_path, name, runner, attack, aggregation=None, peft=None, rounds=2):
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(), peft or Prompt(num_tokens=2), optimizer=sgd(0.05))
    trainer = tiny_trainer(
        tmp_path,
        num_rounds=rounds,
        clients_per_round=4,
        client_runner=runner,
        attack=attack,
        aggregation=aggregation,
        logger=CSVLogger(str(tmp_path), name=name),
    )
    trainer.fit(module, datamodule=tiny_datamodule(num_clients=5, batch_size=48))
    return module, trainer


def _logged(trainer) -> dict[str, list[float]]:
    import csv

    rows = list(csv.DictReader(open(f"{trainer.logger.log_dir}/metrics.csv")))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(lambda: SignFlip(scale=2.0, fraction=0.4), id="sign-flip"),
        pytest.param(lambda: LabelFlip(fraction=0.4), id="label-flip", marks=pytest.mark.slow),
        pytest.param(lambda: ALIE(fraction=0.4), id="alie", marks=pytest.mark.slow),
    ],
)
def test_an_attack_gives_the_same_run_on_both_runners(tmp_path, attack):
    """The vectorised runner trains malicious clients in the stack like any other: the same result as one by one."""
    rounds = 1 if attack().omniscient or not attack().poisons_data else 2
    honest, _ = _fit(tmp_path, "honest", "sequential", None, rounds=rounds)
    sequential, seq_trainer = _fit(tmp_path, "seq", "sequential", attack(), rounds=rounds)
    vectorised, vec_trainer = _fit(tmp_path, "vec", "vectorized", attack(), rounds=rounds)
    assert not isinstance(vec_trainer.datamodule.splits.train, PoisonedData)  # the clean split is back after the run
    for name, tensor in trainable_state(sequential).items():
        torch.testing.assert_close(trainable_state(vectorised)[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    moved = max(float((trainable_state(honest)[n] - t).abs().max()) for n, t in trainable_state(sequential).items())
    assert moved > 1e-3  # the attack changed the run
    seq, vec = _logged(seq_trainer), _logged(vec_trainer)
    assert seq["attack/malicious_updates"] == vec["attack/malicious_updates"]
    assert sum(seq["attack/malicious_updates"]) > 0
    assert seq["attack/malicious_weight"] == pytest.approx(vec["attack/malicious_weight"])


@pytest.mark.slow
def test_a_backdoor_on_cached_features_measures_its_success_on_triggered_images(tmp_path):
    """Head trains on features computed once from the poisoned samples; the success rate reads triggered images."""
    backdoor = Backdoor(target=3, patch=4, value=3.0, poison_fraction=0.6, clients=[0, 1, 2])
    _module, trainer = _fit(tmp_path, "backdoor", "auto", backdoor, peft=Head(), rounds=3)
    logged = _logged(trainer)
    assert len(logged["attack/success_rate"]) == 3
    clean, clean_trainer = _fit(tmp_path, "clean", "auto", None, peft=Head(), rounds=3)
    # the same model's success rate without the attack: triggered images of other classes put in class 3 by chance
    from torch.utils.data import DataLoader

    sets = backdoor.evaluation_sets(trainer.datamodule.splits.test)
    _, baseline = clean.evaluate_on(DataLoader(sets["attack/success_rate"], batch_size=256))
    assert logged["attack/success_rate"][-1] > baseline["acc"] + 0.2
    # and the clean task learns about as well as without it: a backdoor hides
    assert logged["server/acc"][-1] >= _logged(clean_trainer)["server/acc"][-1] - 0.1


@pytest.mark.parametrize("config", ["alie-vs-multikrum", "backdoor"])
def test_the_shipped_attack_configs_build_their_attack_and_defence(tmp_path, monkeypatch, config):
    from helpers import build_overlay

    from fedpeft_pl.strategies import MultiKrum, NormBound

    monkeypatch.chdir(REPO)
    trainer, _, _ = build_overlay(
        tmp_path, "seed_everything: 0\n", "configs/quickstart.yaml", f"configs/quickstart/attacks/{config}.yaml"
    )
    server = trainer.aggregation.server
    expected = {"alie-vs-multikrum": (ALIE, MultiKrum), "backdoor": (Backdoor, NormBound)}[config]
    assert (type(server.attack), type(server.strategy.aggregator)) == expected
    assert server.attack.fraction == 0.25


def test_the_readme_attack_example_builds(tmp_path, monkeypatch):
    import re

    from helpers import build_overlay

    monkeypatch.chdir(REPO)
    blocks = re.findall(r"```yaml\n(.*?)```", manual_text(), flags=re.S)
    example = next(b for b in blocks if "fedpeft_pl.attacks.ALIE" in b)
    trainer, _, _ = build_overlay(tmp_path, example)
    server = trainer.aggregation.server
    assert type(server.attack) is ALIE and type(server.strategy.aggregator) is MultiKrum


def test_the_contributing_attack_example_is_a_free_rider(tmp_path, monkeypatch):
    import re
    import sys

    text = (REPO / "CONTRIBUTING.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "class Freeze(Attack)" in b)
    (tmp_path / "my_attacks.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_attacks", None)
    from my_attacks import Freeze

    attack = Freeze(factor=10, clients=[0])
    sent = attack.tamper(_context(), _state([0.5, 0.5, 0.5, 0.5, 0.5]))
    assert all(torch.equal(sent[n], GLOBAL[n]) for n in GLOBAL) and attack.report(0, 7) == 70
    yaml_block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "my_attacks" in b)
    from helpers import build_overlay

    monkeypatch.chdir(REPO)
    server = build_overlay(tmp_path, yaml_block)[0].aggregation.server
    assert type(server.attack).__name__ == "Freeze" and server.attack.factor == 10 and server.attack.fraction == 0.25
