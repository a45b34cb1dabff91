"""Privacy accounting: epsilon from a history of Gaussian mechanisms, and the noise for a target epsilon.

A history is a list of ``(noise_multiplier, sample_rate, steps)``: ``steps`` releases of a Gaussian
mechanism of noise multiplier ``z`` on a Poisson sample of rate ``q`` (``q = 1``: on everyone), the
form opacus' accountants keep. Three accountants read it:

- ``rdp``: opacus' Rényi DP accountant (Mironov 2017; the conversion of Balle et al. 2020);
- ``prv``: opacus' privacy random variable accountant (Gopi et al. 2021), numerically tight;
- ``pld``: Google's ``dp-accounting`` privacy loss distribution accountant (Meiser and Mohammadi
  2018; Doroshenko et al. 2022), numerically tight, from a second, independent code base.

:func:`cross_check` gives all three for one history: opacus' RDP agrees with dp-accounting's RDP, and
PRV with PLD, to well within 1 % on the settings of README's table (``tests/test_accounting.py``).
The libraries are imported where accounting runs, not with this module: a plain fit imports it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fedpeft_pl.errors import ConfigError

__all__ = ["ACCOUNTANTS", "cross_check", "epsilon", "noise_multiplier"]

ACCOUNTANTS = ("rdp", "prv", "pld")

History = Sequence[tuple[float, float, int]]


def epsilon(kind: str, history: History, delta: float) -> float:
    """Epsilon spent by ``history`` at ``delta``; 0 for no release, inf for a release without noise."""
    if kind not in ACCOUNTANTS:
        raise ConfigError(f"privacy accountant must be one of {list(ACCOUNTANTS)}, got {kind!r}")
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if kind == "pld":
        accountant = _pld()
        accountant.compose(_event(history))
        return float(accountant.get_epsilon(delta))
    from opacus.accountants import create_accountant

    opacus = create_accountant(kind)
    opacus.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(opacus.get_epsilon(delta))


def noise_multiplier(kind: str, target_epsilon: float, delta: float, rate: float, steps: int) -> float:
    """The smallest noise multiplier whose ``steps`` releases at sample rate ``rate`` spend at most
    ``target_epsilon`` at ``delta``, by accountant ``kind``."""
    if kind == "pld":
        import dp_accounting

        # PLD's discretisation grows without bound as the noise vanishes: search only below RDP's answer (RDP
        # is looser, so its noise spends at most the target by PLD too) and above half of it
        guess = noise_multiplier("rdp", target_epsilon, delta, rate, steps)
        return float(
            dp_accounting.calibrate_dp_mechanism(
                _pld,
                lambda z: _event([(z, rate, steps)]),
                target_epsilon,
                delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(0.5 * guess, guess),
                tol=1e-3 * guess,
            )
        )
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate, steps=steps, accountant=kind
        )
    )


def cross_check(history: History, delta: float) -> dict[str, float]:
    """Epsilon of ``history`` by every accountant, and by dp-accounting's RDP beside opacus' (``rdp/dp-accounting``)."""
    result = {kind: epsilon(kind, history, delta) for kind in ACCOUNTANTS}
    from dp_accounting.rdp import rdp_privacy_accountant

    rdp = rdp_privacy_accountant.RdpAccountant()
    with _quiet_absl():
        rdp.compose(_event([(float(s), float(q), int(n)) for s, q, n in history if n > 0]))
        result["rdp/dp-accounting"] = float(rdp.get_epsilon(delta))
    return result


def _pld() -> Any:
    from dp_accounting.pld import pld_privacy_accountant

    return pld_privacy_accountant.PLDAccountant()


def _event(history: History) -> Any:
    import dp_accounting

    events = []
    for sigma, rate, steps in history:
        gaussian = dp_accounting.GaussianDpEvent(float(sigma))
        one = gaussian if rate >= 1 else dp_accounting.PoissonSampledDpEvent(float(rate), gaussian)
        events.append(dp_accounting.SelfComposedDpEvent(one, int(steps)))
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


class _quiet_absl:
    """dp-accounting's RDP warns through absl for each order whose series does not converge (orders it then
    leaves out, as opacus does silently): the warnings say nothing a user can act on."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("absl")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)
