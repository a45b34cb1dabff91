"""Simulated time: how long each client's task takes on its own device and network.

Plain Python, no Lightning. A :class:`VirtualClock` gives every client a profile drawn once from
seeded distributions (its compute speed in samples per second, its upload and download
bandwidths in bytes per second, its latency in seconds), and a client task takes::

    download wire bytes / down bandwidth + samples processed / speed + upload wire bytes / up bandwidth + latency

with the wire bytes the run already counts (:mod:`fedpeft_pl.comm`), so a codec or a PEFT method
changes time as it changes bytes. An optional per-round jitter multiplies a task's time by
``exp(N(0, jitter))``. A synchronous round ends when its last client arrives; the server's own
work (aggregation, evaluation) is not on the clock. Each profile and each jitter is drawn from its
own stream (:mod:`fedpeft_pl.seeds`, ``CLOCK_PROFILE`` and ``CLOCK_JITTER``), so time repeats
for a seed and does not move when other randomness does.

A distribution is one small class with :meth:`TimeDistribution.draw`; a new one is a subclass::

    class Pareto(TimeDistribution):
        def __init__(self, scale: float, shape: float) -> None:
            self.scale, self.shape = scale, shape

        def draw(self, rng, client):
            return self.scale * (1 + rng.pareto(self.shape))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from fedpeft_pl.component import ShownByArguments
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.seeds import CLOCK_JITTER, CLOCK_PROFILE, derive_seed

__all__ = [
    "ClientProfile",
    "Constant",
    "Exponential",
    "HalfNormal",
    "LogNormal",
    "PerClient",
    "TaskTime",
    "TimeDistribution",
    "VirtualClock",
]


class TimeDistribution(ShownByArguments):
    """A positive quantity per client (a speed, a bandwidth, a latency). Subclasses implement :meth:`draw`."""

    def draw(self, rng: np.random.Generator, client: int) -> float:
        """One client's value; ``rng`` is that client's own stream for this quantity."""
        raise NotImplementedError

    @property
    def median(self) -> float:
        """The distribution's median, for estimates made without drawing (``fedpeft comm``)."""
        raise NotImplementedError


def _positive(name: str, value: float) -> float:
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class Constant(TimeDistribution):
    """Every client the same ``value``."""

    def __init__(self, value: float) -> None:
        self.value = _positive("Constant value", value)

    def draw(self, rng: np.random.Generator, client: int) -> float:
        return self.value

    @property
    def median(self) -> float:
        return self.value


