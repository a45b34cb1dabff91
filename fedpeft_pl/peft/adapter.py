from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Optional

import torch
from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft.base import STACKED_LAYERS, PEFTMethod, StackedForward


class Bottleneck(nn.Module):
    """``scale * up(act(down(x)))``: zero at initialisation, yet every tensor receives gradient.

    The down-projection keeps ``nn.Linear``'s random initialisation and the up-projection
    starts at zero, so the adapter is the identity map at first (the pre-trained model is
    unchanged) while gradients reach the up-projection at once and the down-projection from
    the second step on. An all-zero initialisation would never train the down-projection.
    """

    def __init__(self, dim: int, hidden: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.up = nn.Linear(hidden, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale


def _sequential(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter(output)


def _parallel(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter(args[0])


class Adapter(PEFTMethod):
    """Bottleneck adapters in every transformer block, plus the classifier.

    Args:
        reduction_factor: the bottleneck has ``embed_dim // reduction_factor`` units.
        placement: ``sequential`` adds the adapter after a sub-layer's output (Houlsby et al.
            2019; Pfeiffer et al. 2021); ``parallel`` runs it beside the sub-layer on the same
            input (AdaptFormer, Chen et al. 2022).
        sublayers: which sub-layers of each block get an adapter: ``["mlp"]`` is Pfeiffer's
            placement (and AdaptFormer's with ``parallel``), ``["attn", "mlp"]`` is Houlsby's.
        scale: multiplies the adapter's output; defaults to 1 for ``sequential`` and to
            AdaptFormer's 0.1 for ``parallel``.
    """

    def __init__(
        self,
        reduction_factor: int = 16,
        placement: Literal["sequential", "parallel"] = "sequential",
        sublayers: Sequence[Literal["attn", "mlp"]] = ("mlp",),
        scale: Optional[float] = None,
    ) -> None:
        if reduction_factor < 1:
            raise ConfigError(f"Adapter reduction_factor must be >= 1, got {reduction_factor}")
        if placement not in ("sequential", "parallel"):
            raise ConfigError(f"Adapter placement must be 'sequential' or 'parallel', got {placement!r}")
        if not sublayers or any(s not in ("attn", "mlp") for s in sublayers):
            raise ConfigError(f"Adapter sublayers must be a non-empty list of 'attn' and 'mlp', got {list(sublayers)}")
        self.reduction_factor = reduction_factor
        self.placement = placement
        self.sublayers = tuple(sublayers)
        self.scale = scale if scale is not None else (1.0 if placement == "sequential" else 0.1)

    def attach(self, model: VisionTransformer) -> None:
        hidden = max(1, model.embed_dim // self.reduction_factor)
        hook = _sequential if self.placement == "sequential" else _parallel
        for block in model.blocks:
            for name in self.sublayers:
                sublayer = getattr(block, name)
                sublayer.add_module("adapter", Bottleneck(model.embed_dim, hidden, self.scale))
                sublayer.register_forward_hook(hook)
        self.train_head(model)

    def stacked_forwards(self) -> Mapping[type[nn.Module], StackedForward]:
        # the bottleneck's layers are nn.Linear: the hooks run as they are, each client's rows through its own
        return STACKED_LAYERS
