"""The client role: one frozen backbone, one PEFT method, the local training step.

The same module serves the server's evaluation of the global model: the server loads the
aggregated trainable state into it and runs Lightning's validation loop.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from fedpeft_pl.backbone import Backbone, fingerprint
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.exchange import ClientSession
from fedpeft_pl.hooks import FederatedHooks
from fedpeft_pl.peft import PEFTMethod, trainable_parameters
from fedpeft_pl.peft_model import OptimizerCallable, PersonalParts, build_peft_model, check_optimizer
from fedpeft_pl.peft_model import default_optimizer as default_optimizer  # imported from here by earlier code

_check_optimizer = check_optimizer  # its old name


class FedPEFTModule(FederatedHooks, PersonalParts, pl.LightningModule):
    """A timm ViT with a PEFT method attached; only the method's tensors train.

    Args:
        num_classes: size of the classifier; must equal the data set's number of classes.
        backbone: which ViT and which weights (loaded in :meth:`configure_model`, so building
            the module downloads nothing).
        peft: the fine-tuning method, a :class:`~fedpeft_pl.peft.PEFTMethod`.
        optimizer: called with the trainable parameters at the start of each client's local
            training; the default is SGD(lr=0.01, momentum=0.9, weight_decay=1e-4).

    Example::

        module = FedPEFTModule(10, Backbone("vit_tiny_patch16_224", img_size=32), Prompt(num_tokens=5))
    """

    def __init__(
        self,
        num_classes: int,
        backbone: Optional[Backbone] = None,
        peft: Optional[PEFTMethod] = None,
        optimizer: Optional[OptimizerCallable] = None,
    ) -> None:
        super().__init__()
        # the network, as PEFTModel builds it
        self.adopt(num_classes, build_peft_model(num_classes, backbone, peft, optimizer))
        self._weights_loaded = not self.backbone.loads_weights
        self._fingerprint: Optional[str] = None
        self.session: Optional[ClientSession] = None  # the client being trained, set by the runner
        # set while the feature cache serves a run (fedpeft_pl.runners.feature_cache): batches hold the
        # images' pre-logit features, and forward is the classifier alone
        self.takes_features = False
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_count = 0
        # set by fedpeft_pl.privacy.LocalDP: local steps become DP-SGD steps (manual optimization)
        self.privacy: Optional[Any] = None
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        # checkpoints and updates hold the trainable tensors only; see on_save_checkpoint
        self.strict_loading = False

    @override
    def configure_model(self) -> None:
        """Load the backbone's pre-trained weights once, before any checkpoint is restored."""
        if not self._weights_loaded:
            self.backbone.load_weights(self.model)
            self._weights_loaded = True
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model, self.backbone_names)

    @contextmanager
    def training_only(self, names: Collection[str]) -> Iterator[None]:
        """Within the block, only the trainable tensors in ``names`` train (FedRep's phases)."""
        params = trainable_parameters(self)
        try:
            for name, param in params.items():
                param.requires_grad_(name in names)
            yield
        finally:
            for param in params.values():
                param.requires_grad_(True)

    @property
    def backbone_fingerprint(self) -> str:
        """Hash of the backbone's tensors as loaded, before training: its identity in checkpoints."""
        self.configure_model()
        assert self._fingerprint is not None
        return self._fingerprint

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.takes_features:
            return self.model.get_classifier()(images)
        return self.model(images)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(trainable_parameters(self).values())

    def begin_client(self, session: ClientSession) -> None:
        """A client starts local training with ``session`` (its received state is already loaded)."""
        self.session = session
        self._loss_sum = None
        self._loss_count = 0

    def end_client(self) -> None:
        """The client's local training is over: the module holds no client any more."""
        self.session = None

    def track_loss(self, loss_sum: torch.Tensor, count: int) -> None:
        # A running sum instead of self.log: Lightning's per-step logging took about 9% of a Head
        # run's profiled time (benchmarks/overhead.py); the client reports it once, in its result.
        """Add ``count`` samples' summed training loss ``loss_sum`` to the current client's running figure."""
        self._loss_sum = loss_sum if self._loss_sum is None else self._loss_sum + loss_sum
        self._loss_count += count

    def local_metrics(self) -> dict[str, float]:
        """The current client's figures so far: its mean training loss over every sample of its local steps."""
        if not self._loss_count:
            return {}
        return {"train_loss": float(self._loss_sum / self._loss_count)}

    @torch.no_grad()
    def evaluate_on(self, loader: Iterable, forward_context: Optional[Any] = None) -> tuple[int, dict[str, float]]:
        """Accuracy and mean loss of the model as it is now over ``loader`` (a client's own test split).

        Returns the number of samples and ``{"acc": ..., "loss": ...}`` (empty for no samples).
        """
        # one client's own figure: torchmetrics must not sum it with other processes' clients under DDP
        accuracy = MulticlassAccuracy(self.num_classes, average="micro", sync_on_compute=False).to(self.device)
        loss_sum, count = 0.0, 0
        was_training = self.training
        self.eval()
        try:
            for images, labels in loader:
                images, labels = images.to(self.device), labels.to(self.device)
                with forward_context if forward_context is not None else nullcontext():
                    logits = self(images)
                accuracy.update(logits, labels)
                loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
                count += len(labels)
        finally:
            self.train(was_training)
        if not count:
            return 0, {}
        return count, {"acc": float(accuracy.compute()), "loss": loss_sum / count}

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        if self.privacy is not None:
            return self._private_step(batch)
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.track_loss(loss.detach() * len(labels), len(labels))
        if self.session is not None and self.session.adds_loss:  # a strategy's term (FedProx, FedDyn)
            term = self.session.loss_term(trainable_parameters(self))
            if term is not None:
                loss = loss + term
        return loss

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Count the client's steps and apply the strategy's gradient correction (SCAFFOLD)."""
        session = self.session
        if session is None:
            return
        session.context.steps += 1
        if session.corrects_gradients:
            params = trainable_parameters(self)
            grads = {name: p.grad for name, p in params.items() if p.grad is not None}
            corrected = session.correct(grads, {name: p.detach() for name, p in params.items()})
            for name, grad in corrected.items():
                params[name].grad = grad

    def _private_step(self, batch: Any) -> None:
        """One DP-SGD step: the noisy sum of clipped per-sample gradients, then the optimizer."""
        images, labels = batch
        client = self.session.client if self.session is not None else None
        gradient, losses = self.privacy.private_gradient(self, images, labels, client)
        params = trainable_parameters(self)
        if self.session is not None and self.session.adds_loss:
            # a strategy's loss term depends on no record, so its gradient needs no noise
            term = self.session.loss_term(params)
            if term is not None:
                extra = torch.autograd.grad(term, list(params.values()), allow_unused=True)
                gradient = {n: g if e is None else g + e.detach() for (n, g), e in zip(gradient.items(), extra)}
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for name, param in params.items():
            param.grad = gradient[name].to(param.dtype)
        optimizer.step()
        self.track_loss(losses.sum(), len(losses))

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "server")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Any, prefix: str) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log(
            f"{prefix}/loss",
            F.cross_entropy(logits, labels),
            batch_size=len(labels),
            logger=prefix == "test",
            sync_dist=True,
        )
        self.log(f"{prefix}/acc", self.val_acc, prog_bar=True, logger=prefix == "test")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen backbone is rebuilt from its weights on load; only the trainable state is saved,
        # with the backbone's identity. Optimizer state is per client and discarded after each client.
        trainable = trainable_parameters(self).keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["optimizer_states"] = []
        checkpoint["backbone"] = {"name": self.backbone.name, "fingerprint": self.backbone_fingerprint}
        checkpoint["peft"] = repr(self.peft)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("backbone")
        if saved is None:
            raise ConfigError(
                "this checkpoint was not written by fedpeft (it names no backbone); pass a fedpeft checkpoint"
            )
        if saved["fingerprint"] != self.backbone_fingerprint:
            raise ConfigError(
                f"the checkpoint was trained on backbone {saved['name']!r} (fingerprint {saved['fingerprint']}) but "
                "this "
                f"run builds {self.backbone.name!r} (fingerprint {self.backbone_fingerprint}); resume with the "
                "model.backbone settings and weights that wrote it"
            )
        missing = sorted(trainable_parameters(self).keys() - checkpoint["state_dict"].keys())
        if missing:
            raise ConfigError(
                f"the checkpoint lacks {len(missing)} trainable tensors of {self.peft!r} (e.g. {missing[0]}); "
                "resume with the configuration that wrote it"
            )
