"""The code examples in the documentation run."""

import re
import sys
from pathlib import Path

import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer

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

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    example = next(b for b in blocks if "aggregation:" in b and "availability:" in b)
    (tmp_path / "overlay.yaml").write_text(example)
    main(["comm", "--config", str(REPO / "configs" / "quickstart.yaml"), "--config", str(tmp_path / "overlay.yaml")])
    printed = capsys.readouterr().out
    assert "per client, upload" in printed and "Int8(error_feedback=True)" in printed
    assert "ClientAvailability(dropout=0.2" in printed


def test_readme_hf_peft_example_is_a_valid_overlay(tmp_path, capsys, monkeypatch):
    from fedpeft_pl.cli import main

    monkeypatch.chdir(REPO)
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    example = next(b for b in blocks if "fedpeft_pl.peft.HFPeft" in b)
    (tmp_path / "overlay.yaml").write_text(example)
    main(["comm", "--config", "configs/quickstart.yaml", "--config", str(tmp_path / "overlay.yaml")])
    printed = capsys.readouterr().out
    assert "HFPeft(LoraConfig(" in printed and "use_dora=True" in printed
