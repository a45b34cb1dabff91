"""The paper configs: one base (configs/paper.yaml) and six overlays that name it with ``__base__``."""

from pathlib import Path

import pytest
import torch
import yaml

from fedpeft_pl.cli import main
from fedpeft_pl.config import FedPEFTCLI
from fedpeft_pl.peft import METHOD_NAMES, Adapter, Prompt
from fedpeft_pl.yaml_include import load_file, merge

REPO = Path(__file__).resolve().parents[1]


def build(*args):
    return FedPEFTCLI(list(args), run=False)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_paper_config_is_a_short_overlay_on_the_paper_base(method):
    raw = yaml.safe_load((REPO / "configs" / f"{method}.yaml").read_text())
    assert raw["__base__"] == "paper.yaml" and set(raw) == {"__base__", "trainer", "model"}
    resolved = load_file(REPO / "configs" / f"{method}.yaml")
    assert resolved["data"] == load_file(REPO / "configs" / "paper.yaml")["data"]
    assert resolved["trainer"]["logger"]["init_args"] == {"save_dir": "runs", "name": method}


def test_the_papers_protocol_reaches_the_built_objects(monkeypatch):
    """10 local epochs, Nesterov SGD with the method's lr, adapters of factor 8, prompt dropout 0.1."""
    monkeypatch.chdir(REPO)
    cli = build("--config", "configs/prompt.yaml")
    assert cli.config.trainer.local_epochs == 10
    prompt = cli.model.peft
    assert isinstance(prompt, Prompt) and (prompt.num_tokens, prompt.deep, prompt.dropout) == (10, True, 0.1)
    optimizer = cli.model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert {k: optimizer.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay")} == {
        "lr": 0.01,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 0.0001,
    }
    adapter = build("--config", "configs/adapter.yaml").model.peft
    assert isinstance(adapter, Adapter) and adapter.reduction_factor == 8


def test_a_base_resolves_relative_to_the_including_file_and_merges_key_by_key(tmp_path, capsys, monkeypatch):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "root.yaml").write_text(
        (REPO / "configs" / "quickstart.yaml").read_text().replace("fedpeft_pl/assets", str(REPO / "fedpeft_pl/assets"))
    )
    (tmp_path / "bases" / "middle.yaml").write_text("__base__: root.yaml\ntrainer:\n  num_rounds: 3\n")
    (tmp_path / "run.yaml").write_text(
        "__base__: bases/middle.yaml\n"
        "model:\n  peft:\n    class_path: fedpeft_pl.peft.Adapter\n    init_args: {reduction_factor: 4}\n"
        "  optimizer:\n    init_args: {lr: 0.5}\n"
    )
    monkeypatch.chdir(REPO)  # not the config's directory: the bases resolve against the including files
    cli = build("--config", str(tmp_path / "run.yaml"), "--trainer.local_epochs", "2")
    trainer = cli.config.trainer
    assert (trainer.num_rounds, trainer.local_epochs, trainer.clients_per_round) == (3, 2, 8)
    assert cli.model.num_classes == 10  # from the root
    # another class_path replaces the base's method whole: none of Prompt's init_args reach Adapter
    assert isinstance(cli.model.peft, Adapter) and cli.model.peft.reduction_factor == 4
    optimizer = cli.model.configure_optimizers()
    assert (optimizer.defaults["lr"], optimizer.defaults["momentum"]) == (0.5, 0.9)


def test_merge_rules():
    base = {"a": {"x": 1, "y": [1, 2]}, "m": {"class_path": "A", "init_args": {"p": 1}}, "s": 1}
    override = {"a": {"y": [3]}, "m": {"class_path": "B"}, "t": 2}
    assert merge(base, override) == {"a": {"x": 1, "y": [3]}, "m": {"class_path": "B"}, "s": 1, "t": 2}
    assert merge(base, {"m": {"init_args": {"q": 2}}})["m"] == {"class_path": "A", "init_args": {"p": 1, "q": 2}}


def test_a_missing_or_circular_base_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("__base__: b.yaml\n")
    (tmp_path / "b.yaml").write_text("__base__: a.yaml\n")
    (tmp_path / "c.yaml").write_text("__base__: nowhere.yaml\n")
    for name, message in [("a", "includes itself"), ("c", "nowhere.yaml")]:
        with pytest.raises(SystemExit) as info:
            main(["comm", "--config", str(tmp_path / f"{name}.yaml")])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
