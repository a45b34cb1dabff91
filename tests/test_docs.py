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
        "model.head.weight", "model.head.bias"
    }
    before = {k: v.detach().clone() for k, v in trainable_parameters(module).items()}
    tiny_trainer(tmp_path).fit(module, datamodule=tiny_datamodule())
    assert all(not torch.equal(before[k], v) for k, v in trainable_parameters(module).items())
