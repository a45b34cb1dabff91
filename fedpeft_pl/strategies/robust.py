"""Defences against clients that lie: robust aggregators on the clients' updates.

Each rule is an :class:`~fedpeft_pl.strategies.Aggregator`, so it composes with any server
optimizer (FedAdam on the robust aggregate) and any codec, and the run's check refuses it under
secure aggregation in one line (a robust rule needs each client's own update)::

    trainer:
      aggregation:
        class_path: fedpeft_pl.strategies.FedAdam
        init_args:
          lr: 0.01
          aggregator: {class_path: fedpeft_pl.strategies.Krum, init_args: {f: 1}}

The rules work on the updates ``delta_k = w_k - global``, every tensor of an update flattened
into one vector for norms and distances, in float64; each returns ``global + aggregate delta``
cast back to each tensor's dtype. :meth:`~fedpeft_pl.strategies.Aggregator.round_metrics` says
what the last aggregation decided (``robust/selected``, ``robust/rejected``, ``robust/clipped``).

Written here in torch, not taken from a library, because none fits as it is:

- byzfl (EPFL, 0.0.x) has Krum, Multi-Krum, a geometric median and centered clipping, but its
  Krum scores ``n - f - 1`` neighbours (Blanchard et al. use ``n - f - 2``), its Multi-Krum always
  keeps ``n - f``, its geometric median runs a fixed 3 Weiszfeld steps from zero, its centered
  clipping keeps its centre in an attribute with no state dict (and refuses any given centre), and
  it has no Bulyan and no norm bounding; it also pulls in torchvision, matplotlib, scipy and
  seaborn for the server.
- Flower's ``aggregate_krum`` and ``aggregate_bulyan`` are exact (the tests compare with them), but
  they work on NumPy lists, and strategies import no Flower (a plain fit runs without it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional, Union

import torch

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import Federation, State
from fedpeft_pl.noise import NoiseSource
from fedpeft_pl.seeds import ROBUST_NOISE
from fedpeft_pl.strategies.aggregators import Aggregator, WeightedMean
from fedpeft_pl.strategies.updates import ClientUpdate, apply_delta, flat_deltas

__all__ = [
    "Bulyan",
    "CenteredClipping",
    "GeometricMedian",
    "Krum",
    "MultiKrum",
    "NormBound",
    "SampleCounts",
]

log = logging.getLogger(__name__)

Byzantine = Union[int, float]
"""The number of Byzantine clients: an int, or a fraction of the round's updates (rounded down)."""


def _check_byzantine(f: Byzantine, owner: str) -> None:
    if isinstance(f, bool) or not isinstance(f, (int, float)):
        raise ConfigError(f"{owner} f must be an int or a fraction in [0, 0.5), got {f!r}")
    if isinstance(f, int) and f < 0:
        raise ConfigError(f"{owner} f must be >= 0, got {f}")
    if isinstance(f, float) and not 0 <= f < 0.5:
        raise ConfigError(f"{owner} f as a fraction of the round's updates must be in [0, 0.5), got {f}")


def _byzantine(f: Byzantine, count: int) -> int:
    return f if isinstance(f, int) else math.floor(f * count)


