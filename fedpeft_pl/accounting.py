"""Privacy accounting: epsilon from a history of Gaussian mechanisms, and the noise for a target epsilon.

A history is a list of ``(noise_multiplier, sample_rate, steps)``: ``steps`` releases of a Gaussian
mechanism of noise multiplier ``z`` on a Poisson sample of rate ``q`` (``q = 1``: on everyone), the
form opacus' accountants keep. Three accountants read it:

- ``rdp``: opacus' Rényi DP accountant (Mironov 2017; the conversion of Balle et al. 2020);
- ``prv``: opacus' privacy random variable accountant (Gopi et al. 2021), numerically tight;
- ``pld``: Google's ``dp-accounting`` privacy loss distribution accountant (Meiser and Mohammadi
  2018; Doroshenko et al. 2022), numerically tight, from a second, independent code base.

:func:`cross_check` gives all three for one history: opacus' RDP agrees with dp-accounting's RDP, and
PRV with PLD, to well within 1 % on the settings of the table in docs/privacy.md (``tests/test_accounting.py``).
DP-FTRL's tree aggregation with restarts (Kairouz et al., ICML 2021) is accounted by
:func:`tree_epsilon`: ``trees`` lists how many rounds (leaves) each tree ran, each client in at most
one leaf of each tree. dp-accounting's RDP accountant takes the mechanism's own event,
``SingleEpochTreeAggregationDpEvent`` (one per tree, composed, under the "replace with the zero
record" neighbouring relation of the paper's Definition 1.1); its RDP is that of one Gaussian
mechanism of multiplier ``z / sqrt(sum of the trees' depths)``, the depth of a tree of ``t`` leaves
being ``ceil(log2(t + 1))``: a client's leaf reaches that many released nodes of noise ``z * C`` each.
dp-accounting's PLD accountant does not take the tree event; ``pld`` and ``prv`` account that
equivalent Gaussian mechanism, which the release is (the nodes are Gaussian mechanisms composed
adaptively, whose sensitivities do not depend on the data), so they are tight where RDP's conversion is not.

The libraries are imported where accounting runs, not with this module: a plain fit imports it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from typing import Any

from fedpeft_pl.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "cross_check",
    "epsilon",
    "noise_multiplier",
    "restart_trees",
    "tree_cross_check",
    "tree_depth",
    "tree_epsilon",
    "tree_noise_multiplier",
]

ACCOUNTANTS = ("rdp", "prv", "pld")

# the libraries that differential privacy runs on (opacus, dp-accounting, SciPy): the `dp` extra, not the default
# install, since torchmetrics (which Lightning imports) imports scipy.signal whenever SciPy is installed, about 0.6 s
# of CPU at the start of every command (benchmarks/README.md, "Start-up")
DP_LIBRARIES = {"opacus": "opacus", "dp_accounting": "dp-accounting", "scipy": "scipy"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module set to None in sys.modules: deliberately not importable
        return False


def require_dp_libraries(what: str) -> None:
    """Stop, in one line naming the extra, where ``what`` (a privacy mechanism) lacks the libraries it runs on."""
    missing = [name for module, name in DP_LIBRARIES.items() if not _installed(module)]
    if missing:
        names = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        raise ConfigError(
            f"{what} needs {names}, which {'is' if len(missing) == 1 else 'are'} not installed; "
            "install differential privacy's libraries with: pip install 'fedpeft-pl[dp]'"
        )


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
    import numpy as np

    with np.errstate(divide="ignore"):  # opacus' PRV takes log(1 - q), -inf at q = 1, and handles it
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


def restart_trees(num_rounds: int, restart_every: int) -> list[int]:
    """The leaves of each tree of ``num_rounds`` rounds restarted every ``restart_every`` rounds (the last may be
    short)."""
    full, rest = divmod(int(num_rounds), int(restart_every))
    return [int(restart_every)] * full + ([rest] if rest else [])


def tree_depth(trees: Sequence[int]) -> int:
    """The released nodes a client's leaves reach at most, over trees of ``trees`` leaves: ``ceil(log2(t + 1))`` per
    tree, as dp-accounting's RDP of ``SingleEpochTreeAggregationDpEvent`` counts them."""
    return sum(math.ceil(math.log2(int(t) + 1)) for t in trees if t > 0)


def tree_epsilon(kind: str, noise_multiplier: float, trees: Sequence[int], delta: float) -> float:
    """Epsilon of DP-FTRL's tree aggregation: trees of ``trees`` leaves, noise ``noise_multiplier`` times the clip
    norm on every node, each client in at most one leaf of each tree; 0 for no tree, inf without noise.

    ``rdp``: dp-accounting's RDP accountant on the trees' own events. ``pld`` (dp-accounting) and ``prv``
    (opacus): the equivalent Gaussian mechanism of multiplier ``z / sqrt(tree_depth(trees))``.
    """
    if kind not in ACCOUNTANTS:
        raise ConfigError(f"privacy accountant must be one of {list(ACCOUNTANTS)}, got {kind!r}")
    trees = [int(t) for t in trees if t > 0]
    if not trees:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if kind == "rdp":
        accountant = _tree_rdp()
        with _quiet_absl():
            accountant.compose(_tree_event(noise_multiplier, trees))
            return float(accountant.get_epsilon(delta))
    return epsilon(kind, [(noise_multiplier / math.sqrt(tree_depth(trees)), 1.0, 1)], delta)


def tree_noise_multiplier(kind: str, target_epsilon: float, delta: float, trees: Sequence[int]) -> float:
    """The smallest noise multiplier per tree node with which trees of ``trees`` leaves spend at most
    ``target_epsilon`` at ``delta`` (:func:`tree_epsilon`), by accountant ``kind``."""
    trees = [int(t) for t in trees if t > 0]
    if kind == "rdp":
        import dp_accounting

        # the equivalent Gaussian's multiplier from opacus brackets the search: RDP at other orders differs little
        guess = noise_multiplier("rdp", target_epsilon, delta, 1.0, 1) * math.sqrt(tree_depth(trees))
        with _quiet_absl():
            return float(
                dp_accounting.calibrate_dp_mechanism(
                    _tree_rdp,
                    lambda z: _tree_event(z, trees),
                    target_epsilon,
                    delta,
                    bracket_interval=dp_accounting.ExplicitBracketInterval(0.5 * guess, 2.0 * guess),
                    tol=1e-4 * guess,
                )
            )
    return noise_multiplier(kind, target_epsilon, delta, 1.0, 1) * math.sqrt(tree_depth(trees))


def tree_cross_check(noise_multiplier: float, trees: Sequence[int], delta: float) -> dict[str, float]:
    """:func:`tree_epsilon` by every accountant, and by opacus' RDP of the equivalent Gaussian (``rdp/opacus``)."""
    result = {kind: tree_epsilon(kind, noise_multiplier, trees, delta) for kind in ACCOUNTANTS}
    depth = tree_depth(trees)
    result["rdp/opacus"] = epsilon("rdp", [(noise_multiplier / math.sqrt(depth), 1.0, 1)] if depth else [], delta)
    return result


def _tree_rdp() -> Any:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    # the paper's neighbouring relation: a client's contributions replaced by the zero update (Definition 1.1)
    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)


def _tree_event(noise_multiplier: float, trees: Sequence[int]) -> Any:
    import dp_accounting

    # one event per tree, composed: a client may be in every tree (once each); one event listing all the trees
    # would assume each client in at most one tree of them all
    events = [dp_accounting.SingleEpochTreeAggregationDpEvent(float(noise_multiplier), int(t)) for t in trees]
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


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
