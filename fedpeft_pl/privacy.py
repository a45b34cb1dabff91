"""Differential privacy with real accounting: local DP-SGD on each client, central DP-FedAvg and DP-FTRL.

Local DP (:class:`LocalDP`) protects each record of a client's data: every local step clips
each sample's gradient of the trainable tensors to norm ``C``, sums, adds Gaussian noise of
standard deviation ``sigma * C`` and divides by the expected batch size. Batches are Poisson
samples with rate ``q = batch_size / n_k``, as the accounting assumes. Per-sample gradients come
from ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``), so they work for every PEFT
method, hooks included, and for full fine-tuning.

Central DP (:class:`DPFedAvg`, McMahan et al. 2018) protects each client's whole contribution:
the server clips every update to norm ``S``, averages with a fixed denominator and adds
Gaussian noise; client sampling is Poisson with rate ``q = m / N``.

Central DP-FTRL (:class:`DPFTRL`, Kairouz et al. 2021) protects the same unit without any sampling
assumption: the clipped updates' running sum is released through tree aggregation with restarts,
and each client takes part at most once per tree, which the strategy's own client draw enforces.

All account with opacus' RDP or PRV accountant or dp-accounting's PLD accountant, and calibrate
``sigma`` from a target ``(epsilon, delta)`` with the same accountant (:mod:`fedpeft_pl.accounting`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap
from typing_extensions import override

from fedpeft_pl.accounting import (
    ACCOUNTANTS,
    require_dp_libraries,
    restart_trees,
    tree_cross_check,
    tree_epsilon,
    tree_noise_multiplier,
)
from fedpeft_pl.accounting import epsilon as _accounted
from fedpeft_pl.accounting import noise_multiplier as _calibrated
from fedpeft_pl.capabilities import PrivacyMechanism
from fedpeft_pl.capabilities import releases_client_statistics as run_releases_client_statistics
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientResult, Federation, Round, State
from fedpeft_pl.hooks import ClientDropped, FederatedCallback
from fedpeft_pl.noise import NOT_PRIVATE, NoiseSource
from fedpeft_pl.peft import trainable_parameters
from fedpeft_pl.seeds import DDP_NOISE, DP_NOISE, SERVER_NOISE, TREE_NOISE, TREE_ORDER, derive_seed
from fedpeft_pl.strategies import ClientUpdate, Strategy

log = logging.getLogger(__name__)


# the metric a deployed client reports with its update: the epsilon it has spent so far, by its own accountant
EPSILON_SPENT = "privacy-epsilon-spent"


def releases_client_statistics(trainer: Any) -> bool:
    """Whether a run may collect un-noised per-client statistics (training loss, label histograms,
    accuracy on a client's own test split).

    Yes in a run without DP; in a private run only if every privacy mechanism among the run's
    parts (its callbacks and the server's strategy) declared
    ``release_client_statistics: true`` (:func:`fedpeft_pl.capabilities.releases_client_statistics`).
    Such statistics are not covered by the DP guarantee.
    """
    callbacks = list(getattr(trainer, "callbacks", []))
    return run_releases_client_statistics([*callbacks, *(getattr(c, "strategy", None) for c in callbacks)])


def _announce_client_statistics(owner: str, release: bool) -> None:
    if release:
        log.warning(
            f"{owner}: release_client_statistics is on: un-noised per-client statistics (training loss, label "
            "histograms, accuracy on each client's test split) are collected and logged; they are not covered by "
            "the DP guarantee"
        )
    else:
        log.info(
            f"{owner}: per-client training loss, label histograms and per-client test accuracy are not collected "
            "in this private run (release_client_statistics: true collects them, outside the DP guarantee)"
        )


def check_privacy_arguments(
    epsilon: Optional[float], delta: float, clip: float, accountant: str, clip_name: str
) -> None:
    if epsilon is not None and not epsilon > 0:
        raise ConfigError(f"privacy epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy delta must be in (0, 1), got {delta}; 1/(number of records) or smaller is usual")
    if not clip > 0:
        raise ConfigError(f"privacy {clip_name} must be > 0, got {clip}")
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")


def clipped_gradient_sum(
    module: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    max_grad_norm: float,
    chunk_size: int = 32,
) -> tuple[State, torch.Tensor]:
    """The sum over the batch of each sample's gradient of the trainable tensors, clipped to ``max_grad_norm``.

    Returns the sums (named as in ``module.named_parameters()``) and the per-sample losses.
    Per-sample gradients are computed ``chunk_size`` samples at a time, so memory grows with
    ``chunk_size`` times the trainable size, not with the batch.
    """
    params = {name: p.detach() for name, p in trainable_parameters(module).items()}

    def loss_of(p: State, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = functional_call(module, p, (image.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    per_sample = vmap(grad_and_value(loss_of), in_dims=(None, 0, 0), randomness="different")
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    losses = []
    for start in range(0, len(labels), chunk_size):
        grads, loss = per_sample(params, images[start : start + chunk_size], labels[start : start + chunk_size])
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
        factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for name, g in grads.items():
            sums[name] += torch.einsum("b,b...->...", factors.to(g.dtype), g)
        losses.append(loss.detach())
    return sums, torch.cat(losses) if losses else torch.zeros(0)


class LocalDP(FederatedCallback, PrivacyMechanism):
    """DP-SGD on every client, with per-client accounting (record-level privacy of each client's data).

    Each client ``k`` gets its own noise multiplier, calibrated so that its expected use over
    the run, ``num_rounds * m / N`` participations of ``local_epochs / q_k`` steps at sampling rate
    ``q_k = batch_size / n_k``, costs ``(epsilon, delta)``. What each client actually spends is
    tracked across the rounds it takes part in and logged (``privacy/client_epsilon_max``,
    ``privacy/client_epsilon_mean``); a client whose next participation would exceed
    ``epsilon`` stops taking part, with a log line.

    In a Flower deployment each client keeps its own accountant (:meth:`client_accountant`, stored
    on its SuperNode) and declines to train when its budget is spent; the server then only logs the
    spent epsilon the clients report (:meth:`account_on_clients`).

    Args:
        epsilon: each client's target budget for the run.
        delta: target delta, in (0, 1).
        max_grad_norm: C, the per-sample clipping bound.
        noise_multiplier: a fixed sigma instead of one calibrated from ``epsilon``.
        accountant: ``rdp`` or ``prv`` (opacus) or ``pld`` (dp-accounting).
        chunk_size: samples per ``vmap`` call; bounds memory.
        reproducible_noise: draw the noise from ``trainer.seed`` instead of a secret source, so runs
            repeat bit for bit. Anyone with the config can then remove the noise: the run is not
            private. Off by default (:mod:`fedpeft_pl.noise`). It seeds the Poisson batch
            sampling from the seed, too; by default that is secret as well.
        release_client_statistics: collect and log un-noised per-client statistics (the training
            loss, label histograms), which the DP guarantee does not cover. Off by default.

    Example::

        trainer:
          privacy:
            class_path: fedpeft_pl.privacy.LocalDP
            init_args: {epsilon: 5.0, delta: 1.0e-3, max_grad_norm: 1.0}
    """

    reports_from_clients = True  # each client reports the epsilon it spent beside its update

    def __init__(
        self,
        epsilon: Optional[float] = 5.0,
        delta: float = 1e-3,
        max_grad_norm: float = 1.0,
        noise_multiplier: Optional[float] = None,
        accountant: str = "rdp",
        chunk_size: int = 32,
        reproducible_noise: bool = False,
        release_client_statistics: bool = False,
    ) -> None:
        require_dp_libraries("LocalDP")
        check_privacy_arguments(epsilon, delta, max_grad_norm, accountant, "max_grad_norm")
        if epsilon is None and noise_multiplier is None:
            raise ConfigError("LocalDP needs a target epsilon or a noise_multiplier")
        if noise_multiplier is not None and noise_multiplier < 0:
            raise ConfigError(f"LocalDP noise_multiplier must be >= 0, got {noise_multiplier}")
        self.epsilon = epsilon
        self.delta = delta
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.accountant = accountant
        self.chunk_size = chunk_size
        self.reproducible_noise = reproducible_noise
        self.release_client_statistics = release_client_statistics
        self._noise = NoiseSource(DP_NOISE, reproducible=reproducible_noise)
        self._round = 0
        self._histories: dict[int, list] = {}
        self._sigma: dict[int, float] = {}
        self._federation: Any = None
        self._datamodule: Any = None
        self.accounted_on_clients = False
        self._reported: dict[int, float] = {}

    # -- the client side of one local step -------------------------------------------------------

    def private_gradient(
        self, module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, client: int
    ) -> tuple[State, torch.Tensor]:
        """Noisy clipped gradient for one Poisson batch of ``client``, and its per-sample losses."""
        expected = self.expected_batch_size(client)
        sums, losses = clipped_gradient_sum(module, images, labels, self.max_grad_norm, self.chunk_size)
        noisy = {name: (s + self.noise(client, s)) / expected for name, s in sums.items()}
        return noisy, losses

    def expected_batch_size(self, client: int) -> float:
        """The expected size ``q_k * n_k`` of ``client``'s Poisson batches, by which its noisy sums are divided."""
        rate, _ = self._rates(client)
        return rate * self._datamodule.client_num_samples(client)

    def noise(self, client: int, like: torch.Tensor, std: Optional[float] = None) -> torch.Tensor:
        """Gaussian noise for ``client``'s current round, shaped, typed and placed like ``like``.

        ``std`` defaults to the client's ``sigma * C``. Each client's round is its own stream, so
        clients trained side by side (a vectorised engine) draw independent noise.

        Example::

            noisy_sum = clipped_sum + privacy.noise(client, clipped_sum)
        """
        if std is None:
            sigma = self._sigma[client]
            std = sigma * self.max_grad_norm if sigma > 0 else 0.0  # sigma 0 with C = inf: no noise, not NaN
        return self._noise.like(like, std, (self._round, client))

    # -- accounting --------------------------------------------------------------------------------

    def _rates(self, client: int) -> tuple[float, int]:
        datamodule = self._datamodule
        samples = datamodule.client_num_samples(client)
        rate = min(1.0, datamodule.batch_size / samples)
        steps = self._federation.local_epochs * datamodule.client_num_batches(client)
        return rate, steps

    def sigma_for(self, client: int) -> float:
        if client not in self._sigma:
            if self.noise_multiplier is not None:
                self._sigma[client] = self.noise_multiplier
            else:
                rate, steps = self._rates(client)
                federation = self._federation
                participations = max(
                    1, math.ceil(federation.num_rounds * federation.clients_per_round / federation.num_clients)
                )
                assert self.epsilon is not None
                self._sigma[client] = _calibrated(
                    self.accountant, self.epsilon, self.delta, rate, participations * steps
                )
        return self._sigma[client]

    def spent(self, client: int) -> float:
        """The epsilon that ``client`` has spent so far."""
        return _epsilon(self.accountant, self._histories.get(client, []), self.delta)

    def _after(self, client: int, sigma: float, rate: float, steps: int) -> list:
        return _append(self._histories.get(client, []), sigma, rate, steps)

    def begin(self, client: int, server_round: int) -> None:
        """``client`` is about to train in ``server_round``: raise ClientDropped if that would exceed its
        budget, else open its noise stream."""
        self._round = server_round
        sigma = self.sigma_for(client)
        rate, steps = self._rates(client)
        if self.epsilon is not None:
            after = _epsilon(self.accountant, self._after(client, sigma, rate, steps), self.delta)
            if after > self.epsilon:
                raise ClientDropped(
                    f"its privacy budget is spent ({self.spent(client):.2f} of epsilon {self.epsilon}; this round "
                    f"would bring it to {after:.2f}); it takes no further part"
                )
        self._noise.open((server_round, client), seed=self._federation.seed)

    def end(self, client: int, server_round: int) -> None:
        """``client`` has trained in ``server_round``: account every planned step, forget its noise stream."""
        rate, steps = self._rates(client)
        # every planned step is accounted, also a step whose Poisson batch happened to be empty
        self._histories[client] = self._after(client, self._sigma[client], rate, steps)
        self._noise.close((server_round, client))

    def client_accountant(self, client: int) -> dict[str, Any]:
        """What ``client``'s own accountant holds (noise multiplier and its history of sigma, sample rate and
        steps), in plain numbers a deployed client stores between rounds."""
        return {
            "sigma": self._sigma.get(client),
            "history": [list(h) for h in self._histories.get(client, [])],
        }

    def load_client_accountant(self, client: int, state: dict[str, Any]) -> None:
        """Take over ``client``'s accountant as :meth:`client_accountant` gave it (empty: a fresh client)."""
        self._histories[client] = [tuple(h) for h in state.get("history", [])]
        if state.get("sigma") is not None:
            self._sigma[client] = float(state["sigma"])
        else:
            self._sigma.pop(client, None)

    def account_on_clients(self) -> None:
        """Each client keeps its own accountant (a Flower deployment): the server does not keep a client out for
        its budget (the client declines itself) and logs the spent epsilon the clients report with their
        updates (:data:`EPSILON_SPENT`)."""
        self.accounted_on_clients = True

    # -- hooks ---------------------------------------------------------------------------------------

    def attach(self, module: pl.LightningModule, datamodule: Any) -> None:
        """Make ``module``'s local steps DP-SGD steps and ``datamodule``'s local batches Poisson samples.

        ``FederatedTrainer.fit`` calls this before Lightning sets up the run, so Lightning sees the
        module's manual optimization from the start.
        """
        if not hasattr(module, "privacy"):
            raise ConfigError(
                "LocalDP needs a FedPEFTModule (or a module with a 'privacy' attribute) to train privately"
            )
        if not hasattr(datamodule, "poisson_sampling"):
            raise ConfigError("LocalDP needs a FederatedDataModule, whose local batches can be Poisson samples")
        module.privacy = self
        module.automatic_optimization = False
        datamodule.poisson_sampling = True
        self._datamodule = datamodule
        # which records a batch holds must be as secret as the noise (amplification by subsampling)
        datamodule.secret_sampling = not self.reproducible_noise
        self._noise.warn_if_reproducible("LocalDP")
        _announce_client_statistics("LocalDP", self.release_client_statistics)
        # timm's fused attention (scaled_dot_product_attention) has no vmap batching rule on every
        # device; the explicit softmax(q k^T) v path is the same function and vmaps everywhere
        for submodule in module.modules():
            if hasattr(submodule, "fused_attn"):
                submodule.fused_attn = False

    @override
    def on_federation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, federation: Federation) -> None:
        self._federation = federation

    @override
    def on_round_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round) -> None:
        self._round = round.number

    @override
    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, client: int) -> None:
        if not self.accounted_on_clients:
            self.begin(client, self._round)

    @override
    def on_client_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        if not self.accounted_on_clients:
            self.end(result.client, self._round)
        elif EPSILON_SPENT in result.metrics:
            self._reported[result.client] = float(result.metrics[EPSILON_SPENT])

    @override
    def on_client_failed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        self._noise.close((self._round, result.client))

    @override
    def on_client_dropped(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        self._noise.close((self._round, result.client))

    @override
    def on_round_gather(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, gather: Callable[[Any], list[Any]]
    ) -> None:
        if trainer.world_size == 1 or self.accounted_on_clients:
            return
        # each process accounted the clients it trained; every process takes over all of them
        mine = {c: (self._histories.get(c), self._sigma.get(c)) for c in round.share}
        for part in gather(mine):
            for client, (history, sigma) in part.items():
                if history is not None:
                    self._histories[client] = history
                if sigma is not None:
                    self._sigma[client] = sigma

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.accounted_on_clients:
            spent = list(self._reported.values())
        else:
            spent = [self.spent(c) for c in self._histories]
        if not spent:
            return
        metrics = {"privacy/client_epsilon_max": max(spent), "privacy/client_epsilon_mean": sum(spent) / len(spent)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.current_epoch + 1)
        log.info(
            f"privacy: clients have spent epsilon up to {metrics['privacy/client_epsilon_max']:.3f} "
            f"(mean {metrics['privacy/client_epsilon_mean']:.3f}) at delta {self.delta}"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "histories": {str(c): [list(h) for h in hist] for c, hist in self._histories.items()},
            "sigma": {str(c): s for c, s in self._sigma.items()},
            "reported": {str(c): e for c, e in self._reported.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._histories = {int(c): [tuple(h) for h in hist] for c, hist in state_dict["histories"].items()}
        self._sigma = {int(c): float(s) for c, s in state_dict["sigma"].items()}
        self._reported = {int(c): float(e) for c, e in state_dict.get("reported", {}).items()}

    def describe(self) -> str:
        target = f"epsilon {self.epsilon}" if self.epsilon is not None else f"noise multiplier {self.noise_multiplier}"
        return (
            f"local DP-SGD: per-sample clipping C={self.max_grad_norm}, {target} per client at delta {self.delta} "
            f"({self.accountant} accountant); sigma is calibrated per client from its sampling rate and expected steps"
            + (f". {NOT_PRIVATE}" if self.reproducible_noise else "")
        )


class AdaptiveClipping:
    """Adaptive clipping for central DP (Andrew et al., NeurIPS 2021): the clip norm follows a quantile.

    Each round the server counts the updates whose norm is within the clip norm ``C``, adds Gaussian
    noise of standard deviation ``count_noise`` to the count, divides by the expected number of
    clients (``b``) and moves ``C <- C * exp(-learning_rate * (b - target_quantile))``, so ``C``
    approaches the ``target_quantile`` of the update norms. The noisy count is a second Gaussian
    mechanism on the same clients; together with the update's noise of multiplier ``z_update`` they
    spend what one Gaussian mechanism of multiplier ``z`` does, where
    ``z^-2 = z_update^-2 + (2 * count_noise)^-2`` (the paper's Theorem 1), so the run's target epsilon
    calibrates ``z`` as without adaptive clipping and the update's noise is raised to ``z_update``.

    The count's noise by default: the paper's ``m / 20`` (``m`` the expected clients a round), which it
    chose for a count that costs little, for cohorts of hundreds; with a few clients a round that count
    would take most of the budget (8 clients at ``z = 0.68``: the update's noise rises to 1.27), so the
    default is at least ``z / (2 sqrt(0.1))``, where the count spends a tenth of the budget in RDP and the
    update's noise rises by 5.4 % at most.

    Args:
        target_quantile: the share of updates to leave unclipped, in (0, 1); 0.5 (the median) by default.
        learning_rate: how fast the clip norm moves (eta_C), > 0; 0.2 as in the paper.
        count_noise: the count's noise; by default the larger of the paper's expected clients a round over 20
            and ``z / (2 sqrt(0.1))`` (the count's share of the budget at most a tenth).
    """

    def __init__(
        self, target_quantile: float = 0.5, learning_rate: float = 0.2, count_noise: Optional[float] = None
    ) -> None:
        if not 0 < target_quantile < 1:
            raise ConfigError(f"AdaptiveClipping target_quantile must be in (0, 1), got {target_quantile}")
        if not learning_rate > 0:
            raise ConfigError(f"AdaptiveClipping learning_rate must be > 0, got {learning_rate}")
        if count_noise is not None and not count_noise > 0:
            raise ConfigError(f"AdaptiveClipping count_noise must be > 0, got {count_noise}")
        self.target_quantile = target_quantile
        self.learning_rate = learning_rate
        self.count_noise = count_noise

    def __repr__(self) -> str:
        return (
            f"AdaptiveClipping(target_quantile={self.target_quantile}, learning_rate={self.learning_rate}, "
            f"count_noise={self.count_noise})"
        )

    def update_multiplier(self, z: float, count_noise: float) -> float:
        """The update's noise multiplier that, beside the count's noise, spends what multiplier ``z`` does."""
        if not 2 * count_noise > z:
            raise ConfigError(
                f"AdaptiveClipping count_noise {count_noise:g} is too small for noise multiplier {z:g}: the count "
                f"alone would spend more than the budget; set count_noise above {z / 2:g}"
            )
        return float((z**-2 - (2 * count_noise) ** -2) ** -0.5)

    def count_noise_for(self, expected_clients: float, noise_multiplier: float) -> float:
        """The count's noise for ``expected_clients`` a round at noise multiplier ``z``: ``count_noise`` if given, else
        :func:`default_count_noise`."""
        if self.count_noise is not None:
            return self.count_noise
        return default_count_noise(expected_clients, noise_multiplier)

    def next_clip(self, clip: float, unclipped_share: float) -> float:
        return float(clip * math.exp(-self.learning_rate * (unclipped_share - self.target_quantile)))


# the most of the budget adaptive clipping's count spends by default (in RDP: its share of z^-2)
COUNT_SHARE = 0.1


def default_count_noise(expected_clients: float, noise_multiplier: float) -> float:
    """Adaptive clipping's count noise by default: the paper's ``m / 20``, raised where the count would spend more
    than :data:`COUNT_SHARE` of the budget of noise multiplier ``z`` (a few clients a round)."""
    return max(expected_clients / 20, noise_multiplier / (2 * math.sqrt(COUNT_SHARE)))


class _ServerPrivacy(Strategy, PrivacyMechanism):
    """What the server's private strategies (DPFedAvg, DPFTRL, DistributedDP) share: a clip norm and noise given by
    a target epsilon or a noise multiplier, checked alike, and a release every round."""

    def __init__(
        self,
        clip_norm: float,
        epsilon: Optional[float],
        delta: float,
        noise_multiplier: Optional[float],
        accountant: str,
    ) -> None:
        super().__init__()
        # Every round releases a noisy aggregate, also one in which no client was sampled or
        # returned: skipping such a round would reveal that it had no contributions.
        self.min_clients = 0
        require_dp_libraries(type(self).__name__)
        check_privacy_arguments(epsilon, delta, clip_norm, accountant, "clip_norm")
        if epsilon is None and noise_multiplier is None:
            raise ConfigError(f"{type(self).__name__} needs a target epsilon or a noise_multiplier")
        self.clip_norm = clip_norm
        self.epsilon = epsilon
        self.delta = delta
        self.noise_multiplier = noise_multiplier


class DPFedAvg(_ServerPrivacy):
    """DP-FedAvg (McMahan et al. 2018): user-level central differential privacy.

    Each client's update ``w_k - global`` is clipped to norm ``clip_norm``; the server sums the
    clipped updates, adds Gaussian noise of standard deviation ``noise_multiplier * clip_norm``
    and divides by the expected number of clients ``q * N`` (the fixed-denominator estimator).
    Clients must be sampled by Poisson sampling (``trainer.client_sampling: poisson``) with
    ``q = m / N``. Spent epsilon is accounted per round (``privacy/epsilon``).

    Args:
        clip_norm: S, the bound on each client's update norm.
        epsilon: target budget for the run; calibrates the noise multiplier. Or give ``noise_multiplier``.
        delta: target delta, in (0, 1).
        noise_multiplier: z, fixed instead of calibrated.
        accountant: ``rdp`` or ``prv`` (opacus) or ``pld`` (dp-accounting).
        reproducible_noise: draw the noise from ``trainer.seed`` instead of a secret source, so runs
            repeat bit for bit. Anyone with the config can then remove the noise: the run is not
            private. Off by default (:mod:`fedpeft_pl.noise`).
        release_client_statistics: collect and log un-noised per-client statistics (the training
            loss, label histograms), which the DP guarantee does not cover. Off by default.
        adaptive: :class:`AdaptiveClipping`: ``clip_norm`` is only where the clip norm starts, and it
            follows a quantile of the update norms (``privacy/clip_norm``, ``privacy/unclipped_share``
            per round, the latter noised); off by default.

    Every round releases a noisy aggregate, even one to which no client contributed.

    Under buffered asynchronous aggregation (``trainer.schedule: FedBuff`` or ``FedAsync``) each
    server update clips every buffered reply's weighted change to ``clip_norm``, sums the
    ``buffer_size`` of them, adds the same noise and divides by ``buffer_size``: FedBuff's server
    needs only each buffer's sum, so this is the same Gaussian mechanism, and no client has more
    than one reply in a buffer. A buffer's clients are decided by their arrival, not sampled, so the
    accounting takes no amplification by sampling: every server update counts as a Gaussian
    mechanism of noise multiplier ``z`` on every client (sample rate 1), composed over the updates.
    The epsilon is therefore higher than a synchronous run's with the same noise; Poisson sampling
    is not needed.
    """

    def __init__(
        self,
        clip_norm: float = 1.0,
        epsilon: Optional[float] = 5.0,
        delta: float = 1e-3,
        noise_multiplier: Optional[float] = None,
        accountant: str = "rdp",
        reproducible_noise: bool = False,
        release_client_statistics: bool = False,
        adaptive: Optional[AdaptiveClipping] = None,
    ) -> None:
        super().__init__(clip_norm, epsilon, delta, noise_multiplier, accountant)
        self.accountant = accountant
        self.reproducible_noise = reproducible_noise
        self.release_client_statistics = release_client_statistics
        self._noise = NoiseSource(SERVER_NOISE, reproducible=reproducible_noise)
        self._history: list = []
        self._rate = 0.0
        self._expected_clients = 1.0
        self._seed = 0
        self._buffered = False
        self.adaptive = adaptive
        self._clip = clip_norm  # this round's clip norm: clip_norm, or where adaptive clipping has moved it
        self._update_multiplier: Optional[float] = None  # the update's noise beside adaptive clipping's count
        self._unclipped_share: Optional[float] = None

    def setup(self, federation: Federation) -> None:
        if federation.sampling != "poisson":
            raise ConfigError(
                "DPFedAvg's accounting assumes Poisson client sampling; set trainer.client_sampling: poisson"
            )
        self._start(federation, federation.clients_per_round / federation.num_clients, federation.clients_per_round)

    def setup_buffered(self, federation: Federation, buffer_size: int) -> None:
        # a buffer is filled by arrival order, not by a sample: no amplification by sampling (rate 1)
        self._buffered = True
        self._start(federation, 1.0, buffer_size)

    def _start(self, federation: Federation, rate: float, expected_clients: int) -> None:
        self._rate = rate
        self._expected_clients = float(expected_clients)
        self._seed = federation.seed
        self._noise.warn_if_reproducible("DPFedAvg")
        _announce_client_statistics("DPFedAvg", self.release_client_statistics)
        if self.noise_multiplier is None:
            assert self.epsilon is not None
            self.noise_multiplier = _calibrated(
                self.accountant, self.epsilon, self.delta, self._rate, federation.num_rounds
            )
        self._update_multiplier = self.noise_multiplier
        if self.adaptive is not None:
            self._update_multiplier = self.adaptive.update_multiplier(self.noise_multiplier, self._count_noise)

    @property
    def _count_noise(self) -> float:
        assert self.adaptive is not None
        assert self.noise_multiplier is not None, "calibrated before the first round"
        return self.adaptive.count_noise_for(self._expected_clients, self.noise_multiplier)

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        total = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in global_state.items()}
        clip, unclipped = self._clip, 0
        for update in updates:
            delta = {name: update.state[name].float() - global_state[name].float() for name in global_state}
            norm = torch.stack([d.norm() for d in delta.values()]).norm()
            unclipped += int(float(norm) <= clip)
            # under secure aggregation each client clipped its own update before masking: the sum stays as it is
            factor = 1.0 if update.aggregate_of else min(1.0, clip / (float(norm) + 1e-12))
            for name, d in delta.items():
                total[name] += d * factor
        release = (server_round,)
        self._noise.open(release, seed=self._seed)
        z = self._update_multiplier if self._update_multiplier is not None else self.noise_multiplier
        result = {}
        for name, current in global_state.items():
            # drawn on the CPU whatever the state's device, so reproducible noise is the same on every device
            noise = self._noise.gaussian(current.shape, z * clip, "cpu", torch.float32, release)
            result[name] = (current.float() + (total[name] + noise.to(total[name].device)) / self._expected_clients).to(
                current.dtype
            )
        if self.adaptive is not None:  # the noisy share of unclipped updates moves the next round's clip norm
            count = self._noise.gaussian((1,), self._count_noise, "cpu", torch.float64, release)
            self._unclipped_share = (unclipped + float(count)) / self._expected_clients
            self._clip = self.adaptive.next_clip(clip, self._unclipped_share)
        self._noise.close(release)
        self._history = _append(self._history, self.noise_multiplier, self._rate, 1)
        return result

    @property
    def needs_secret_sampling(self) -> bool:
        """The accounting's amplification by sampling assumes nobody can predict the sampled clients."""
        return not self.reproducible_noise

    def epsilon_spent(self) -> float:
        return _epsilon(self.accountant, self._history, self.delta)

    @property
    def current_clip_norm(self) -> float:
        """The clip norm of the next round: ``clip_norm``, or where adaptive clipping has moved it."""
        return self._clip

    def round_metrics(self) -> dict[str, float]:
        metrics = {"privacy/epsilon": self.epsilon_spent()}
        if self.adaptive is not None:
            metrics["privacy/clip_norm"] = self._clip
            if self._unclipped_share is not None:  # released through the count's noise
                metrics["privacy/unclipped_share"] = self._unclipped_share
        return metrics

    @property
    def needs_individual_updates(self) -> bool:
        # the sum of the clipped updates is all it needs: under secure aggregation each client clips its own;
        # adaptive clipping counts the updates within the clip norm, which needs each update's norm
        return self.adaptive is not None

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [list(h) for h in self._history],
            "noise_multiplier": self.noise_multiplier,
            "clip": self._clip,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history = [tuple(h) for h in state["history"]]
        self.noise_multiplier = state["noise_multiplier"]
        self._clip = state.get("clip", self.clip_norm)

    def privacy_plan(self, federation: Federation, buffered: bool = False) -> str:
        """What the run will spend, before it trains: the noise multiplier (given or calibrated), and the epsilon
        of its releases by every accountant (:func:`fedpeft_pl.accounting.cross_check`)."""
        from fedpeft_pl.accounting import cross_check

        rate = 1.0 if buffered else federation.clients_per_round / federation.num_clients
        z = self.noise_multiplier
        if z is None:
            assert self.epsilon is not None
            z = _calibrated(self.accountant, self.epsilon, self.delta, rate, federation.num_rounds)
        spent = cross_check([(z, rate, federation.num_rounds)], self.delta)
        others = ", ".join(f"{kind} {value:.3f}" for kind, value in spent.items() if kind != self.accountant)
        plan = (
            f"central DP over {federation.num_rounds} server updates: noise multiplier {z:.4f} at client sample rate "
            f"{rate:.4g} spends epsilon {spent[self.accountant]:.3f} at delta {self.delta:g} by the "
            f"{self.accountant} accountant (cross-check: {others})"
        )
        if self.adaptive is not None and not buffered:  # buffered: m is the buffer's size, known at setup
            count = self.adaptive.count_noise_for(federation.clients_per_round, z)
            plan += f"; adaptive clipping's count noise {count:.4g}"
            plan += " (given)" if self.adaptive.count_noise is not None else ""
            try:
                plan += f" leaves the update's noise multiplier {self.adaptive.update_multiplier(z, count):.4f}"
            except ConfigError as err:
                plan += f": {err}"
        return plan

    def describe(self) -> str:
        return (
            f"central DP-FedAvg: update clipping S={self.clip_norm}, "
            + (f"epsilon {self.epsilon} " if self.epsilon is not None else "")
            + f"at delta {self.delta} over the run ({self.accountant} accountant, "
            + (
                "each buffered server update on every client: no amplification by sampling)"
                if self._buffered
                else "Poisson client sampling)"
            )
            + (f"; adaptive clipping from S={self.clip_norm}: {self.adaptive!r}" if self.adaptive is not None else "")
            + (f". {NOT_PRIVATE}" if self.reproducible_noise else "")
        )


def _append(history: list, sigma: float, rate: float, steps: int) -> list:
    history = [tuple(h) for h in history]
    if history and history[-1][0] == sigma and history[-1][1] == rate:
        history[-1] = (sigma, rate, history[-1][2] + steps)
    else:
        history.append((sigma, rate, steps))
    return history


def _epsilon(kind: str, history: list, delta: float) -> float:
    """Epsilon spent by a history of ``(sigma, sample_rate, steps)`` (:func:`fedpeft_pl.accounting.epsilon`)."""
    return _accounted(kind, history, delta)


class TreeNoise:
    """The noise of one binary tree's noisy prefix sums (tree aggregation: Dwork et al. 2010, Chan et al. 2011).

    Node ``(level, k)`` of a tree covers leaves ``(k - 1) * 2**level + 1`` to ``k * 2**level`` and holds one
    Gaussian draw of standard deviation ``std`` per tensor. The prefix sum after leaf ``t`` is released
    with the noise of the nodes of ``t``'s binary decomposition: for every bit ``level`` set in ``t``,
    node ``(level, t >> level)``. A node's noise is drawn once, when the prefix sums first need it, and
    kept while they do (at most one node per level: ``log2(t) + 1`` of them). A leaf thus reaches at
    most ``ceil(log2(T + 1))`` released nodes of a tree of ``T`` leaves, which is what the accounting
    (:func:`fedpeft_pl.accounting.tree_epsilon`) charges.

    Written here rather than taken from a library: tensorflow_privacy's ``TreeAggregator`` and TFF's
    ``DifferentiallyPrivateFactory.tree_aggregation`` are TensorFlow, and no maintained torch library
    keeps a tree's noise for a state dict. Each node is one release of a :class:`~fedpeft_pl.noise.NoiseSource`
    (secret by default), drawn on the CPU in float32 so that reproducible noise is the same on every device.
    """

    def __init__(self, key: int, reproducible: bool = False) -> None:
        self._source = NoiseSource(key, reproducible=reproducible)
        self._nodes: dict[int, tuple[int, State]] = {}  # level -> (node index, its noise)

    def reset(self) -> None:
        """A new tree: forget every node."""
        self._nodes = {}

    def prefix(self, tree: int, step: int, like: State, std: float, seed: int) -> State:
        """The noise of the prefix sum after leaf ``step`` (from 1) of tree ``tree``, shaped like ``like``."""
        for level in [level for level in self._nodes if not (step >> level) & 1]:
            del self._nodes[level]  # its bit is clear: no later prefix of this tree uses that node again
        for level in range(step.bit_length()):
            index = step >> level
            if (step >> level) & 1 and self._nodes.get(level, (None,))[0] != index:
                self._nodes[level] = (index, self._draw((tree, level, index), like, std, seed))
        total = {name: torch.zeros(t.shape, dtype=torch.float32) for name, t in like.items()}
        for _, noise in self._nodes.values():
            for name in total:
                total[name] += noise[name]
        return total

    def _draw(self, release: tuple[int, int, int], like: State, std: float, seed: int) -> State:
        self._source.open(release, seed=seed)
        noise = {name: self._source.gaussian(t.shape, std, "cpu", torch.float32, release) for name, t in like.items()}
        self._source.close(release)
        return noise

    def state_dict(self) -> dict[str, Any]:
        return {str(level): [index, dict(noise)] for level, (index, noise) in self._nodes.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._nodes = {int(level): (int(index), dict(noise)) for level, (index, noise) in state.items()}


class DPFTRL(_ServerPrivacy):
    """DP-FTRL (Kairouz et al., ICML 2021): user-level central DP without sampling or shuffling.

    Each round the server clips every client's update ``w_k - global`` to norm ``clip_norm`` (S) and
    sums them: one leaf of a binary tree. The tree releases noisy prefix sums ``s_t`` (the sum of the
    tree's leaves so far plus the noise of ``log2(t) + 1`` tree nodes, each of standard deviation
    ``noise_multiplier * S``: :class:`TreeNoise`), and the model is follow-the-regularized-leader's with
    momentum (DP-FTRLM, the paper's Algorithm 1 as in its federated code)::

        v_t = momentum * v_{t-1} + s_t
        global_t = global_0 + server_lr * v_t / m

    where ``global_0`` is the model when the tree started and ``m`` is ``clients_per_round`` (the fixed
    denominator). Without noise, clipping or momentum this is FedAvg with server learning rate
    ``server_lr`` (an unweighted mean); with ``momentum`` it is FedAvgM. The tree restarts every
    ``restart_every`` rounds (by default ``N // m``: one tree per pass over the clients, the paper's
    restart per epoch) from the then model, with zero momentum.

    **The participation bound is enforced, not assumed.** The guarantee needs each client in at most
    one leaf of each tree, so the strategy draws each round's clients itself (:meth:`draw_clients`):
    a tree's clients are a uniformly random permutation of all ``N`` dealt out ``m`` a round (the
    cohort, more with over-selection), i.e. uniform sampling without replacement among the clients not
    yet in the tree. A client that was drawn counts as taking part whether it trained, dropped out
    (availability), failed or arrived late. The order is drawn from the run's seed: privacy does not
    rest on it (no amplification by sampling or shuffling is used), so it needs no secret.

    Accounting (:func:`fedpeft_pl.accounting.tree_epsilon`): dp-accounting's RDP accountant on one
    ``SingleEpochTreeAggregationDpEvent`` per tree, composed (``rdp``, the default: the mechanism's own
    accounting); ``pld`` and ``prv`` account the equivalent Gaussian mechanism, tighter. ``privacy/epsilon``
    is logged per round for the trees so far; every round releases, also one to which no client
    contributed (its leaf is zero).

    Args:
        clip_norm: S, the bound on each client's update norm.
        epsilon: target budget for the run; calibrates the noise multiplier. Or give ``noise_multiplier``.
        delta: target delta, in (0, 1).
        noise_multiplier: z, the noise of every tree node over S, fixed instead of calibrated.
        server_lr: the server learning rate (1 / lambda of FTRL's regulariser), > 0.
        momentum: the momentum on the noisy prefix sums, in [0, 1); 0 by default (the paper uses 0.9).
        restart_every: rounds per tree, at most ``N // m``; ``N // m`` by default.
        accountant: ``rdp`` (dp-accounting's tree event), ``pld`` or ``prv``.
        reproducible_noise: draw the noise from ``trainer.seed`` instead of a secret source, so runs
            repeat bit for bit. Anyone with the config can then remove the noise: the run is not
            private. Off by default (:mod:`fedpeft_pl.noise`).
        release_client_statistics: collect and log un-noised per-client statistics (the training
            loss, label histograms), which the DP guarantee does not cover. Off by default.

    Refused in one line: Poisson client sampling (the draw is the strategy's, uniform within a tree),
    asynchronous schedules (FedBuff, FedAsync: a buffer is not one round's cohort, and the accounting
    of their arrivals is not worked out here), secure aggregation (the server clips each update), and
    a ``restart_every`` whose tree needs more clients than the federation holds.

    Example::

        trainer:
          aggregation:
            class_path: fedpeft_pl.privacy.DPFTRL
            init_args: {clip_norm: 1.0, epsilon: 5.0, delta: 1.0e-3, momentum: 0.9}
    """

    synchronous_only = (
        "DP-FTRL's tree takes one leaf per round from a cohort dealt out without repeats, and its accounting under "
        "asynchronous arrivals is not worked out"
    )

    def __init__(
        self,
        clip_norm: float = 1.0,
        epsilon: Optional[float] = 5.0,
        delta: float = 1e-3,
        noise_multiplier: Optional[float] = None,
        server_lr: float = 1.0,
        momentum: float = 0.0,
        restart_every: Optional[int] = None,
        accountant: str = "rdp",
        reproducible_noise: bool = False,
        release_client_statistics: bool = False,
    ) -> None:
        super().__init__(clip_norm, epsilon, delta, noise_multiplier, accountant)
        if noise_multiplier is not None and not noise_multiplier >= 0:
            raise ConfigError(f"DPFTRL noise_multiplier must be >= 0, got {noise_multiplier}")
        if not server_lr > 0:
            raise ConfigError(f"DPFTRL server_lr must be > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"DPFTRL momentum must be in [0, 1), got {momentum}")
        if restart_every is not None and (isinstance(restart_every, bool) or int(restart_every) != restart_every):
            raise ConfigError(f"DPFTRL restart_every must be a whole number of rounds, got {restart_every!r}")
        if restart_every is not None and restart_every < 1:
            raise ConfigError(f"DPFTRL restart_every must be >= 1 round, got {restart_every}")
        self.server_lr = server_lr
        self.momentum = momentum
        self.restart_every = None if restart_every is None else int(restart_every)
        self.accountant = accountant
        self.reproducible_noise = reproducible_noise
        self.release_client_statistics = release_client_statistics
        self._tree_noise = TreeNoise(TREE_NOISE, reproducible=reproducible_noise)
        self._period = 0  # rounds per tree, known at setup
        self._denominator = 1.0
        self._seed = 0
        self._trees: list[int] = []  # the leaves of every tree so far: the accounting's events
        self._origin: State = {}  # the model when the current tree started
        self._sum: State = {}  # the current tree's sum of clipped updates, un-noised
        self._velocity: State = {}

    # -- the federation's shape -----------------------------------------------------------------------

    def period(self, federation: Federation) -> int:
        """Rounds per tree: ``restart_every``, or ``N // m``; refused if a tree would need more clients than N."""
        m, n = federation.clients_per_round, federation.num_clients
        period = self.restart_every if self.restart_every is not None else n // m
        if period * m > n:
            raise ConfigError(
                f"DPFTRL restart_every {period} with {m} clients a round needs {period * m} clients per tree, the "
                f"federation has {n}: each client takes part at most once per tree; set restart_every <= {n // m}"
            )
        return period

    def _check(self, federation: Federation) -> None:
        if federation.sampling != "uniform":
            raise ConfigError(
                "DPFTRL draws each tree's clients without repeats and takes no amplification by sampling; set "
                "trainer.client_sampling: uniform"
            )

    def setup(self, federation: Federation) -> None:
        self._check(federation)
        self._period = self.period(federation)
        self._denominator = float(federation.clients_per_round)
        self._seed = federation.seed
        self._tree_noise.reset()
        self._noise_warning()
        if self.noise_multiplier is None:
            self.noise_multiplier = self._calibrated(federation)

    def setup_buffered(self, federation: Federation, buffer_size: int) -> None:
        raise ConfigError(f"an asynchronous schedule cannot run DPFTRL: {self.synchronous_only}")

    def _noise_warning(self) -> None:
        if self.reproducible_noise:
            log.warning(f"DPFTRL: {NOT_PRIVATE}")
        _announce_client_statistics("DPFTRL", self.release_client_statistics)

    def _calibrated(self, federation: Federation) -> float:
        assert self.epsilon is not None
        trees = restart_trees(federation.num_rounds, self.period(federation))
        return tree_noise_multiplier(self.accountant, self.epsilon, self.delta, trees)

    def draw_clients(self, federation: Federation, server_round: int, size: int) -> list[int]:
        """Round ``server_round``'s ``size`` clients: the next ``size`` of its tree's random order of all clients."""
        period = self._period or self.period(federation)
        tree, position = divmod(server_round - 1, period)
        if period * size > federation.num_clients:  # refused at the first round, before any client trains
            raise ConfigError(
                f"DPFTRL: a tree of {period} rounds drawing {size} clients a round (over-selection included) needs "
                f"{period * size} clients, the federation has {federation.num_clients}; set restart_every <= "
                f"{federation.num_clients // size}"
            )
        seed = federation.seed if federation.sampling_seed is None else federation.sampling_seed
        order = np.random.default_rng(derive_seed(seed, TREE_ORDER, tree)).permutation(federation.num_clients)
        return sorted(int(c) for c in order[position * size : (position + 1) * size])

    # -- the server update ----------------------------------------------------------------------------

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        assert self._period, "DPFTRL.setup runs before the first round"
        tree, step = divmod(server_round - 1, self._period)
        step += 1
        if step == 1:  # a (re)start: FTRL's regulariser is centred on the model as it is now
            self._tree_noise.reset()
            self._origin = {name: t.detach().float().clone() for name, t in global_state.items()}
            self._sum = {name: torch.zeros_like(t) for name, t in self._origin.items()}
            self._velocity = {name: torch.zeros_like(t) for name, t in self._origin.items()}
        for update in updates:
            delta = {name: update.state[name].float() - global_state[name].float() for name in global_state}
            norm = float(torch.stack([d.norm() for d in delta.values()]).norm())
            factor = min(1.0, self.clip_norm / (norm + 1e-12))
            for name, d in delta.items():
                self._sum[name] += d * factor
        assert self.noise_multiplier is not None
        std = self.noise_multiplier * self.clip_norm if self.noise_multiplier > 0 else 0.0  # z 0, S inf: no noise
        noise = self._tree_noise.prefix(tree, step, global_state, std, self._seed)
        result = {}
        for name, current in global_state.items():
            noisy = self._sum[name] + noise[name].to(self._sum[name].device)
            self._velocity[name] = self.momentum * self._velocity[name] + noisy
            value = self._origin[name] + self.server_lr * self._velocity[name] / self._denominator
            result[name] = value.to(current.dtype)
        if tree == len(self._trees):
            self._trees.append(step)
        else:
            self._trees[tree] = step
        return result

    @property
    def needs_individual_updates(self) -> bool:
        # the server clips each update; clipping on the clients before masking is built for DPFedAvg only
        return True

    @property
    def needs_secret_sampling(self) -> bool:
        """No: the guarantee takes no amplification by sampling, only the bound of one participation per tree."""
        return False

    # -- accounting -----------------------------------------------------------------------------------

    @property
    def trees(self) -> list[int]:
        """The leaves (rounds) of each tree so far."""
        return list(self._trees)

    def epsilon_spent(self) -> float:
        assert self.noise_multiplier is not None or not self._trees
        return tree_epsilon(self.accountant, self.noise_multiplier or 0.0, self._trees, self.delta)

    def round_metrics(self) -> dict[str, float]:
        return {"privacy/epsilon": self.epsilon_spent()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "trees": list(self._trees),
            "noise_multiplier": self.noise_multiplier,
            "origin": dict(self._origin),
            "sum": dict(self._sum),
            "velocity": dict(self._velocity),
            "nodes": self._tree_noise.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._trees = [int(t) for t in state["trees"]]
        self.noise_multiplier = state["noise_multiplier"]
        self._origin = dict(state["origin"])
        self._sum = dict(state["sum"])
        self._velocity = dict(state["velocity"])
        self._tree_noise.load_state_dict(state["nodes"])

    def privacy_plan(self, federation: Federation, buffered: bool = False) -> str:
        """What the run will spend, before it trains: its trees, the noise multiplier (given or calibrated), and the
        epsilon by every accountant (:func:`fedpeft_pl.accounting.tree_cross_check`)."""
        if buffered:
            raise ConfigError(f"an asynchronous schedule cannot run DPFTRL: {self.synchronous_only}")
        self._check(federation)
        period = self.period(federation)
        trees = restart_trees(federation.num_rounds, period)
        z = self.noise_multiplier if self.noise_multiplier is not None else self._calibrated(federation)
        spent = tree_cross_check(z, trees, self.delta)
        others = ", ".join(f"{kind} {value:.3f}" for kind, value in spent.items() if kind != self.accountant)
        return (
            f"DP-FTRL over {federation.num_rounds} rounds in {len(trees)} tree(s) of up to {period} rounds, each "
            f"client at most once a tree: noise multiplier {z:.4f} per tree node spends epsilon "
            f"{spent[self.accountant]:.3f} at delta {self.delta:g} by the {self.accountant} accountant "
            f"(cross-check: {others})"
        )

    def describe(self) -> str:
        restart = f"every {self.restart_every} rounds" if self.restart_every is not None else "every N // m rounds"
        return (
            f"central DP-FTRL: update clipping S={self.clip_norm}, "
            + (f"epsilon {self.epsilon} " if self.epsilon is not None else f"noise multiplier {self.noise_multiplier} ")
            + f"at delta {self.delta} over the run ({self.accountant} accountant, tree aggregation restarted "
            + f"{restart}, each client at most once a tree: no sampling assumed)"
            + (f". {NOT_PRIVATE}" if self.reproducible_noise else "")
        )


# the round config's key that tells a DistributedDP client how many noise shares its round has
NOISE_SHARES = "fedpeft.noise-shares"


class DistributedDP(_ServerPrivacy):
    """Distributed DP (Kairouz, Liu and Steinke, ICML 2021): every client noises its own update before secure
    aggregation, so the server never sees an un-noised sum, and never adds noise.

    Each sampled client clips its update to ``clip_norm``, rotates it (randomized Hadamard, public signs from
    the run's seed and the round), scales it by ``1 / gamma``, rounds it to integers within the conditional
    rounding bound, adds its share of discrete Gaussian noise and wraps it modulo ``2**bits``
    (:mod:`fedpeft_pl.distributed_noise`). Under SecAgg+ the client masks that integer vector, and the server
    unmasks only the sum of the vectors of the clients that finished; it decodes the sum (centred residue,
    times ``gamma``, rotated back) and divides by the expected number of clients ``q * N``, as DP-FedAvg's
    fixed denominator. In a simulation the server sums the clients' integer vectors itself (no masks), with
    the same vectors: with ``reproducible_noise`` a deployment ends where its simulation does.

    The noise: the clients' shares sum to central noise of standard deviation ``noise_multiplier * clip_norm``
    when every client of the round's cohort reaches the sum: the server tells each client how many shares the
    round has (``fedpeft.noise-shares`` in the round config), the number of clients it drew, so a small
    Poisson cohort carries the whole noise too. (``noise_clients`` fixes the number of shares instead: a round
    with fewer clients then holds less noise.) A client that drops out takes its share with it: a round's sum
    holds the noise of its survivors only. The accounting takes each round's shares and survivors (the
    deficit is spent, not assumed away): ``privacy/epsilon`` after each round is the paper's RDP of the sum
    of that many discrete Gaussians (Proposition 14, with its Theorem 1's ``tau`` and the rounding's inflated
    sensitivity), subsampled by the client sample rate (Poisson sampling, Zhu and Wang's general bound),
    composed over the rounds. ``epsilon`` calibrates ``noise_multiplier`` for the expected cohort surviving
    every round; a round with another cohort size spends a little more or less through the rounding (its
    ``gamma``), and a round with dropouts spends more than planned (``fedpeft comm`` says how much with one
    dropout a round). The neighbouring relation is the paper's: one client's update replaced, so the cohort's
    size does not depend on the data, and the number of noise shares is fixed by who takes part.

    The rounding adds error of L2 norm about ``gamma * sqrt(n D) / 2`` to the decoded sum of ``n`` updates
    (:func:`~fedpeft_pl.distributed_noise.error_bound` states twice that); ``gamma`` keeps ``k_stddevs``
    standard deviations of each coordinate of the noised sum inside ``2**bits`` even when all updates point
    the same way, so a coordinate wraps around with probability at most
    :func:`~fedpeft_pl.distributed_noise.wrap_probability`.

    Args:
        clip_norm: ``c``, the bound on each client's update norm.
        epsilon: the run's target budget; calibrates ``noise_multiplier``. Or give ``noise_multiplier``.
        delta: target delta, in (0, 1).
        noise_multiplier: ``z`` of the central noise ``z * c`` that ``noise_clients`` shares make up.
        bits: the modulus is ``2**bits`` (at most 30 under Flower's SecAgg+, and the round's clients times
            ``2**bits`` below ``2**32``).
        beta: conditional randomized rounding's constant in [0, 1); ``exp(-0.5)`` as in the paper.
        k_stddevs: how many standard deviations of the noised sum the modulus holds; 4 as in the paper.
        noise_clients: a fixed number of noise shares for every round; by default each round's cohort (the clients
            the server drew for it), so that the whole cohort carries the whole noise whatever its size.
        reproducible_noise: draw each client's noise and rounding from ``trainer.seed``: NOT private.
        release_client_statistics: collect un-noised per-client statistics, outside the guarantee.
    """

    synchronous_only = (
        "distributed DP's noise shares and the wrap-around are sized for one cohort's sum, and a buffer's "
        "clients are decided by their arrival, so its sampling is not Poisson"
    )

    def __init__(
        self,
        clip_norm: float = 1.0,
        epsilon: Optional[float] = 5.0,
        delta: float = 1e-3,
        noise_multiplier: Optional[float] = None,
        bits: int = 20,
        beta: float = math.exp(-0.5),
        k_stddevs: float = 4.0,
        noise_clients: Optional[int] = None,
        reproducible_noise: bool = False,
        release_client_statistics: bool = False,
    ) -> None:
        super().__init__(clip_norm, epsilon, delta, noise_multiplier, "rdp")
        if noise_multiplier is not None and not noise_multiplier > 0:
            raise ConfigError(f"DistributedDP noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0 <= beta < 1:
            raise ConfigError(f"DistributedDP beta must be in [0, 1), got {beta}")
        if not k_stddevs > 0:
            raise ConfigError(f"DistributedDP k_stddevs must be > 0, got {k_stddevs}")
        if noise_clients is not None and not noise_clients >= 1:
            raise ConfigError(f"DistributedDP noise_clients must be >= 1, got {noise_clients}")
        if not isinstance(bits, int) or not 1 <= bits <= 30:
            raise ConfigError(f"DistributedDP bits must be an int in [1, 30] (SecAgg+ carries int32), got {bits}")
        self._given_multiplier = noise_multiplier
        self.bits = bits
        self.beta = beta
        self.k_stddevs = k_stddevs
        self.noise_clients = noise_clients
        self.reproducible_noise = reproducible_noise
        self.release_client_statistics = release_client_statistics
        self._noise = NoiseSource(DDP_NOISE, reproducible=reproducible_noise)
        self._federation: Optional[Federation] = None
        # (noise shares, survivors) of a round -> rounds with those; shares None: an old checkpoint's planned shares
        self._history: dict[tuple[Optional[int], int], int] = {}
        self._cohorts: dict[int, int] = {}  # the server's: clients drawn for a round, while the round runs
        self._last_survivors: Optional[int] = None
        self._last_shares: Optional[int] = None
        self._dim: Optional[int] = None

    # -- the mechanism, the same on the clients and the server --------------------------------------------

    def _shares(self, federation: Federation) -> int:
        """The shares the noise is planned (calibrated) for: ``noise_clients``, or the expected cohort."""
        return int(self.noise_clients) if self.noise_clients is not None else max(1, federation.clients_per_round)

    def round_shares(self, server_round: int, federation: Federation, config: Optional[dict[str, Any]] = None) -> int:
        """The noise shares of ``server_round``: ``noise_clients`` if given, else the clients the server drew for the
        round (on a client, from the round ``config`` it received), else the planned shares."""
        if self.noise_clients is not None:
            return int(self.noise_clients)
        if config is not None and NOISE_SHARES in config:
            return max(1, int(config[NOISE_SHARES]))
        return max(1, self._cohorts.get(server_round, self._shares(federation)))

    def draw_clients(self, federation: Federation, server_round: int, size: int) -> list[int]:
        clients = super().draw_clients(federation, server_round, size)
        self._cohorts = {server_round: len(clients)}  # the round's noise shares; the server's alone
        return clients

    def configure_fit(self, server_round: int, global_state: State) -> tuple[State, dict[str, Any]]:
        state, config = super().configure_fit(server_round, global_state)
        if self.noise_clients is None:  # before setup (fedpeft comm sizing the message) one share stands in
            federation = self._federation
            shares = self.round_shares(server_round, federation) if federation is not None else 1
            config = {**config, NOISE_SHARES: shares}
        return state, config

    def _rate(self, federation: Federation) -> float:
        return federation.clients_per_round / federation.num_clients

    def conditioning(self, federation: Federation, dim: int, shares: Optional[int] = None) -> Any:
        """The :class:`~fedpeft_pl.distributed_noise.Conditioning` of a round whose noise is in ``shares`` shares (the
        planned ones by default) for updates of ``dim`` elements; the noise multiplier calibrated for the run's
        target epsilon when none was given (the same on every client)."""
        from fedpeft_pl import distributed_noise as ddg

        z = self._given_multiplier
        if z is None:
            assert self.epsilon is not None
            key = (federation.clients_per_round, federation.num_clients, federation.num_rounds, int(dim))
            cached = getattr(self, "_calibrated_for", None)
            if cached is None or cached[0] != key:
                z = ddg.calibrate(
                    self.epsilon,
                    self.clip_norm,
                    self._shares(federation),
                    dim,
                    self.bits,
                    self.beta,
                    self.k_stddevs,
                    self._rate(federation),
                    federation.num_rounds,
                    self.delta,
                )
                self._calibrated_for = (key, z)
            z = self._calibrated_for[1]
        self.noise_multiplier = z
        shares = self._shares(federation) if shares is None else int(shares)
        return ddg.conditioning(self.clip_norm, z, shares, dim, self.bits, self.beta, self.k_stddevs)

    @staticmethod
    def flat(update: State) -> tuple[list[str], np.ndarray]:
        """The update's tensors in one float64 vector, in the order of their sorted names (every party's order)."""
        names = sorted(update)
        parts = [update[n].detach().double().cpu().reshape(-1).numpy() for n in names]
        return names, (np.concatenate(parts) if parts else np.zeros(0))

    def encode_update(
        self,
        update: State,
        server_round: int,
        client: int,
        federation: Federation,
        config: Optional[dict[str, Any]] = None,
    ) -> np.ndarray:
        """A client's update as the integer vector it hands to secure aggregation (already noised): int64 in
        ``[-2**(bits-1), 2**(bits-1))``. Runs on the client, with the round ``config`` it received (which says
        how many noise shares the round has)."""
        from fedpeft_pl import distributed_noise as ddg

        _, vector = self.flat(update)
        cond = self.conditioning(federation, vector.size, self.round_shares(server_round, federation, config))
        signs = ddg.rotation_signs(federation.seed, server_round, cond.padded)
        release = (server_round, client)
        self._noise.open(release, seed=federation.seed)
        try:
            return ddg.encode(vector, cond, signs, self._noise.generator(release))
        finally:
            self._noise.close(release)

    def decode_sum(self, total: np.ndarray, server_round: int, like: State, federation: Federation) -> State:
        """The sum of the clients' updates, shaped like ``like``, from the sum of their integer vectors (mod
        ``2**bits``). Runs on the server."""
        from fedpeft_pl import distributed_noise as ddg

        names = sorted(like)
        dim = sum(like[n].numel() for n in names)
        cond = self.conditioning(federation, dim, self.round_shares(server_round, federation))
        flat = ddg.decode(total, cond, ddg.rotation_signs(federation.seed, server_round, cond.padded))
        result, start = {}, 0
        for name in names:
            size = like[name].numel()
            result[name] = torch.from_numpy(flat[start : start + size].copy()).reshape(like[name].shape)
            start += size
        return result

    # -- the server ----------------------------------------------------------------------------------------

    def setup(self, federation: Federation) -> None:
        if federation.sampling != "poisson":
            raise ConfigError(
                "DistributedDP's accounting assumes Poisson client sampling; set trainer.client_sampling: poisson"
            )
        self._federation = federation
        self._noise.warn_if_reproducible("DistributedDP")
        _announce_client_statistics("DistributedDP", self.release_client_statistics)

    def setup_buffered(self, federation: Federation, buffer_size: int) -> None:
        raise ConfigError(f"buffered asynchronous aggregation cannot run DistributedDP: {self.synchronous_only}")

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        federation = self._federation
        assert federation is not None, "setup runs before the first round"
        from fedpeft_pl import distributed_noise as ddg

        dim = sum(t.numel() for t in global_state.values())
        self._dim = dim
        secure = [u for u in updates if u.aggregate_of]
        if secure:  # SecAgg+: the runner decoded the noised sum of the survivors' vectors (decode_sum)
            if len(updates) != 1:
                raise RuntimeError("under secure aggregation the server gets one aggregate a round")
            survivors = len(secure[0].aggregate_of)
            total = {n: secure[0].state[n].double() - global_state[n].double() for n in global_state}
        else:  # a simulation: each client encodes as on a SuperNode, the server sums the integer vectors
            cond = self.conditioning(federation, dim, self.round_shares(server_round, federation))
            integers = np.zeros(cond.padded, dtype=np.int64)
            for update in updates:
                delta = {n: update.state[n].float() - global_state[n].float() for n in global_state}
                integers = ddg.wrap(
                    integers + self.encode_update(delta, server_round, update.client, federation), cond.modulus
                )
            survivors = len(updates)
            total = self.decode_sum(integers, server_round, global_state, federation)
        expected = float(federation.clients_per_round)
        result = {
            n: (current.double() + total[n].to(current.device) / expected).to(current.dtype)
            for n, current in global_state.items()
        }
        key = (self.round_shares(server_round, federation), survivors)
        self._history[key] = self._history.get(key, 0) + 1
        self._last_survivors = survivors
        self._last_shares = key[0]
        return result

    @property
    def needs_secret_sampling(self) -> bool:
        return not self.reproducible_noise

    @property
    def needs_individual_updates(self) -> bool:
        return False  # the sum of the clients' integer vectors is all it needs

    def epsilon_spent(self) -> float:
        federation = self._federation
        if federation is None or self._dim is None or not self._history:
            return 0.0
        from fedpeft_pl import distributed_noise as ddg

        rate = self._rate(federation)
        rdp = sum(
            rounds * ddg.round_rdp(self.conditioning(federation, self._dim, shares), n, rate)
            for (shares, n), rounds in self._history.items()
        )
        return ddg.epsilon(np.asarray(rdp), self.delta)

    def round_metrics(self) -> dict[str, float]:
        metrics = {"privacy/epsilon": self.epsilon_spent()}
        if self._last_survivors is not None:
            metrics["privacy/noise_clients"] = float(self._last_survivors)
            metrics["privacy/noise_shares"] = float(self._last_shares or 0)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        history = [[shares, survivors, rounds] for (shares, survivors), rounds in self._history.items()]
        return {"history": history, "dim": self._dim, "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "history" in state:
            self._history = {(None if s is None else int(s), int(n)): int(r) for s, n, r in state["history"]}
        else:  # a checkpoint from before the shares followed the cohort: every round had the planned shares
            self._history = {(None, int(k)): int(v) for k, v in state["survivors"].items()}
        self._dim = state["dim"]
        self.noise_multiplier = state["noise_multiplier"]

    def privacy_plan(self, federation: Federation, buffered: bool = False, dimension: Optional[int] = None) -> str:
        """What the run will spend for updates of ``dimension`` elements: the calibrated noise, the epsilon with
        every planned client surviving, and with one fewer every round (the dropout deficit)."""
        from fedpeft_pl import distributed_noise as ddg

        if buffered:
            return f"DistributedDP cannot run buffered asynchronous aggregation: {self.synchronous_only}"
        if dimension is None:
            return "distributed DP: the plan needs the update's dimension (the exchanged parameters)"
        cond = self.conditioning(federation, dimension)
        rate, shares, rounds = self._rate(federation), self._shares(federation), federation.num_rounds
        full = ddg.epsilon(rounds * ddg.round_rdp(cond, shares, rate), self.delta)
        short = ddg.epsilon(rounds * ddg.round_rdp(cond, max(shares - 1, 1), rate), self.delta)
        return (
            f"distributed DP over {rounds} rounds: noise multiplier {self.noise_multiplier:.4f} in "
            + (
                f"{shares} client shares"
                if self.noise_clients is not None
                else f"a share for each client of a round's cohort ({shares} expected)"
            )
            + f", {self.bits} bits, gamma {cond.gamma:.3g}, at client sample rate {rate:.4g} spends "
            f"epsilon {full:.3f} at delta {self.delta:g} (rdp, the DDG's Proposition 14); with one dropout every "
            f"round {short:.3f}. Rounding error of the sum at most {ddg.error_bound(cond, shares):.3g} (L2), a "
            f"coordinate wraps around with probability at most {ddg.wrap_probability(cond, shares):.2g}"
        )

    def describe(self) -> str:
        return (
            f"distributed DP (discrete Gaussian shares added by each client before secure aggregation): update "
            f"clipping c={self.clip_norm}, "
            + (f"epsilon {self.epsilon} " if self.epsilon is not None else f"noise multiplier {self.noise_multiplier} ")
            + f"at delta {self.delta} over the run, {self.bits} bits, Poisson client sampling; the server adds no "
            "noise and accounts with the clients that survive each round"
            + (f". {NOT_PRIVATE}" if self.reproducible_noise else "")
        )
