"""Linear probing without the backbone twice: each image's pre-logit features, computed once.

With :class:`~fedpeft_pl.peft.Head` everything up to the classifier is frozen, so with
deterministic transforms and no stochastic layer before the classifier an image's pre-logit
features (``forward_head(forward_features(x), pre_logits=True)``) are the same in every round and
every local step. ``trainer.feature_cache`` (:class:`FeatureCache`) therefore computes them once
per run, for the training pool and the test split, and the run trains and evaluates the classifier
on them: the same batches, seeds, step caps, metrics and bytes, and the same final state (up to
floating-point rounding) as through the backbone, in both in-process runners.

The pieces also serve on their own: :func:`cache_features` computes features,
:func:`feature_datamodule` and :class:`HeadProbe` let the vectorised engine train heads on them,
and :func:`evaluate_head` evaluates on cached test features.

Example::

    train = cache_features(module.model, dm.splits.train)
    probe = HeadProbe(module.model)
    outcomes = train_clients(probe, feature_datamodule(dm, train), jobs, local_epochs, module.optimizer_factory)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fedpeft_pl.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "memory", "off")


# evaluation batch size on cached features (server and per-client): a few MiB of features, one or
# a few batches for a test split, where the images' batch size would mean hundreds of tiny steps
FEATURE_EVAL_BATCH = 4096


@torch.no_grad()
def cache_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: Any = None,
    precision: Any = None,
    num_workers: int = 0,
) -> TensorDataset:
    """``(features, labels)`` of every sample of ``dataset``, in index order.

    Args:
        model: a timm ViT with only its classifier trainable (the features it computes are frozen).
        dataset: samples ``(image, label)`` under deterministic transforms.
        batch_size: images per forward.
        device: where to compute; defaults to the model's device.
        precision: a Lightning precision plugin: the features are computed under its input
            conversion and forward context, as the training and evaluation steps compute them.
        num_workers: DataLoader worker processes that read the images.

    Example::

        train = cache_features(module.model, datamodule.splits.train)
    """
    if any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head.")):
        raise ConfigError(
            "the feature cache serves linear probing only: every tensor but the classifier must be frozen"
        )
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()  # no stochastic layer may act: the features must be those of every training step
    features, labels = [], []
    try:
        for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            images = images.to(device)
            if precision is not None:
                images = precision.convert_input(images)
            with precision.forward_context() if precision is not None else contextlib.nullcontext():
                features.append(model.forward_head(model.forward_features(images), pre_logits=True).cpu())
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

    It shares the ViT's classifier tensors, so a :class:`~fedpeft_pl.runners.vectorized.ClientJob` built from
    ``trainable_state(fed_module)`` fits it, and outcomes load back into the full model unchanged.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.model = _Classifier(vit.get_classifier())


def feature_datamodule(datamodule: Any, train_features: TensorDataset) -> Any:
    """A shallow copy of ``datamodule`` whose training split is the cached features (same indices, same batches)."""
    if len(train_features) != len(datamodule.splits.train):
        raise ConfigError(
            "the cached features do not cover the training split; compute them from datamodule.splits.train"
        )
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


class FeatureCache:
    """``trainer.feature_cache``: linear probing on features computed once per run.

    With ``auto`` (the default) a run whose only trainable tensors are the classifier's (Head)
    computes every training and test image's features once, where that is exact, and trains and
    evaluates the classifier on them; where it would not be exact (random transforms, a stochastic
    layer before the classifier, clients that run elsewhere) the cache is off and the console says
    why. ``memory`` insists (a one-line error says what stands in the way) and ``off`` never caches.
    Other methods train inside the backbone and never cache.

    There is no disk cache: an image's features are a few hundred numbers (768 for ViT-B/16, 200
    times fewer than its 224 x 224 pixels), so a data set of a million images takes under 4 GiB.

    Args:
        mode: ``auto``, ``memory`` or ``off``.
        max_gib: the most memory the features may take; beyond it ``auto`` runs through the
            backbone and ``memory`` is an error.
    """

    def __init__(self, mode: str = "auto", max_gib: float = 4.0) -> None:
        if mode not in MODES:
            raise ConfigError(f"trainer.feature_cache must be 'auto', 'memory' or 'off', got {mode!r}")
        if not max_gib > 0:
            raise ConfigError(f"trainer.feature_cache_max_gib must be > 0, got {max_gib}")
        self.mode = mode
        self.max_gib = max_gib
        self.note: Optional[str] = None  # what the console was told, for this run

    def features_for(
        self,
        module: Any,
        datamodule: Any,
        device: torch.device,
        precision: Any = None,
        clients_elsewhere: Optional[str] = None,
    ) -> Optional[tuple[TensorDataset, TensorDataset]]:
        """This run's ``(train, test)`` features, or None where the run goes through the backbone.

        ``module`` and ``datamodule`` are the run's; the features are computed on ``device`` under
        ``precision`` (Lightning's precision plugin).

        ``clients_elsewhere`` says why clients would not train on the cached features (another
        runner, several processes). Logs one line where a linear probe runs with or without the
        cache; raises :class:`ConfigError` where ``memory`` was asked for and cannot be honoured.
        """
        self.note = None
        if self.mode == "off":
            return None
        reason = not_a_probe(module)
        if reason is not None:
            if self.mode == "memory":
                raise ConfigError(
                    f"trainer.feature_cache: memory serves linear probing only, but {reason}; set "
                    "trainer.feature_cache: auto"
                )
            return None  # nothing to say: the method trains inside the backbone
        reason = (
            clients_elsewhere
            or not_exact(module.model, datamodule.splits)
            or self._too_big(module.model, datamodule.splits)
        )
        if reason is not None:
            if self.mode == "memory":
                raise ConfigError(
                    f"trainer.feature_cache: memory cannot be exact here: {reason}; set trainer.feature_cache: auto or "
                    "off"
                )
            self.note = f"feature cache off: {reason}; every step runs the backbone"
            log.info(self.note)
            return None
        splits = datamodule.splits
        settings = {
            "batch_size": datamodule.eval_batch_size,
            "device": device,
            "precision": precision,
            "num_workers": datamodule.num_workers,
        }
        train, test = (
            cache_features(module.model, splits.train, **settings),
            cache_features(module.model, splits.test, **settings),
        )
        size = sum(t.tensors[0].numel() * t.tensors[0].element_size() for t in (train, test))
        self.note = (
            f"feature cache: the backbone ran once over {len(train):,} training and {len(test):,} test images "
            f"({size / 2**20:,.1f} MiB of features); the classifier trains and is evaluated on them"
        )
        log.info(self.note)
        return train, test

    def _too_big(self, model: nn.Module, splits: Any) -> Optional[str]:
        classifier = model.get_classifier()
        width = getattr(classifier, "in_features", None) or model.num_features
        element = next(classifier.parameters()).element_size()
        size = (len(splits.train) + len(splits.test)) * width * element
        if size <= self.max_gib * 2**30:
            return None
        return (
            f"the features of {len(splits.train):,} training and {len(splits.test):,} test images would take "
            f"{size / 2**30:,.1f} GiB, over trainer.feature_cache_max_gib ({self.max_gib:g}); raise it where memory "
            "allows"
        )


def not_a_probe(module: Any) -> Optional[str]:
    """Why ``module`` is not a linear probe whose features could be cached, or None if it is."""
    from fedpeft_pl.client import FedPEFTModule

    name = repr(getattr(module, "peft", type(module).__name__))
    if not isinstance(module, FedPEFTModule):
        return f"{type(module).__name__} is not a FedPEFTModule"
    model = module.model
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head") and hasattr(model, "get_classifier")):
        return f"the backbone {type(model).__name__} has no forward_features / forward_head"
    classifier = {id(p) for p in model.get_classifier().parameters()}
    if any(p.requires_grad and id(p) not in classifier for p in module.parameters()):
        return f"{name} trains tensors inside the backbone"
    for method in ("forward", "training_step", "validation_step", "_evaluate"):
        if getattr(type(module), method) is not getattr(FedPEFTModule, method):
            return f"{type(module).__name__} redefines {method}"
    if model._forward_hooks or model._forward_pre_hooks:
        return "the model has forward hooks of its own"
    return None


def not_exact(model: nn.Module, splits: Any) -> Optional[str]:
    """Why cached features would differ from those of a training step, or None."""
    layer = stochastic_layer(model)
    if layer is not None:
        return f"{layer} acts randomly in training, before the classifier"
    for split, dataset in (("training", splits.train), ("test", splits.test)):
        transform = random_transform(dataset)
        if transform is not None:
            return f"the {split} images' transforms are random ({transform})"
    return None


def stochastic_layer(model: nn.Module) -> Optional[str]:
    """The first layer before the classifier that is random in training mode (dropout, drop path,
    patch dropout, batch statistics), as ``name (Type)``; None if there is none."""
    from timm.layers import DropBlock2d, DropPath, PatchDropout

    classifier = model.get_classifier()
    inside = {id(m) for m in classifier.modules()}
    for name, layer in model.named_modules():
        if id(layer) in inside:
            continue
        random_ = (
            (isinstance(layer, nn.modules.dropout._DropoutNd) and layer.p > 0)
            or (isinstance(layer, (DropPath, DropBlock2d)) and layer.drop_prob > 0)
            or (isinstance(layer, PatchDropout) and layer.prob > 0)
            or isinstance(layer, nn.modules.batchnorm._BatchNorm)
        )
        if random_:
            return f"{name} ({type(layer).__name__})"
    return None


# torchvision's transforms that draw at random but whose names do not start with "Random"
_RANDOM_TRANSFORMS = {
    "AutoAugment",
    "RandAugment",
    "TrivialAugmentWide",
    "AugMix",
    "ColorJitter",
    "ElasticTransform",
    "GaussianBlur",
    "GaussianNoise",
    "MixUp",
    "CutMix",
}


def random_transform(dataset: Dataset) -> Optional[str]:
    """The name of a random transform ``dataset`` applies, or ``None`` for deterministic samples.

    Known torchvision random transforms are found by name; anything else is caught by reading
    the first sample under three different seeds (of torch, numpy and ``random``).
    """
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset) or len(dataset) == 0:
        return None  # tensors, transformed once
    for transform in _transforms(dataset):
        name = type(transform).__name__
        if name.startswith("Random") or name in _RANDOM_TRANSFORMS:
            return name
    reads = []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            for seed in (1, 2, 3):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
                reads.append(dataset[0][0])
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    same = all(torch.equal(torch.as_tensor(reads[0]), torch.as_tensor(r)) for r in reads[1:])
    return None if same else "the same image reads differently under different seeds"


def _transforms(obj: Any, depth: int = 0) -> list[Any]:
    """The transform objects a data set holds (``transform``, ``transforms``, Compose's list)."""
    if depth > 4 or obj is None:
        return []
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _transforms(item, depth + 1)]
    found = [] if isinstance(obj, Dataset) else [obj]
    for attr in ("transform", "transforms"):
        inner = getattr(obj, attr, None)
        if inner is not None and inner is not obj and not callable(getattr(type(obj), attr, None)):
            found += _transforms(inner, depth + 1)
    return found
