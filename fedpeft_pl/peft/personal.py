"""Personalised PEFT: part of a method's trainable tensors stays on each client and never travels."""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft.base import PEFTMethod, StackedForward, method_spec


class Personalized(PEFTMethod):
    """Any PEFT method with a local part: tensors that each client keeps for itself across rounds.

    The local tensors never travel and are never aggregated; every client starts from their
    initial values the first time it is sampled and from its own values afterwards. They
    persist per client (in the checkpoint, restored on resume, merged under DDP; on the
    SuperNode in a Flower deployment), and each client's model at per-client evaluation is the
    global shared part plus its own local part. The server's evaluation on the global test
    split uses the shared part with the initial local part.

    Args:
        method: the PEFT method whose tensors are split.
        local: trainable tensors that stay on the clients, by timm name: a prefix (``head``
            matches ``head.weight`` and ``head.bias``) or a glob (``blocks.*.attn.qkv.lora_B``).
        local_epochs: FedRep's schedule: each round, this many epochs train the local part alone,
            then ``trainer.local_epochs`` epochs train the shared part alone. 0 (FedPer) trains
            both together.

    Example (FedPer: a local classifier head on federated prompts)::

        model:
          peft:
            class_path: fedpeft_pl.peft.Personalized
            init_args:
              method: {class_path: fedpeft_pl.peft.Prompt, init_args: {num_tokens: 10}}
              local: [head]
    """

    def __init__(self, method: PEFTMethod, local: Sequence[str] = ("head",), local_epochs: int = 0) -> None:
        if isinstance(method, dict) and "class_path" in method:  # as export metadata spells it
            module_name, class_name = method["class_path"].rsplit(".", 1)
            method = getattr(importlib.import_module(module_name), class_name)(**method.get("init_args", {}))
        if not isinstance(method, PEFTMethod):
            raise ConfigError(f"Personalized needs a PEFT method to split, got {method!r}")
        if isinstance(method, Personalized):
            raise ConfigError("Personalized wraps a plain PEFT method, not another Personalized")
        if method.per_client_views:
            raise ConfigError(
                f"Personalized cannot wrap {method!r}: its clients exchange different tensors (heterogeneous ranks or "
                "stacking)"
            )
        if isinstance(local, str) or not local:
            raise ConfigError(f"Personalized local must be a non-empty list of tensor names or patterns, got {local!r}")
        if not isinstance(local_epochs, int) or local_epochs < 0:
            raise ConfigError(f"Personalized local_epochs must be an integer >= 0, got {local_epochs!r}")
        self.method = method
        self.local = tuple(local)
        self.local_epochs = local_epochs

    def attach(self, model: VisionTransformer) -> None:
        self.method.attach(model)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        local = self.local_names(trainable)
        unmatched = [pattern for pattern in self.local if not any(_matches(pattern, n) for n in trainable)]
        if unmatched:
            raise ConfigError(
                f"Personalized local {unmatched!r} matches no trainable tensor of {self.method!r}; "
                f"its trainable tensors start with {sorted({n.split('.')[0] for n in trainable})}"
            )
        if len(local) == len(trainable):
            raise ConfigError("Personalized local covers every trainable tensor; nothing would be federated")

    def stacked_forwards(self) -> Optional[Mapping[type[nn.Module], StackedForward]]:
        return self.method.stacked_forwards()

    def local_names(self, trainable: Sequence[str]) -> set[str]:
        return {name for name in trainable if any(_matches(pattern, name) for pattern in self.local)}

    def export_args(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments, for export metadata (:mod:`fedpeft_pl.export`)."""
        return {"method": method_spec(self.method), "local": list(self.local), "local_epochs": self.local_epochs}

    def merge(
        self, model: VisionTransformer, backbone_names: list[str]
    ) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        return self.method.merge(model, backbone_names)


def _matches(pattern: str, name: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")
