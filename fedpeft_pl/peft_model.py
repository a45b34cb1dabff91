"""The PEFT'd ViT that a run trains, built without Lightning: one place for how ``model`` becomes a network.

:class:`~fedpeft_pl.client.FedPEFTModule` builds its network with :func:`build_peft_model`, and so does
:class:`PEFTModel`, the same network with the same parameter names (``model.*``) and no training step, which
``fedpeft comm`` sizes without importing Lightning. Both take the arguments of ``model`` in a config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional  # noqa: UP035 (typing.Callable: see OptimizerCallable)

import torch
from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.backbone import Backbone, data_config
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft import PEFTMethod, Prompt

__all__ = ["BuiltModel", "OptimizerCallable", "PEFTModel", "build_peft_model", "check_optimizer", "default_optimizer"]

# the type of ``model.optimizer``: Lightning's ``lightning.pytorch.cli.OptimizerCallable``, spelled without Lightning,
# as Lightning spells it (typing.Callable: the parser's errors name it, and fedpeft_pl.config's one_line reads them)
OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]


def check_optimizer(factory: OptimizerCallable) -> None:
    """Build the optimizer once on a stand-in parameter: a bad argument (a negative learning rate)
    is refused now, in one line, not by torch after the data set-up in the first client's step."""
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.optimizer: {detail[:1].lower() + detail[1:]}; fix it under model.optimizer.init_args"
        ) from None


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 and weight decay 1e-4, the paper's optimizer, at lr 0.01."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


@dataclass
class BuiltModel:
    """What :func:`build_peft_model` makes of ``model``'s arguments."""

    backbone: Backbone
    peft: PEFTMethod
    optimizer_factory: OptimizerCallable
    model: VisionTransformer  # the timm ViT with the PEFT method applied
    backbone_names: list[str]  # timm's names, before PEFT adds any
    local_names: frozenset[str]  # trainable tensors (``model.``-prefixed) that stay on each client
    data_config: dict[str, Any]


def build_peft_model(
    num_classes: int,
    backbone: Optional[Backbone] = None,
    peft: Optional[PEFTMethod] = None,
    optimizer: Optional[OptimizerCallable] = None,
) -> BuiltModel:
    """Check ``model``'s arguments, build the backbone (no weights loaded) and apply the PEFT method to it."""
    if num_classes < 2:
        raise ConfigError(f"model.num_classes must be >= 2, got {num_classes}")
    backbone = backbone if backbone is not None else Backbone()
    peft = peft if peft is not None else Prompt()
    factory = optimizer or default_optimizer
    check_optimizer(factory)
    model = backbone.build(num_classes)
    backbone_names = list(model.state_dict())
    peft.apply(model)
    relative = [name for name, p in model.named_parameters() if p.requires_grad]
    local = frozenset(f"model.{name}" for name in peft.local_names(relative))
    return BuiltModel(backbone, peft, factory, model, backbone_names, local, data_config(model))


class PersonalParts:
    """What a model with a PEFT method says of its personalised part (``FedPEFTModule`` and :class:`PEFTModel`)."""

    peft: PEFTMethod
    _local_names: frozenset[str]

    def adopt(self, num_classes: int, built: BuiltModel) -> None:
        """Take the parts :func:`build_peft_model` built as this model's attributes."""
        self.num_classes = num_classes
        self.backbone = built.backbone
        self.peft = built.peft
        self.optimizer_factory = built.optimizer_factory
        self.model = built.model
        self.backbone_names = built.backbone_names  # timm's names, before PEFT adds any
        self._local_names = built.local_names
        self.data_config = built.data_config

    @property
    def local_names(self) -> frozenset[str]:
        """Trainable tensors (module names) that stay on each client; empty unless the method is personalised."""
        return self._local_names

    @property
    def local_first_epochs(self) -> int:
        """FedRep's schedule: epochs that train the local part alone before the shared part trains (0: together)."""
        return int(getattr(self.peft, "local_epochs", 0)) if self._local_names else 0


class PEFTModel(PersonalParts, nn.Module):
    """The network of a :class:`~fedpeft_pl.client.FedPEFTModule` with the same arguments, without Lightning:
    what ``fedpeft comm`` sizes. Its parameters carry the module's names (``model.*``).

    Args:
        num_classes: size of the classifier.
        backbone: which ViT (no weights are loaded).
        peft: the fine-tuning method.
        optimizer: the clients' optimizer factory.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: Optional[Backbone] = None,
        peft: Optional[PEFTMethod] = None,
        optimizer: Optional[OptimizerCallable] = None,
    ) -> None:
        super().__init__()
        self.adopt(num_classes, build_peft_model(num_classes, backbone, peft, optimizer))
        self.takes_features = False
        self.privacy: Optional[Any] = None
