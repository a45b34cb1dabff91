from timm.models import VisionTransformer

from fedpeft_pl.peft.base import PEFTMethod


class Head(PEFTMethod):
    """Linear probe: only the classifier trains; the whole backbone stays frozen."""

    def attach(self, model: VisionTransformer) -> None:
        self.train_head(model)
