from collections.abc import Mapping

from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.peft.base import STACKED_LAYERS, PEFTMethod, StackedForward


class Bias(PEFTMethod):
    """BitFit (Ben Zaken et al., 2022): every bias of the backbone, LayerNorm biases included, and the classifier."""

    def attach(self, model: VisionTransformer) -> None:
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
        self.train_head(model)

    def stacked_forwards(self) -> Mapping[type[nn.Module], StackedForward]:
        return STACKED_LAYERS
