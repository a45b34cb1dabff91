"""Small builders shared by the tests: a tiny ViT, digits split among a few clients, a quiet trainer."""

import torch

from fedpeft_pl import Backbone, FederatedDataModule, FederatedTrainer, FedPEFTModule
from fedpeft_pl.data import Digits

TINY_KWARGS = {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2}


def tiny_backbone(**overrides) -> Backbone:
    """A two-block ViT on 32x32 inputs: fast enough for CPU tests."""
    kwargs = dict(TINY_KWARGS, **overrides.pop("kwargs", {}))
    name = overrides.pop("name", "vit_tiny_patch16_224")
    return Backbone(name, img_size=overrides.pop("img_size", 32), kwargs=kwargs, **overrides)


def sgd(lr: float = 0.05, weight_decay: float = 0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def tiny_module(peft, lr: float = 0.05, **backbone_overrides) -> FedPEFTModule:
    return FedPEFTModule(10, tiny_backbone(**backbone_overrides), peft, optimizer=sgd(lr))


def tiny_datamodule(num_clients: int = 4, **kwargs) -> FederatedDataModule:
    kwargs.setdefault("batch_size", 64)
    return FederatedDataModule(Digits(), num_clients=num_clients, **kwargs)


def tiny_trainer(tmp_path, **kwargs) -> FederatedTrainer:
    defaults = {
        "num_rounds": 1,
        "clients_per_round": 2,
        "accelerator": "cpu",
        "default_root_dir": str(tmp_path),
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    defaults.update(kwargs)
    return FederatedTrainer(**defaults)


def build_overlay(tmp_path, overlay: str, *configs: str):
    """The trainer, module and data module of ``configs`` (quickstart's by default) with the YAML text
    ``overlay`` on top, as ``fedpeft fit`` would build them; run from the repository's root."""
    from pathlib import Path

    from fedpeft_pl.config import build_run, resolve_config

    (tmp_path / "overlay.yaml").write_text(overlay)
    arguments = [a for c in (configs or ("configs/quickstart.yaml",)) for a in ("--config", c)]
    config = Path(tmp_path) / "config.yaml"
    config.write_text(resolve_config([*arguments, "--config", str(tmp_path / "overlay.yaml")]))
    return build_run(config, save_config=False)[:3]


def manual_text() -> str:
    """README and every page of the documentation site (``docs/``): where the YAML and commands users copy are."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    pages = [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]
    return "\n".join(p.read_text() for p in pages)
