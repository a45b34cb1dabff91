from timm.models import VisionTransformer

from fedpeft_pl.peft.base import PEFTMethod


class Bias(PEFTMethod):
    """BitFit (Ben Zaken et al., 2022): every bias of the backbone, LayerNorm biases included, and the classifier."""

    def attach(self, model: VisionTransformer) -> None:
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
        self.train_head(model)