def _krum_scores(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each row: the sum of its squared distances to its ``n - f - 2`` nearest other rows."""
    count = len(vectors)
    distances = torch.cdist(vectors, vectors).pow(2)
    distances.fill_diagonal_(math.inf)
    closest = max(1, count - f - 2)
    return distances.sort(dim=1).values[:, :closest].sum(dim=1)


def _weights(updates: list[ClientUpdate]) -> torch.Tensor:
    counts = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
    if counts.sum() <= 0:
        raise ValueError("cannot average updates that trained on no samples")
    return counts / counts.sum()


class _Robust(Aggregator):
    """What the robust rules share: the figures of their last aggregation."""

    def __init__(self) -> None:
        self._decided: dict[str, float] = {}

    def round_metrics(self) -> dict[str, float]:
        return dict(self._decided)

    def _select(self, updates: list[ClientUpdate], kept: list[int]) -> None:
        """A selecting rule's last choice: each kept update weighs alike, the others are rejected."""
        self._share(updates, [1.0 if i in kept else 0.0 for i in range(len(updates))])
        self._rejected = {u.client for i, u in enumerate(updates) if i not in kept}

    def _decide(self, updates: list[ClientUpdate], kept: list[int], what: str, **figures: float) -> None:
        self._decided = {f"robust/{k}": float(v) for k, v in figures.items()}
        log.debug(f"{type(self).__name__} {what} clients {[updates[i].client for i in kept]}")


class Krum(_Robust):
    """Krum (Blanchard et al. 2017): the update closest to its ``n - f - 2`` nearest neighbours.

    Each update's score is the sum of its squared distances to its ``n - f - 2`` nearest other
    updates; Krum takes the update of the lowest score, Multi-Krum (``m > 1``) the unweighted mean of
    the ``m`` lowest (sample counts are the clients' own word). A round needs ``n > 2f + 2`` updates.

    Args:
        f: the Byzantine clients tolerated, an int or a fraction in [0, 0.5) of the round's updates.
        m: how many updates to keep and average (1: Krum); None keeps ``n - f`` (Multi-Krum's usual choice).

    Example::

        FedAdam(lr=0.01, aggregator=Krum(f=1))
    """

    def __init__(self, f: Byzantine = 1, m: Optional[int] = 1) -> None:
        super().__init__()
        _check_byzantine(f, type(self).__name__)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"{type(self).__name__} m must be an int >= 1 or null (n - f), got {m!r}")
        self.f = f
        self.m = m

    def _check_count(self, count: int, f: int) -> None:
        if count <= 2 * f + 2:
            raise ConfigError(
                f"{type(self).__name__} with f={f} needs more than 2f + 2 = {2 * f + 2} updates a round, got {count}; "
                "sample more clients per round or lower f"
            )
        keep = self.m if self.m is not None else count - f
        if keep > count - f:
            raise ConfigError(
                f"{type(self).__name__} keeps m={keep} of {count} updates, more than n - f = {count - f}; lower m"
            )

    def setup(self, federation: Federation) -> None:
        if federation.sampling == "uniform":
            self._check_count(federation.clients_per_round, _byzantine(self.f, federation.clients_per_round))

    def select(self, vectors: torch.Tensor) -> list[int]:
        """The indices of the kept rows, best score first."""
        f = _byzantine(self.f, len(vectors))
        self._check_count(len(vectors), f)
        keep = self.m if self.m is not None else len(vectors) - f
        order = torch.sort(_krum_scores(vectors, f), stable=True).indices
        return order[:keep].tolist()

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        deltas = flat_deltas(updates, global_state)
        kept = self.select(deltas)
        self._decide(updates, kept, "selected", selected=len(kept), rejected=len(updates) - len(kept))
        self._select(updates, kept)
        return apply_delta(global_state, deltas[kept].mean(dim=0))


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017): the unweighted mean of the ``m`` updates of the lowest Krum score.

    Args:
        f: the Byzantine clients tolerated, an int or a fraction in [0, 0.5) of the round's updates.
        m: how many updates to keep; None (the default) keeps ``n - f``.
    """

    def __init__(self, f: Byzantine = 1, m: Optional[int] = None) -> None:
        super().__init__(f, m)


class Bulyan(_Robust):
    """Bulyan (El Mhamdi et al. 2018): Krum picks ``n - 2f`` updates one at a time, then a coordinate-wise trimmed mean.

    Krum (on the updates left, with the same ``f``) picks ``theta = n - 2f`` updates, one at a time;
    each coordinate of the result is the mean of the ``theta - 2f`` picked values closest to their
    median (of an even count, the mean of the middle two). A round needs ``n >= 4f + 3`` updates.

    Args:
        f: the Byzantine clients tolerated, an int or a fraction in [0, 0.25) of the round's updates.
    """

    def __init__(self, f: Byzantine = 1) -> None:
        super().__init__()
        _check_byzantine(f, "Bulyan")
        if isinstance(f, float) and f >= 0.25:
            raise ConfigError(f"Bulyan f as a fraction of the round's updates must be in [0, 0.25), got {f}")
        self.f = f

    @staticmethod
    def _check_count(count: int, f: int) -> None:
        if count < 4 * f + 3:
            raise ConfigError(
                f"Bulyan with f={f} needs at least 4f + 3 = {4 * f + 3} updates a round, got {count}; "
                "sample more clients per round or lower f"
            )

    def setup(self, federation: Federation) -> None:
        if federation.sampling == "uniform":
            self._check_count(federation.clients_per_round, _byzantine(self.f, federation.clients_per_round))

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        deltas = flat_deltas(updates, global_state)
        f = _byzantine(self.f, len(updates))
        self._check_count(len(updates), f)
        theta = len(updates) - 2 * f
        left = list(range(len(updates)))
        picked: list[int] = []
        for _ in range(theta):
            best = left[int(torch.argmin(_krum_scores(deltas[left], f)))]
            picked.append(best)
            left.remove(best)
        chosen = deltas[picked]
        median = (
            chosen.median(dim=0).values
            if theta % 2
            else chosen.sort(dim=0).values[theta // 2 - 1 : theta // 2 + 1].mean(0)
        )
        beta = theta - 2 * f
        nearest = (chosen - median).abs().sort(dim=0, stable=True).indices[:beta]
        self._decide(updates, sorted(picked), "selected", selected=theta, rejected=len(updates) - theta)
        self._select(updates, picked)
        return apply_delta(global_state, chosen.gather(0, nearest).mean(dim=0))


class GeometricMedian(_Robust):
    """The geometric median of the updates by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022).

    Minimises ``sum_k a_k * max(nu, ||delta_k - z||)`` over ``z``, with ``a_k`` the sample-count
    weights (wrap the rule in :class:`SampleCounts` to cap or equalise them). It starts from the
    weighted mean and repeats ``z = sum_k b_k delta_k / sum_k b_k``, ``b_k = a_k / max(nu,
    ||delta_k - z||)``, until the objective changes by less than ``tol`` of itself or after
    ``max_iter`` steps. Logs the steps taken (``robust/iterations``).

    Args:
        max_iter: the most Weiszfeld steps, >= 1.
        tol: the relative change of the objective at which it stops, >= 0.
        nu: the smoothing, > 0: distances below it count as ``nu`` (no division by zero).
    """

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, nu: float = 1e-6) -> None:
        super().__init__()
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ConfigError(f"GeometricMedian max_iter must be an int >= 1, got {max_iter!r}")
        if not tol >= 0 or not nu > 0:
            raise ConfigError(f"GeometricMedian needs tol >= 0 and nu > 0, got tol={tol}, nu={nu}")
        self.max_iter = max_iter
        self.tol = tol
        self.nu = nu

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        deltas = flat_deltas(updates, global_state)
        alpha = _weights(updates).to(deltas.device)

        def objective(z: torch.Tensor) -> float:
            return float((alpha * (deltas - z).norm(dim=1).clamp(min=self.nu)).sum())

        z = alpha @ deltas
        value, steps = objective(z), 0
        while steps < self.max_iter:
            beta = alpha / (deltas - z).norm(dim=1).clamp(min=self.nu)
            z = beta @ deltas / beta.sum()
            previous, value = value, objective(z)
            steps += 1
            if abs(previous - value) <= self.tol * value:
                break
        self._decide(updates, list(range(len(updates))), "weighed", iterations=steps)
        self._share(updates, (alpha / (deltas - z).norm(dim=1).clamp(min=self.nu)).tolist())
        return apply_delta(global_state, z)


class CenteredClipping(_Robust):
    """Centered clipping (Karimireddy et al. 2021): clip each update around the last aggregate, then average.

    With the centre ``v`` (the previous server update's aggregate delta; zero at first), repeats
    ``iterations`` times ``v = v + mean_k (delta_k - v) * min(1, tau / ||delta_k - v||)``
    (unweighted), and the result is the new centre. The centre is server state, checkpointed
    (:meth:`state_dict`), so a resumed run clips as the uninterrupted one. Logs how many updates
    the last iteration clipped (``robust/clipped``).

    Args:
        tau: the clipping radius, > 0.
        iterations: clipping steps per server update, >= 1.
    """

    def __init__(self, tau: float = 1.0, iterations: int = 1) -> None:
        super().__init__()
        if not tau > 0:
            raise ConfigError(f"CenteredClipping tau must be > 0, got {tau}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"CenteredClipping iterations must be an int >= 1, got {iterations!r}")
        self.tau = tau
        self.iterations = iterations
        self._centre: Optional[torch.Tensor] = None

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        deltas = flat_deltas(updates, global_state)
        centre = self._centre
        if centre is None or centre.shape != deltas.shape[1:]:
            centre = deltas.new_zeros(deltas.shape[1])
        centre = centre.to(deltas.device, torch.float64)
        clipped = torch.zeros(len(updates), dtype=torch.bool)
        scale = deltas.new_ones(len(updates))
        for _ in range(self.iterations):
            offsets = deltas - centre
            norms = offsets.norm(dim=1)
            clipped = (norms > self.tau).cpu()
            scale = (self.tau / norms.clamp(min=1e-300)).clamp(max=1.0)
            centre = centre + (offsets * scale[:, None]).mean(dim=0)
        self._centre = centre
        self._share(updates, scale.tolist())  # each update's weight in the last clipping step
        kept = [i for i in range(len(updates)) if not clipped[i]]
        self._decide(updates, kept, "left unclipped", clipped=int(clipped.sum()))
        return apply_delta(global_state, centre)

    def state_dict(self) -> dict[str, Any]:
        return {"centre": self._centre}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._centre = state["centre"]


class NormBound(_Robust):
    """Norm bounding (Sun et al. 2019): each update scaled down to norm at most ``bound``, the weighted mean,
    and optionally Gaussian noise ("weak differential privacy").

    ``delta_k * min(1, bound / ||delta_k||)``, averaged with the sample-count weights, plus noise of
    standard deviation ``noise_std`` on every coordinate of the aggregate. The noise is secret
    (:mod:`fedpeft_pl.noise`) unless ``reproducible_noise``; it is not accounted, and it is no DP
    guarantee (use :class:`fedpeft_pl.privacy.DPFedAvg` for one). Logs how many updates were
    clipped (``robust/clipped``).

    Args:
        bound: the largest update norm, > 0.
        noise_std: the noise's standard deviation, >= 0 (0: none).
        reproducible_noise: draw the noise from ``trainer.seed`` instead of a secret source, so runs
            repeat bit for bit (anyone with the config can then remove it).
    """

    def __init__(self, bound: float = 1.0, noise_std: float = 0.0, reproducible_noise: bool = False) -> None:
        super().__init__()
        if not bound > 0:
            raise ConfigError(f"NormBound bound must be > 0, got {bound}")
        if not noise_std >= 0:
            raise ConfigError(f"NormBound noise_std must be >= 0, got {noise_std}")
        self.bound = bound
        self.noise_std = noise_std
        self.reproducible_noise = reproducible_noise
        self._noise = NoiseSource(ROBUST_NOISE, reproducible=reproducible_noise)
        self._seed: Optional[int] = None
        self._updates = 0

    def setup(self, federation: Federation) -> None:
        self._seed = federation.seed
        if self.noise_std > 0:
            self._noise.warn_if_reproducible("NormBound")

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        deltas = flat_deltas(updates, global_state)
        norms = deltas.norm(dim=1)
        scale = (self.bound / norms.clamp(min=1e-300)).clamp(max=1.0)
        mean = (_weights(updates).to(deltas.device) * scale) @ deltas
        self._share(updates, (_weights(updates).to(deltas.device) * scale).tolist())
        clipped = [i for i in range(len(updates)) if norms[i] > self.bound]
        self._decide(updates, clipped, "clipped", clipped=len(clipped))
        self._updates += 1
        if self.noise_std > 0:
            if self.reproducible_noise and self._seed is None:
                raise ConfigError("NormBound reproducible_noise needs the run's seed: run it inside a strategy")
            release = (self._updates,)
            self._noise.open(release, seed=self._seed)
            # drawn on the CPU in float32, as DPFedAvg's, so reproducible noise is the same on every device
            mean = mean + self._noise.gaussian(mean.shape, self.noise_std, "cpu", torch.float32, release).to(mean)
            self._noise.close(release)
        return apply_delta(global_state, mean)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self._updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._updates = int(state["updates"])


class SampleCounts(Aggregator):
    """Defences against lying sample counts: the counts ``aggregator`` weighs by, capped, equal, or the server's own.

    A client that claims a huge count outweighs the others in every sample-weighted rule
    (``WeightedMean``, ``GeometricMedian``, ``NormBound``). This wrapper rewrites each update's
    count before ``aggregator`` sees it: the server-known size where ``known_sizes`` has the client,
    then at most ``max_samples``; or 1 for every client with ``uniform``. Logs how many counts it
    changed (``robust/capped``).

    Args:
        aggregator: the rule that weighs by the rewritten counts; the weighted mean by default.
        max_samples: the largest count a client may claim, >= 1 (None: no cap).
        uniform: weigh every client alike (excludes the other two).
        known_sizes: each client's number of samples as the server knows it, by client index; a
            client missing from it is refused.
    """

    def __init__(
        self,
        aggregator: Optional[Aggregator] = None,
        max_samples: Optional[int] = None,
        uniform: bool = False,
        known_sizes: Optional[dict[int, int]] = None,
    ) -> None:
        if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 1):
            raise ConfigError(f"SampleCounts max_samples must be >= 1 or null, got {max_samples!r}")
        if uniform and (max_samples is not None or known_sizes is not None):
            raise ConfigError(
                "SampleCounts uniform weighs every client alike: give it without max_samples or known_sizes"
            )
        if not uniform and max_samples is None and known_sizes is None:
            raise ConfigError("SampleCounts needs max_samples, uniform: true or known_sizes")
        if known_sizes is not None and any(v < 0 for v in known_sizes.values()):
            raise ConfigError("SampleCounts known_sizes must be >= 0 for every client")
        self.aggregator = aggregator if aggregator is not None else WeightedMean()
        self.max_samples = max_samples
        self.uniform = uniform
        self.known_sizes = None if known_sizes is None else {int(k): int(v) for k, v in known_sizes.items()}
        self._changed = 0

    def count(self, update: ClientUpdate) -> int:
        """The count ``update`` is weighed by."""
        if self.uniform:
            return 1
        count = update.num_samples
        if self.known_sizes is not None:
            if update.client not in self.known_sizes:
                raise ConfigError(f"SampleCounts known_sizes has no size for client {update.client}; add it")
            count = self.known_sizes[update.client]
        return count if self.max_samples is None else min(count, self.max_samples)

    def setup(self, federation: Federation) -> None:
        self.aggregator.setup(federation)

    def aggregate(self, updates: list[ClientUpdate], global_state: State) -> State:
        rewritten = [dataclasses.replace(u, num_samples=self.count(u)) for u in updates]
        self._changed = sum(a.num_samples != b.num_samples for a, b in zip(updates, rewritten))
        return self.aggregator.aggregate(rewritten, global_state)

    def round_metrics(self) -> dict[str, float]:
        return {**self.aggregator.round_metrics(), "robust/capped": float(self._changed)}

    def client_shares(self) -> Optional[dict[int, float]]:
        return self.aggregator.client_shares()

    def rejected_clients(self) -> Optional[set[int]]:
        return self.aggregator.rejected_clients()

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
