"""The source of differential-privacy noise: secret by default, reproducible only on request.

DP noise that an adversary can regenerate protects nothing: whoever holds the run's seed (it sits
in the config, and a Flower app ships the config to every machine) could subtract it from a noisy
release. So by default every release draws from a ``torch.Generator`` seeded with 64 bits from
``os.urandom``, the operating system's CSPRNG; the seed is never stored, logged or checkpointed.

Why this and not opacus' ``secure_mode`` with torchcsprng: torchcsprng's last release (0.2.1,
2021) is a compiled extension for torch 1.8 and does not build against torch 2, so opacus' secure
mode has no secure generator to use here. We still call opacus' own ``_generate_noise`` with
``secure_mode=True``, which sums four Gaussian draws (arXiv 2107.10138, section 5.1) against the
floating-point attack on the noise's low bits. A generator is made per release (one client's
local training in one round, or one round of the server) so that no stream is long, and so that
parallel clients (a vectorised engine) each hold their own.

``reproducible=True`` seeds each release's generator from ``derive_seed(seed, key, *position)``
instead: runs repeat bit for bit, and the run is not private against anyone who knows the seed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Optional, Union

import torch

from fedpeft_pl.seeds import derive_seed

log = logging.getLogger(__name__)

NOT_PRIVATE = (
    "reproducible_noise is on: the DP noise follows from trainer.seed, so anyone with the config can "
    "remove it; this run is NOT private (for debugging and tests only)"
)


class NoiseSource:
    """Gaussian noise, one independent stream per release.

    Args:
        key: the stream's key in :mod:`fedpeft_pl.seeds` (used only when reproducible).
        reproducible: seed each release from the run's seed instead of ``os.urandom``.

    Example::

        noise = NoiseSource(DP_NOISE)
        noise.open((server_round, client), seed=trainer_seed)
        g = noise.gaussian((3, 4), std=1.2, device="cpu", dtype=torch.float32, release=(server_round, client))
        noise.close((server_round, client))
    """

    def __init__(self, key: int, reproducible: bool = False) -> None:
        self.key = key
        self.reproducible = reproducible
        self._generators: dict[tuple, dict[str, torch.Generator]] = {}
        self._seeds: dict[tuple, int] = {}

    def open(self, release: Sequence[int], seed: Optional[int] = None) -> None:
        """Start the stream of ``release`` (e.g. ``(round, client)``); ``seed`` is the run's, used only when
        reproducible."""
        release = tuple(release)
        if self.reproducible:
            if seed is None:
                raise ValueError("reproducible noise needs the run's seed")
            self._seeds[release] = derive_seed(seed, self.key, *release)
        else:
            self._seeds[release] = int.from_bytes(os.urandom(8), "little") >> 1
        self._generators[release] = {}

    def close(self, release: Sequence[int]) -> None:
        """Forget the stream of ``release`` (its secret seed included)."""
        self._generators.pop(tuple(release), None)
        self._seeds.pop(tuple(release), None)

    def gaussian(
        self,
        shape: Union[Sequence[int], torch.Size],
        std: float,
        device: Union[str, torch.device],
        dtype: torch.dtype,
        release: Sequence[int],
    ) -> torch.Tensor:
        """Zero-mean Gaussian noise of standard deviation ``std`` from the stream of ``release``."""
        device = torch.device(device)
        generator = self.generator(release, device)
        reference = torch.empty(tuple(shape), device=device, dtype=dtype)
        # imported here, not with the module: a plain fit imports this module but draws no noise
        from opacus.optimizers.optimizer import _generate_noise

        return _generate_noise(std, reference, generator=generator, secure_mode=True)

    def generator(self, release: Sequence[int], device: Union[str, torch.device] = "cpu") -> torch.Generator:
        """The generator of ``release``'s stream on ``device``, for draws other than Gaussian (distributed DP's
        discrete Gaussian and randomized rounding); secret unless reproducible, as :meth:`gaussian`'s."""
        release = tuple(release)
        if release not in self._seeds:
            if self.reproducible:
                raise ValueError(f"the noise stream {release} was not opened with the run's seed")
            self.open(release)
        device = torch.device(device)
        generators = self._generators[release]
        # a generator lives on one device; a release that draws on several gets one per device
        generator = generators.get(str(device))
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self._seeds[release] + len(generators))
            generators[str(device)] = generator
        return generator

    def like(self, tensor: torch.Tensor, std: float, release: Sequence[int]) -> torch.Tensor:
        """Noise shaped, typed and placed like ``tensor``."""
        return self.gaussian(tensor.shape, std, tensor.device, tensor.dtype, release)

    def warn_if_reproducible(self, owner: str) -> None:
        if self.reproducible:
            log.warning(f"{owner}: {NOT_PRIVATE}")
