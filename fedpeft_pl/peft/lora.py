from __future__ import annotations

from collections.abc import Sequence
import math
from collections.abc import Iterable
from typing import Any, Literal, Optional

import loralib
import torch
from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft.base import PEFTMethod
from fedpeft_pl.seeds import LORA_FROZEN_A, derive_seed


class LoRA(PEFTMethod):
    """Low-rank adaptation (Hu et al. 2022) of the attention projections, via loralib, plus the classifier.

    Args:
        rank: rank ``r`` of each update ``B @ A``.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the LoRA branch's input.
        targets: which of the fused qkv projection's parts adapt; ``["q", "v"]`` as in the LoRA paper.
        freeze_a: FFA-LoRA (Sun et al., ICLR 2024): ``A`` stays at its random initialisation and
            only ``B`` (and the classifier) trains and travels, half of LoRA's factors. With one
            ``A`` on every client, averaging the clients' ``B`` is exactly averaging their updates
            ``B @ A``, which plain LoRA's separate averaging of ``A`` and ``B`` is not.

    ``A`` starts random and ``B`` at zero (loralib's initialisation). The update is never
    merged into the frozen weight: that weight is shared by every client in the process, and
    loralib's merge-on-eval would mutate it whenever Lightning switches to evaluation.

    With ``freeze_a`` the frozen ``A`` never travels, so every client must build the same one: it
    is drawn from its own stream of the run's seed (``seed_everything``; see
    :mod:`fedpeft_pl.seeds`), independent of whatever else the build draws.

    Example::

        LoRA(rank=8, alpha=8, targets=["q", "v"], freeze_a=True)   # FFA-LoRA
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        targets: Sequence[Literal["q", "k", "v"]] = ("q", "v"),
        freeze_a: bool = False,
    ) -> None:
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        if not targets or any(t not in ("q", "k", "v") for t in targets):
            raise ConfigError(f"LoRA targets must be a non-empty list of 'q', 'k' and 'v', got {list(targets)}")
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.targets = tuple(targets)
        self.freeze_a = freeze_a

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
        if self.freeze_a:
            freeze_lora_a(block.attn.qkv.lora_A for block in model.blocks)
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


@torch.no_grad()
def freeze_lora_a(factors: Iterable[nn.Parameter]) -> None:
    """Freeze LoRA ``A`` factors, redrawn from the run seed's own stream (FFA-LoRA).

    The draw is the kaiming-uniform of loralib and peft (bound ``1 / sqrt(in_features)``) from a
    generator keyed ``(torch.initial_seed(), LORA_FROZEN_A)``: ``seed_everything`` sets
    ``torch.initial_seed()``, so two builds of one config give the same ``A``.
    """
    generator = torch.Generator().manual_seed(derive_seed(torch.initial_seed(), LORA_FROZEN_A))
    for factor in factors:
        bound = 1.0 / math.sqrt(factor.shape[1])
        draw = torch.empty(factor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        factor.copy_(draw.to(device=factor.device, dtype=factor.dtype))
        factor.requires_grad_(False)
