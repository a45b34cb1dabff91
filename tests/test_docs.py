"""The code examples in the documentation run."""

import re
import sys
from pathlib import Path

import torch
from helpers import build_overlay, manual_text, tiny_datamodule, tiny_module, tiny_trainer

from fedpeft_pl.peft import trainable_parameters

REPO = Path(__file__).resolve().parents[1]


def python_block(markdown: str, first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", markdown, flags=re.S)
    return next(b for b in blocks if b.startswith(first_line))


def test_contributing_peft_example_trains(tmp_path, monkeypatch):
    source = python_block((REPO / "CONTRIBUTING.md").read_text(), "# my_methods.py")
    (tmp_path / "my_methods.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_methods", None)
    from my_methods import ScaleShift

    module = tiny_module(ScaleShift())
    names = set(trainable_parameters(module))
    assert names == {f"model.blocks.{i}.ssf.{p}" for i in range(2) for p in ("scale", "shift")} | {
        "model.head.weight",
        "model.head.bias",
    }
    before = {k: v.detach().clone() for k, v in trainable_parameters(module).items()}
    tiny_trainer(tmp_path).fit(module, datamodule=tiny_datamodule())
    assert all(not torch.equal(before[k], v) for k, v in trainable_parameters(module).items())


def test_readme_strategy_example_is_a_valid_overlay(tmp_path, capsys):
    from fedpeft_pl.cli import main

    blocks = re.findall(r"```yaml\n(.*?)```", manual_text(), flags=re.S)
    example = next(b for b in blocks if "aggregation:" in b and "availability:" in b)
    (tmp_path / "overlay.yaml").write_text(example)
    main(["comm", "--config", str(REPO / "configs" / "quickstart.yaml"), "--config", str(tmp_path / "overlay.yaml")])
    printed = capsys.readouterr().out
    assert "per client, upload" in printed and "Int8(error_feedback=True)" in printed
    assert "ClientAvailability(dropout=0.2" in printed


def test_readme_hf_peft_example_is_a_valid_overlay(tmp_path, capsys, monkeypatch):
    from fedpeft_pl.cli import main

    monkeypatch.chdir(REPO)
    blocks = re.findall(r"```yaml\n(.*?)```", manual_text(), flags=re.S)
    example = next(b for b in blocks if "fedpeft_pl.peft.HFPeft" in b)
    (tmp_path / "overlay.yaml").write_text(example)
    main(["comm", "--config", "configs/quickstart.yaml", "--config", str(tmp_path / "overlay.yaml")])
    printed = capsys.readouterr().out
    assert "HFPeft(LoraConfig(" in printed and "use_dora=True" in printed


def test_readme_composed_strategy_builds_its_two_parts(tmp_path, monkeypatch):
    from fedpeft_pl.strategies import Adam, FedAvg, Median

    monkeypatch.chdir(REPO)
    blocks = re.findall(r"```yaml\n(.*?)```", manual_text(), flags=re.S)
    example = next(b for b in blocks if "aggregator: fedpeft_pl.strategies.Median" in b)
    trainer, _, _ = build_overlay(tmp_path, example)
    strategy = trainer.aggregation.strategy
    assert type(strategy) is FedAvg and type(strategy.aggregator) is Median
    assert type(strategy.server_optimizer) is Adam and strategy.server_optimizer.lr == 0.01


def test_contributing_aggregator_example_bounds_each_update(tmp_path, monkeypatch):
    from fedpeft_pl.strategies import ClientUpdate, FedAdam

    source = python_block(
        (REPO / "CONTRIBUTING.md").read_text(), "import torch\nfrom fedpeft_pl.strategies import Aggregator"
    )
    (tmp_path / "my_rules.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rules", None)
    from my_rules import NormBounded

    start = {"w": torch.zeros(2)}
    updates = [ClientUpdate(0, 1, {"w": torch.tensor([3.0, 4.0])}), ClientUpdate(1, 3, {"w": torch.tensor([0.1, 0.0])})]
    # (1 * [3, 4] / 5 * 0.5 + 3 * [0.1, 0]) / 4 = ([0.3, 0.4] + [0.3, 0]) / 4
    torch.testing.assert_close(NormBounded(bound=0.5).aggregate(updates, start)["w"], torch.tensor([0.15, 0.1]))
    yaml_block = next(
        b
        for b in re.findall(r"```yaml\n(.*?)```", (REPO / "CONTRIBUTING.md").read_text(), flags=re.S)
        if "my_rules" in b
    )
    monkeypatch.chdir(REPO)
    strategy = build_overlay(tmp_path, yaml_block)[0].aggregation.strategy
    assert type(strategy) is FedAdam and type(strategy.aggregator).__name__ == "NormBounded"
    assert strategy.aggregator.bound == 0.5 and strategy.needs_individual_updates


def test_contributing_time_distribution_example_has_the_median_it_states(tmp_path, monkeypatch):
    import numpy as np

    source = python_block((REPO / "CONTRIBUTING.md").read_text(), "import math\n\nfrom fedpeft_pl.clock import")
    (tmp_path / "my_times.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_times", None)
    from my_times import Pareto

    from fedpeft_pl.clock import VirtualClock

    rng = np.random.default_rng(0)
    pareto = Pareto(scale=2.0, shape=3.0)
    draws = [pareto.draw(rng, 0) for _ in range(20000)]
    assert abs(np.median(draws) / pareto.median - 1) < 0.03 and min(draws) >= 2.0
    assert VirtualClock(speed=pareto).task_time(0, 1, 5, 0, 10.0, 0).compute > 0
