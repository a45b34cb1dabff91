"""The documentation site (``mkdocs.yml``, ``docs/``): it builds without a broken link or reference, and every
public name it documents has a docstring."""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# the public surface the API reference renders (docs/reference/*.md)
PUBLIC = [
    "fedpeft_pl",
    "fedpeft_pl.peft",
    "fedpeft_pl.strategies",
    "fedpeft_pl.compression",
    "fedpeft_pl.privacy",
    "fedpeft_pl.accounting",
    "fedpeft_pl.data",
    "fedpeft_pl.hooks",
    "fedpeft_pl.federation",
    "fedpeft_pl.attacks",
    "fedpeft_pl.schedules",
    "fedpeft_pl.clock",
]


def _undocumented(module_name: str) -> list[str]:
    """The public classes and functions of ``module_name`` (its ``__all__``), and the public methods and properties
    those classes define, that have no docstring of their own or of the method they override."""
    module = importlib.import_module(module_name)
    missing = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not (obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__):
            missing.append(f"{module_name}.{name}")
        if not inspect.isclass(obj):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_") or not (inspect.isfunction(value) or isinstance(value, property)):
                continue
            function = value.fget if isinstance(value, property) else value
            if function.__doc__ or any(getattr(getattr(b, attr, None), "__doc__", None) for b in obj.__mro__[1:]):
                continue
            missing.append(f"{module_name}.{name}.{attr}")
    return missing


@pytest.mark.parametrize("module_name", PUBLIC)
def test_the_public_surface_is_documented(module_name):
    assert _undocumented(module_name) == []


def test_every_reference_page_renders_a_module_of_the_public_surface():
    pages = sorted((REPO / "docs" / "reference").glob("*.md"))
    rendered = {line.split()[1] for p in pages for line in p.read_text().splitlines() if line.startswith(":::")}
    assert set(PUBLIC) <= rendered, sorted(set(PUBLIC) - rendered)
    nav = (REPO / "mkdocs.yml").read_text()
    assert all(f"reference/{p.name}" in nav for p in pages)


@pytest.mark.slow  # a process: mkdocs imports the package and renders every page
def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).with_name("mkdocs"))
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "attacks" / "index.html").is_file()
    assert "class_path" in (tmp_path / "site" / "reference" / "attacks" / "index.html").read_text()


def _shell_lines(text: str) -> list[str]:
    import re

    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


def test_the_commands_the_manual_shows_name_real_subcommands_and_files():
    """Every ``fedpeft`` command in the manual's shell blocks names a subcommand the CLI has, and every config,
    script or file of the repository it names exists (the YAML blocks are built by the tests of their features)."""
    import re
    import shlex

    from helpers import manual_text

    from fedpeft_pl.cli import COMMANDS

    commands = [line for line in _shell_lines(manual_text()) for line in line.split("&&") if "fedpeft " in line]
    assert len(commands) >= 15
    for command in commands:
        words = shlex.split(command.strip(), comments=True)
        words = words[words.index("fedpeft") + 1 :]
        words = [w for w in words if w != "--verbose"]
        assert words and (words[0] in COMMANDS or words[0] == "--help"), command
        for word in words:
            if re.fullmatch(r"(configs|benchmarks|scripts)/[\w./-]+\.(yaml|py)", word):
                assert (REPO / word).is_file(), f"{command}: {word} does not exist"
    for path in set(
        re.findall(r"(?<![\w/])(configs/[\w./-]+\.yaml|benchmarks/\w+\.py|scripts/\w+\.py)", manual_text())
    ):
        assert (REPO / path).is_file(), f"the manual names {path}, which does not exist"


def test_the_contributing_codec_example_sends_the_largest_entries_and_counts_fewer_bytes(tmp_path, monkeypatch):
    import re

    import torch
    from helpers import build_overlay

    from fedpeft_pl.comm import payload_bytes

    text = (REPO / "CONTRIBUTING.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "class TopK(Codec)" in b)
    (tmp_path / "my_codecs.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_codecs", None)
    from my_codecs import TopK

    update = {"w": torch.tensor([[0.1, -3.0], [0.2, 2.0]]), "b": torch.tensor([0.5, -0.01, 0.0, 0.02])}
    codec = TopK(fraction=0.5)
    decoded = codec.decode(codec.encode(update), like=update)
    torch.testing.assert_close(decoded["w"], torch.tensor([[0.0, -3.0], [0.0, 2.0]]))
    torch.testing.assert_close(decoded["b"], torch.tensor([0.5, 0.0, 0.0, 0.02]))
    big = {"w": torch.randn(100, 100)}
    assert payload_bytes(TopK(0.05).encode(big)) == 500 * (4 + 4) < payload_bytes(big) / 9
    yaml_block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "my_codecs" in b)
    monkeypatch.chdir(REPO)
    server = build_overlay(tmp_path, yaml_block)[0].aggregation.server
    assert type(server.upload).__name__ == "TopK" and server.upload.fraction == 0.05


def test_the_logger_overlays_of_the_manual_build_or_name_lightnings_loggers(tmp_path, monkeypatch):
    import re

    import yaml
    from helpers import build_overlay
    from lightning.pytorch.loggers import CSVLogger

    page = (REPO / "docs" / "logging.md").read_text()
    blocks = {
        yaml.safe_load(b)["trainer"]["logger"]["class_path"].rsplit(".", 1)[1]: b
        for b in re.findall(r"```yaml\n(.*?)```", page, flags=re.S)
        if "loggers." in b
    }
    assert set(blocks) == {"CSVLogger", "MLFlowLogger", "WandbLogger"}
    import lightning.pytorch.loggers as loggers

    assert all(hasattr(loggers, name) for name in blocks)  # Lightning's own classes, by these names
    monkeypatch.chdir(REPO)
    trainer = build_overlay(tmp_path, blocks["CSVLogger"])[0]
    assert isinstance(trainer.logger, CSVLogger) and trainer.logger.name == "prompt"
