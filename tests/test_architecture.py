"""The map of the house: CONTRIBUTING's layers equal the import-linter contract, every module is on
the map, the contracts hold, old import paths still work and every shipped config builds."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    return next(c["layers"] for c in contracts if c["id"] == "layers")


def _contributing() -> str:
    return (ROOT / "CONTRIBUTING.md").read_text()


def test_contributing_layers_are_the_contract():
    block = re.search(r"```layers\n(.*?)```", _contributing(), re.S)
    assert block is not None, "CONTRIBUTING.md has no ```layers block"
    assert block.group(1).split("\n")[:-1] == _contract_layers()


def test_every_module_is_on_the_map():
    text = _contributing()
    package = ROOT / "fedpeft_pl"
    tops = {
        p.name
        for p in package.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
    }
    missing = [name for name in sorted(tops) if f"`fedpeft_pl/{name}" not in text]
    assert not missing, f"CONTRIBUTING.md's table does not name {missing}"
    for sub in ("runners", "deploy"):
        for module in sorted((package / sub).glob("*.py")):
            if module.stem != "__init__":
                assert f"`{module.name}`" in text, f"CONTRIBUTING.md does not describe fedpeft_pl/{sub}/{module.name}"
    # every layer names a module or package that exists
    for layer in _contract_layers():
        for name in re.split(r"[:|]", layer):
            name = name.strip()
            assert (package / f"{name}.py").exists() or (package / name / "__init__.py").exists(), name


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


# a plain fit of a tiny ViT in a fresh process; prints what it loaded besides what Lightning itself loads
# (torchmetrics, imported by Lightning, imports matplotlib when it is installed)
PLAIN_FIT = """
import sys, tempfile
import lightning.pytorch
lightnings = set(sys.modules)
sys.path.insert(0, sys.argv[1])
from helpers import tiny_datamodule, tiny_module, tiny_trainer
import fedpeft_pl.cli, fedpeft_pl.config
from fedpeft_pl.peft import Prompt
with tempfile.TemporaryDirectory() as folder:
    tiny_trainer(folder).fit(tiny_module(Prompt(num_tokens=2)), datamodule=tiny_datamodule())
libraries = {"peft", "opacus", "dp_accounting", "sklearn", "pandas", "matplotlib", "fedpeft_pl"}
print(sorted({m.split(".")[0] for m in set(sys.modules) - lightnings} & libraries))
print(sorted(m for m in sys.modules if m.startswith("fedpeft_pl.deploy")))
"""


def test_a_plain_fit_loads_no_deployment_code_and_no_library_it_does_not_use():
    """Hugging Face peft only for HFPeft, opacus and dp-accounting only with DP, matplotlib only for reports, and no
    scikit-learn (the digits and their split are fedpeft's own): each costs start-up."""
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", PLAIN_FIT, tests], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, deployment = out.stdout.strip().splitlines()[-2:]
    assert loaded == "['fedpeft_pl']", loaded
    assert deployment == "[]", deployment


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("fedpeft_pl.vectorized", "fedpeft_pl.runners.vectorized", "train_clients"),
        ("fedpeft_pl.feature_cache", "fedpeft_pl.runners.feature_cache", "FeatureCache"),
        ("fedpeft_pl.flower_app", "fedpeft_pl.deploy.writer", "write_app"),
        ("fedpeft_pl.secure_aggregation", "fedpeft_pl.deploy.secure_aggregation", "SecureAggregation"),
    ],
)
def test_moved_modules_keep_their_old_path(old, new, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    real = importlib.import_module(new)
    assert getattr(module, name) is getattr(real, name)
    assert any(
        issubclass(w.category, DeprecationWarning)
        and new in str(w.message)
        and "removed in fedpeft-pl 0.2.0" in str(w.message)
        for w in caught
    )
    # a patch through the old name reaches the code that uses the new one
    sentinel = object()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(f"{old}.{name}", sentinel)
        assert getattr(real, name) is sentinel
    assert getattr(real, name) is not sentinel
    assert module is real and real.__spec__.name == new  # one module, which keeps its own spec


def test_every_shipped_config_builds(tmp_path, monkeypatch):
    """The public paths in YAML (peft, strategies, compression, privacy, data) resolve for every shipped config."""
    from fedpeft_pl.config import resolve_config

    monkeypatch.chdir(tmp_path)
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(configs) > 20
    for path in configs:
        # configs/quickstart/ holds overlays on configs/quickstart.yaml (README's commands)
        overlay = path.parent.name != "configs" and "quickstart" in path.parts
        base = ["--config", str(ROOT / "configs" / "quickstart.yaml")] if overlay else []
        resolved = yaml.safe_load(resolve_config([*base, "--config", str(path)]))
        paths = list(_class_paths(resolved))
        assert "model" in resolved and "trainer" in resolved and paths, path
        for class_path in paths:  # jsonargparse resolved them; each still names an importable class
            module, _, name = class_path.rpartition(".")
            assert hasattr(importlib.import_module(module), name), (path, class_path)


def _class_paths(node: object):
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield node["class_path"]
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


def test_no_component_reads_the_loops_attributes_through_the_trainer():
    """CONTRIBUTING: only the trainer, which owns the loop, and the loop itself read ``trainer.fit_loop.x``;
    a component gets what it needs as a hook argument or from the trainer (``federation_of``)."""
    package = ROOT / "fedpeft_pl"
    reads = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.relative_to(package).as_posix() not in ("trainer.py", "loop.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"fit_loop\.\w", line)
    ]
    assert reads == [], reads