class LogNormal(TimeDistribution):
    """``median * exp(sigma * N(0, 1))``: heavy-tailed, as device speeds are (sigma 1: about 13x from p10 to p90)."""

    def __init__(self, median: float, sigma: float = 1.0) -> None:
        self._median = _positive("LogNormal median", median)
        if not sigma >= 0:
            raise ConfigError(f"LogNormal sigma must be >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def draw(self, rng: np.random.Generator, client: int) -> float:
        return self._median * math.exp(self.sigma * rng.standard_normal())

    @property
    def median(self) -> float:
        return self._median

    def __repr__(self) -> str:
        return f"LogNormal(median={self._median!r}, sigma={self.sigma!r})"


class Exponential(TimeDistribution):
    """Exponentially distributed with the given ``mean``."""

    def __init__(self, mean: float) -> None:
        self.mean = _positive("Exponential mean", mean)

    def draw(self, rng: np.random.Generator, client: int) -> float:
        return self.mean * rng.standard_exponential()

    @property
    def median(self) -> float:
        return self.mean * math.log(2)


class HalfNormal(TimeDistribution):
    """``|N(0, scale^2)|``, plus ``offset`` (a floor, e.g. a minimum latency)."""

    def __init__(self, scale: float, offset: float = 0.0) -> None:
        self.scale = _positive("HalfNormal scale", scale)
        if not offset >= 0:
            raise ConfigError(f"HalfNormal offset must be >= 0, got {offset!r}")
        self.offset = float(offset)

    def draw(self, rng: np.random.Generator, client: int) -> float:
        return self.offset + self.scale * abs(rng.standard_normal())

    @property
    def median(self) -> float:
        return self.offset + self.scale * 0.6744897501960817  # the half-normal's median, scale * Phi^-1(3/4)


class PerClient(TimeDistribution):
    """A table: client ``c`` gets ``values[c % len(values)]`` (a measured fleet, or a test's exact figures)."""

    def __init__(self, values: Sequence[float]) -> None:
        if not values:
            raise ConfigError("PerClient needs at least one value")
        self.values = [_positive("PerClient value", v) for v in values]

    def draw(self, rng: np.random.Generator, client: int) -> float:
        return self.values[client % len(self.values)]

    @property
    def median(self) -> float:
        return float(np.median(self.values))


@dataclass(frozen=True)
class ClientProfile:
    """One client's device and network: samples per second, bytes per second each way, seconds of latency."""

    speed: float
    upload: float
    download: float
    latency: float


@dataclass(frozen=True)
class TaskTime:
    """How long one client task took, by part, in simulated seconds (jitter applied to each part)."""

    download: float
    compute: float
    upload: float
    latency: float

    @property
    def total(self) -> float:
        """The task's seconds from dispatch to arrival: download, compute and upload."""
        return self.download + self.compute + self.upload + self.latency


_RESOURCES = ("speed", "upload", "download", "latency")


class VirtualClock(ShownByArguments):
    """Simulated time for a run's client tasks (off unless ``trainer.clock`` is set).

    Args:
        speed: samples a client processes per second of local training (forward and backward).
        upload: a client's upload bandwidth in bytes per second.
        download: a client's download bandwidth in bytes per second.
        latency: seconds a task spends besides its transfers and compute (connection set-up, queueing).
        jitter: sigma of a per-round, per-client factor ``exp(N(0, jitter))`` on a task's time; 0 for none.

    Example (a cross-device network: heavy-tailed devices, 1 MB/s up, 5 MB/s down)::

        trainer:
          clock:
            class_path: fedpeft_pl.clock.VirtualClock
            init_args:
              speed: {class_path: fedpeft_pl.clock.LogNormal, init_args: {median: 50.0, sigma: 1.0}}
              upload: {class_path: fedpeft_pl.clock.Constant, init_args: {value: 1.0e+6}}
              download: {class_path: fedpeft_pl.clock.Constant, init_args: {value: 5.0e+6}}
    """

    def __init__(
        self,
        speed: Optional[TimeDistribution] = None,
        upload: Optional[TimeDistribution] = None,
        download: Optional[TimeDistribution] = None,
        latency: Optional[TimeDistribution] = None,
        jitter: float = 0.0,
    ) -> None:
        self.speed = speed if speed is not None else Constant(100.0)
        self.upload = upload if upload is not None else Constant(1.0e6)
        self.download = download if download is not None else Constant(5.0e6)
        self.latency = latency if latency is not None else Constant(0.1)
        if not jitter >= 0 or not math.isfinite(jitter):
            raise ConfigError(f"clock jitter must be >= 0, got {jitter!r}")
        self.jitter = float(jitter)

    def profile(self, seed: int, client: int) -> ClientProfile:
        """``client``'s device and network, the same in every round: each quantity from its own stream."""
        values = {}
        for index, name in enumerate(_RESOURCES):
            rng = np.random.default_rng(derive_seed(seed, CLOCK_PROFILE, client, index))
            values[name] = getattr(self, name).draw(rng, client)
        return ClientProfile(**values)

    def task_time(
        self, seed: int, server_round: int, client: int, download_bytes: int, samples: float, upload_bytes: int
    ) -> TaskTime:
        """How long ``client``'s task of ``server_round`` takes: its transfers, its ``samples``, its latency."""
        profile = self.profile(seed, client)
        factor = 1.0
        if self.jitter:
            rng = np.random.default_rng(derive_seed(seed, CLOCK_JITTER, server_round, client))
            factor = math.exp(self.jitter * rng.standard_normal())
        return TaskTime(
            download=factor * download_bytes / profile.download,
            compute=factor * samples / profile.speed,
            upload=factor * upload_bytes / profile.upload,
            latency=factor * profile.latency,
        )

    def median_transfer_seconds(self, download_bytes: int, upload_bytes: int) -> tuple[float, float]:
        """Download and upload seconds of one client task at the median bandwidths (an estimate, no draws)."""
        return download_bytes / self.download.median, upload_bytes / self.upload.median


def format_seconds(seconds: float) -> str:
    """``5.8 ms``, ``42.0 s``, ``12.5 min``, ``3.20 h``: simulated durations on the console."""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
