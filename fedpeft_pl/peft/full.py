from timm.models import VisionTransformer

from fedpeft_pl.peft.base import PEFTMethod


class Full(PEFTMethod):
    """Full fine-tuning: every tensor trains and travels; the conventional FedAvg baseline."""

    def attach(self, model: VisionTransformer) -> None:
        model.requires_grad_(True)
