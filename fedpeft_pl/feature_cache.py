"""Linear probing without the backbone twice: each image's pre-logit features, computed once.

With :class:`~fedpeft_pl.peft.Head` everything up to the classifier is frozen, so with
deterministic transforms an image's pre-logit features (``forward_head(forward_features(x),
pre_logits=True)``) are the same in every round and every local step. :func:`cache_features`
computes them once; :func:`feature_datamodule` and :class:`HeadProbe` then let the vectorised
engine train the heads on features, and :func:`evaluate_head` evaluates on cached test features.

Example::

    train = cache_features(module.model, dm.splits.train)
    probe = HeadProbe(module.model)
    outcomes = train_clients(probe, feature_datamodule(dm, train), jobs, local_epochs, module.optimizer_factory)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedpeft_pl.errors import ConfigError


@torch.no_grad()
def cache_features(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: Any = None) -> TensorDataset:
    """``(features, labels)`` of every sample of ``dataset``, in index order.

    Args:
        model: a timm ViT with only its classifier trainable (the features it computes are frozen).
        dataset: samples ``(image, label)`` under deterministic transforms.
        batch_size: images per forward.
        device: where to compute; defaults to the model's device.

    Example::

        train = cache_features(module.model, datamodule.splits.train)
    """
    if any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head.")):
        raise ConfigError("the feature cache serves linear probing only: every tensor but the classifier must be frozen")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()  # no stochastic layer may act: the features must be those of every training step
    features, labels = [], []
    try:
        for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            features.append(model.forward_head(model.forward_features(images.to(device)), pre_logits=True).cpu())
            labels.append(targets)
    finally:
        model.train(was_training)
    return TensorDataset(torch.cat(features), torch.cat(labels))


class _Classifier(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class HeadProbe(nn.Module):
    """The classifier of a ViT as a module of features, with the ViT's tensor names (``model.head.*``).

    It shares the ViT's classifier tensors, so a :class:`~fedpeft_pl.vectorized.ClientJob` built from
    ``trainable_state(fed_module)`` fits it, and outcomes load back into the full model unchanged.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.model = _Classifier(vit.get_classifier())


def feature_datamodule(datamodule: Any, train_features: TensorDataset) -> Any:
    """A shallow copy of ``datamodule`` whose training split is the cached features (same indices, same batches)."""
    if len(train_features) != len(datamodule.splits.train):
        raise ConfigError("the cached features do not cover the training split; compute them from datamodule.splits.train")
    cached = copy.copy(datamodule)
    cached.splits = copy.copy(datamodule.splits)
    cached.splits.train = train_features
    return cached


@torch.no_grad()
def evaluate_head(head: nn.Module, features: TensorDataset, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross entropy and accuracy of ``head`` on cached features."""
    x, y = features.tensors
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = head(x[start : start + batch_size])
        loss += float(torch.nn.functional.cross_entropy(logits, y[start : start + batch_size], reduction="sum"))
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return loss / len(y), correct / len(y)
