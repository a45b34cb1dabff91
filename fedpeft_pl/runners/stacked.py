"""The vectorised engine's stacked path: the frozen backbone sees one batch, only the PEFT tensors carry clients.

With PEFT a round's clients share every frozen tensor, so the backbone can run as the plain timm
modules on the folded batch ``[m * B, ...]``, fused ``scaled_dot_product_attention`` included (flash
attention on CUDA), and only the modules that own a trainable tensor compute per client, with the
method's stacked forwards (:meth:`~fedpeft_pl.peft.PEFTMethod.stacked_forwards`), as multi-tenant
LoRA systems batch many adapters over one base model (Punica, S-LoRA, mLoRA). Each client's loss is
the masked mean over its own rows, so backward gives each client exactly its own gradient.

What has no stacked form (Full, a user's method that does not provide one, local DP's per-sample
gradients) takes the vmap path of :mod:`fedpeft_pl.runners.vectorized`. :func:`engine_path` says
which, and why.

Example::

    forwards, why = stacked_forwards_of(module)
    with installed(module.model, forwards, {"head.weight": w, "head.bias": b}):   # w: [m, C, d]
        logits = module.model(images.flatten(0, 1))                                 # [m * B, C]
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Optional

import torch
from torch import nn

from fedpeft_pl.peft import trainable_parameters
from fedpeft_pl.peft.base import StackedForward

__all__ = ["engine_path", "installed", "stacked_forwards_of"]

State = dict[str, torch.Tensor]


def _forward_for(kind: type, forwards: Mapping[type[nn.Module], StackedForward]) -> Optional[StackedForward]:
    for cls in kind.__mro__:
        if cls in forwards:
            return forwards[cls]
    return None


def _network(module: nn.Module) -> tuple[nn.Module, str]:
    inner = getattr(module, "model", None)
    if isinstance(inner, nn.Module):
        return inner, "model."
    return module, ""


def stacked_forwards_of(module: nn.Module) -> tuple[Optional[Mapping[type[nn.Module], StackedForward]], str]:
    """The stacked forwards of ``module``'s PEFT method (``module.peft``), or None; and why, in words."""
    peft = getattr(module, "peft", None)
    if peft is None:
        return None, f"{type(module).__name__} has no PEFT method to ask for a stacked form"
    name = type(peft).__name__
    forwards = peft.stacked_forwards()
    if forwards is None:
        return None, f"{name} has no stacked form (PEFTMethod.stacked_forwards)"
    network, prefix = _network(module)
    for tensor in trainable_parameters(module):
        path = tensor[len(prefix) :].rpartition(".")[0]
        owner = network.get_submodule(path)
        if _forward_for(type(owner), forwards) is None:
            return None, f"{name} has no stacked forward for {type(owner).__name__}, which holds {tensor}"
    return forwards, f"{name} has a stacked form"


def engine_path(module: nn.Module, private: bool = False, features: bool = False) -> tuple[str, str]:
    """``("stacked" | "vmap" | "batched head", why)``: how the vectorised engine trains ``module``'s clients."""
    if features:
        return "batched head", "a classifier on cached features is one batched matrix product"
    forwards, why = stacked_forwards_of(module)
    if forwards is None:
        return "vmap", why
    if private:
        return "vmap", "local DP needs per-sample gradients"
    return "stacked", why


@contextlib.contextmanager
def installed(model: nn.Module, forwards: Mapping[type[nn.Module], StackedForward], params: State) -> Iterator[None]:
    """For the duration, every module that owns a tensor of ``params`` (``[m, ...]`` stacks by name in ``model``)
    computes with its stacked forward; the others, and every hook, run as they are.

    The override is an instance attribute ``forward``, which ``nn.Module.__call__`` calls (hooks
    included) and deleting restores: no module is replaced, so every name stays timm's.
    """
    owners: dict[str, State] = {}
    for name, tensor in params.items():
        path, _, leaf = name.rpartition(".")
        owners.setdefault(path, {})[leaf] = tensor
    done: list[nn.Module] = []
    try:
        for path, tensors in owners.items():
            owner = model.get_submodule(path)
            forward = _forward_for(type(owner), forwards)
            if forward is None:
                raise ValueError(f"no stacked forward for {type(owner).__name__} ({path})")
            owner.forward = functools.partial(forward, owner, tensors)
            done.append(owner)
        yield
    finally:
        for owner in done:
            del owner.forward


def stacked_forward(
    model: nn.Module, forwards: Mapping[type[nn.Module], StackedForward]
) -> Callable[[State, torch.Tensor], torch.Tensor]:
    """``forward(params, images)``: images ``[m, B, ...]`` to logits ``[m, B, classes]``, client ``k`` with
    ``params[n][k]``."""

    def forward(params: State, images: torch.Tensor) -> torch.Tensor:
        with installed(model, forwards, params):
            logits = model(images.flatten(0, 1))
        return logits.unflatten(0, (images.shape[0], images.shape[1]))

    return forward
