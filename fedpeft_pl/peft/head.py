from collections.abc import Mapping

from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.peft.base import STACKED_LAYERS, PEFTMethod, StackedForward


class Head(PEFTMethod):
    """Linear probe: only the classifier trains; the whole backbone stays frozen."""

    def attach(self, model: VisionTransformer) -> None:
        self.train_head(model)

    def stacked_forwards(self) -> Mapping[type[nn.Module], StackedForward]:
        return STACKED_LAYERS
