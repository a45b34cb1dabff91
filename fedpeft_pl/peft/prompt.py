from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft.base import STACKED_LAYERS, PEFTMethod, StackedForward, State


class PromptTokens(nn.Module):
    """Learned tokens placed right after a block's prefix (class) tokens.

    The first prompted block inserts them; deeper blocks replace the previous block's
    prompt outputs with their own (VPT-deep).
    """

    def __init__(self, num_tokens: int, dim: int, init_range: float, start: int, insert: bool, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-init_range, init_range))
        self.dropout = nn.Dropout(dropout)
        self.start = start
        self.insert = insert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.dropout(self.tokens).to(x.dtype).expand(x.shape[0], -1, -1)
        rest = self.start if self.insert else self.start + self.tokens.shape[0]
        return torch.cat([x[:, : self.start], tokens, x[:, rest:]], dim=1)


def _stacked_prompt(module: PromptTokens, stacked: State, x: torch.Tensor) -> torch.Tensor:
    """Each client's tokens ``[m, n, d]`` in its own samples of the folded batch ``[m * B, N, d]``."""
    tokens = module.dropout(stacked["tokens"]).to(x.dtype)
    grouped = x.unflatten(0, (tokens.shape[0], -1))  # [m, B, N, d]
    tokens = tokens.unsqueeze(1).expand(-1, grouped.shape[1], -1, -1)
    rest = module.start if module.insert else module.start + tokens.shape[2]
    return torch.cat([grouped[:, :, : module.start], tokens, grouped[:, :, rest:]], dim=2).flatten(0, 1)


def _prompt_block_input(block: nn.Module, args: tuple) -> tuple:
    return (block.prompt(args[0]), *args[1:])


def _drop_prompts(module: nn.Module, args: tuple, start: int, count: int) -> tuple:
    x = args[0]
    return (torch.cat([x[:, :start], x[:, start + count :]], dim=1), *args[1:])


class Prompt(PEFTMethod):
    """Visual prompt tuning (VPT, Jia et al. 2022), plus the classifier.

    Args:
        num_tokens: prompt tokens per prompted layer.
        deep: prompt every block (VPT-deep) rather than only the input of the first (VPT-shallow).
        dropout: dropout on the prompt tokens during training.

    Prompts are initialised uniformly in ``±sqrt(6 / (3 * patch_area + embed_dim))`` as in VPT.
    They are removed again before the final norm, so pooling sees the usual token layout.
    """

    def __init__(self, num_tokens: int = 10, deep: bool = True, dropout: float = 0.0) -> None:
        if num_tokens < 1:
            raise ConfigError(f"Prompt num_tokens must be >= 1, got {num_tokens}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"Prompt dropout must be in [0, 1), got {dropout}")
        self.num_tokens = num_tokens
        self.deep = deep
        self.dropout = dropout

    def attach(self, model: VisionTransformer) -> None:
        patch_area = math.prod(model.patch_embed.patch_size)
        init_range = math.sqrt(6.0 / float(3 * patch_area + model.embed_dim))
        start = model.num_prefix_tokens
        blocks = list(model.blocks) if self.deep else [model.blocks[0]]
        for depth, block in enumerate(blocks):
            block.add_module(
                "prompt",
                PromptTokens(self.num_tokens, model.embed_dim, init_range, start, depth == 0, self.dropout),
            )
            block.register_forward_pre_hook(_prompt_block_input)
        model.norm.register_forward_pre_hook(functools.partial(_drop_prompts, start=start, count=self.num_tokens))
        self.train_head(model)

    def stacked_forwards(self) -> Mapping[type[nn.Module], StackedForward]:
        return {**STACKED_LAYERS, PromptTokens: _stacked_prompt}

    def merge(
        self, model: VisionTransformer, backbone_names: list[str]
    ) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Shallow prompts are timm's register tokens with a zero position embedding; deep ones have no equivalent."""
        if self.deep or not isinstance(model.norm_pre, nn.Identity) or model.attn_pool is not None:
            return None
        state = model.state_dict()
        merged = {name: state[name].detach().clone() for name in backbone_names}
        tokens = model.blocks[0].prompt.tokens.detach().unsqueeze(0)
        start = model.num_prefix_tokens
        if "reg_token" in merged:
            merged["reg_token"] = torch.cat([merged["reg_token"], tokens], dim=1)
        else:
            merged["reg_token"] = tokens.clone()
        if not model.no_embed_class:
            position = merged["pos_embed"]
            merged["pos_embed"] = torch.cat([position[:, :start], torch.zeros_like(tokens), position[:, start:]], dim=1)
        registers = merged["reg_token"].shape[1]
        return merged, {"reg_tokens": registers}
