from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

import loralib
import torch
from timm.models import VisionTransformer

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft.base import PEFTMethod


class LoRA(PEFTMethod):
    """Low-rank adaptation (Hu et al. 2022) of the attention projections, via loralib, plus the classifier.

    Args:
        rank: rank ``r`` of each update ``B @ A``.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the LoRA branch's input.
        targets: which of the fused qkv projection's parts adapt; ``["q", "v"]`` as in the LoRA paper.

    ``A`` starts random and ``B`` at zero (loralib's initialisation). The update is never
    merged into the frozen weight: that weight is shared by every client in the process, and
    loralib's merge-on-eval would mutate it whenever Lightning switches to evaluation.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        targets: Sequence[Literal["q", "k", "v"]] = ("q", "v"),
    ) -> None:
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        if not targets or any(t not in ("q", "k", "v") for t in targets):
            raise ConfigError(f"LoRA targets must be a non-empty list of 'q', 'k' and 'v', got {list(targets)}")
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.targets = tuple(targets)

    def attach(self, model: VisionTransformer) -> None:
        for block in model.blocks:
            qkv = block.attn.qkv
            lora_qkv = loralib.MergedLinear(
                qkv.in_features,
                qkv.out_features,
                r=self.rank,
                lora_alpha=self.alpha,
                lora_dropout=self.dropout,
                enable_lora=[part in self.targets for part in "qkv"],
                merge_weights=False,
                bias=qkv.bias is not None,
            )
            # share the frozen tensors instead of copying them; names stay attn.qkv.weight/bias
            lora_qkv.weight = qkv.weight
            lora_qkv.bias = qkv.bias
            # loralib keeps its index mask as a plain attribute; a buffer follows the module to its device
            mask = lora_qkv.lora_ind
            del lora_qkv.lora_ind
            lora_qkv.register_buffer("lora_ind", mask, persistent=False)
            block.attn.qkv = lora_qkv
        loralib.mark_only_lora_as_trainable(model, bias="none")
        self.train_head(model)

    def merge(
        self, model: VisionTransformer, backbone_names: list[str]
    ) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """The frozen qkv weights plus each block's ``B @ A * alpha / rank``, as plain timm tensors."""
        state = model.state_dict()
        merged = {name: state[name].detach().clone() for name in backbone_names}
        with torch.no_grad():
            for index, block in enumerate(model.blocks):
                qkv = block.attn.qkv
                merged[f"blocks.{index}.attn.qkv.weight"] += qkv.merge_AB() * qkv.scaling
        return merged, {}
