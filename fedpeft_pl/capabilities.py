"""What a run's parts declare they can do and what they release, and the one check of their combination.

Each part says it of itself, as class attributes or properties, instead of other modules keeping
lists of classes:

- a PEFT method: ``per_client_views`` (each client exchanges its own view of the state:
  heterogeneous LoRA ranks, FLoRA) and ``stacked_forwards`` (its stacked form on the vectorised
  engine);
- a strategy: ``needs_individual_updates`` (its server update needs each client's own update,
  not only their sample-weighted sum: a robust aggregator, SCAFFOLD, FedDyn) and
  ``sends_client_extras`` (its clients send tensors beside their update) and ``synchronous_only``
  (why its updates need one cohort that started from one global state, or None);
- a privacy mechanism (:class:`PrivacyMechanism`): its guarantee covers the clients' data, so
  the run releases no un-noised per-client statistics (training loss, label histograms, a
  client's accuracy on its own test split) unless every mechanism declares, with
  ``release_client_statistics: true``, that it may. A part that does not derive from
  :class:`PrivacyMechanism` makes no guarantee and withholds nothing.

:func:`check_run` checks a run's combination before anything is built or written and refuses,
in one line, what cannot hold. Nothing here knows Lightning or a concrete class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

from fedpeft_pl.errors import ConfigError

__all__ = ["PrivacyMechanism", "RunParts", "check_run", "releases_client_statistics"]


class PrivacyMechanism:
    """A part whose guarantee covers the clients' data (local DP, central DP).

    Attributes:
        release_client_statistics: whether the run may still collect un-noised per-client
            statistics; False unless the mechanism is told otherwise, and then not covered by
            its guarantee.
        reports_from_clients: whether each client reports figures of its own mechanism beside
            its update (local DP's spent epsilon), which a masked sum would hide.
    """

    release_client_statistics: bool = False
    reports_from_clients: bool = False


def releases_client_statistics(parts: Iterable[Any]) -> bool:
    """Whether a run of ``parts`` may collect un-noised per-client statistics: yes unless a privacy
    mechanism among them has not declared that it may."""
    return all(part.release_client_statistics for part in parts if isinstance(part, PrivacyMechanism))


@dataclass(frozen=True)
class RunParts:
    """The parts of a run whose combination :func:`check_run` checks.

    Args:
        peft: the PEFT method (None where the module has none).
        strategy: the server's strategy.
        upload: the upload codec (None for none).
        privacy: the run's privacy mechanisms on the clients (local DP).
        secure_aggregation: whether the server sees only the masked sum (SecAgg+).
        clock: the virtual clock (None for none).
        schedule: when the server updates (None: every round waits for all its clients).
        live: whether the clients train elsewhere in real time (a deployment), where no clock is needed.
        attack: the clients that lie, in a simulation (None for none).
    """

    peft: Any = None
    strategy: Any = None
    upload: Any = None
    privacy: tuple[Any, ...] = ()
    secure_aggregation: bool = False
    clock: Any = None
    schedule: Any = None
    live: bool = False
    attack: Any = None


def _name(part: Any) -> str:
    return type(part).__name__


def _views_with_local_dp(parts: RunParts) -> Optional[str]:
    if getattr(parts.peft, "per_client_views", False) and parts.privacy:
        # DP noise on the zero-padded ranks would make a client's LoRA other than rank r_k
        return (
            f"trainer.privacy (local DP) cannot run with {parts.peft!r} (heterogeneous ranks or stacking); remove one"
        )
    return None


def _secure_strategy(parts: RunParts) -> Optional[str]:
    if not parts.secure_aggregation or parts.strategy is None:
        return None
    name = _name(parts.strategy)
    aggregator = getattr(parts.strategy, "aggregator", None)
    if getattr(aggregator, "needs_individual_updates", False):
        return (
            f"secure aggregation cannot run {name}: it needs every client's individual update, and the server sees "
            "only their sum"
        )
    if parts.strategy.needs_individual_updates:
        return (
            f"secure aggregation cannot run {name}: the server sees only the sample-weighted sum of the updates, "
            "and its server update needs each client's own (the strategies of the weighted mean compose: FedAvg, "
            "FedProx, FedAdagrad, FedAdam, FedYogi, DPFedAvg)"
        )
    if parts.strategy.sends_client_extras:
        return (
            f"secure aggregation cannot run {name}: its clients send tensors beside their update, and the server "
            "sees only the sample-weighted sum of the updates (FedAvg, FedProx, FedAdagrad, FedAdam, FedYogi, "
            "DPFedAvg)"
        )
    return None


def _secure_upload(parts: RunParts) -> Optional[str]:
    upload = parts.upload
    if parts.secure_aggregation and upload is not None and not getattr(upload, "identity", False):
        return (
            f"secure aggregation cannot use trainer.compress_upload ({_name(upload)}): SecAgg+ uploads its own "
            "masked fixed-point vector (int64 per element in Flower), which per-client codec scales cannot be summed "
            "under; remove it"
        )
    return None


def _secure_client_reports(parts: RunParts) -> Optional[str]:
    if not parts.secure_aggregation:
        return None
    if any(getattr(p, "reports_from_clients", False) for p in parts.privacy):
        return (
            "secure aggregation cannot run with local DP (trainer.privacy) yet: each client reports the epsilon it "
            "spent beside an update the masked sum hides; remove one of them, or use DPFedAvg for central DP"
        )
    if getattr(parts.peft, "per_client_views", False):
        return (
            f"secure aggregation cannot run with {parts.peft!r}: each client exchanges its own view of the state "
            "(heterogeneous ranks, FLoRA), which a sum of equal-shaped masked vectors cannot carry; remove one"
        )
    return None


def _schedule(parts: RunParts) -> Optional[str]:
    schedule = parts.schedule
    if schedule is None:
        return None
    name = _name(schedule)
    asynchronous = getattr(schedule, "asynchronous", False)
    if asynchronous and parts.secure_aggregation:
        return (
            f"secure aggregation cannot run {name}: SecAgg+ masks cancel only over a cohort fixed when the round "
            "starts, and a buffer's clients are decided by their arrival; use synchronous rounds"
        )
    if parts.clock is None and not parts.live:
        return (
            f"trainer.schedule {name} orders client tasks on the virtual clock: set trainer.clock too "
            "(configs/quickstart/clock.yaml has one)"
        )
    if not asynchronous:
        return None
    reason = getattr(parts.strategy, "synchronous_only", None)
    if reason:
        return f"{name} cannot run {_name(parts.strategy)}: {reason}; use synchronous rounds or another strategy"
    if getattr(parts.peft, "per_client_views", False):
        return (
            f"{name} cannot run {parts.peft!r}: its clients' views are aggregated over one round's cohort "
            "(heterogeneous ranks, FLoRA's stacking), which a buffer of replies from several versions is not; "
            "use synchronous rounds or another method"
        )
    return None


def _attack(parts: RunParts) -> Optional[str]:
    attack = parts.attack
    if attack is None:
        return None
    name = _name(attack)
    if parts.live:
        return (
            f"trainer.attack {name} runs in a simulation only: on a deployment the clients train on the SuperNodes; "
            "make a SuperNode an attacker with its node config's attack (a non-omniscient one) and remove "
            "trainer.attack"
        )
    if not getattr(attack, "omniscient", False):
        return None
    if parts.secure_aggregation:
        return (
            f"trainer.attack {name} is omniscient (it crafts its update from the honest ones), but under secure "
            "aggregation nobody sees them; use a non-omniscient attack"
        )
    return None


def _distributed_dp(parts: RunParts) -> Optional[str]:
    if type(parts.strategy).__name__ != "DistributedDP":
        return None
    if parts.privacy:
        return (
            "DistributedDP cannot run with local DP (trainer.privacy): each is accounted alone, and their noise "
            "would be spent twice; use one of them"
        )
    upload = parts.upload
    if upload is not None and not getattr(upload, "identity", False):
        return (
            f"DistributedDP cannot use trainer.compress_upload ({_name(upload)}): its clients upload their noised "
            "integer vectors mod 2**bits, which a codec would no longer sum exactly"
        )
    if parts.live and not parts.secure_aggregation:
        return (
            "DistributedDP needs secure aggregation on a deployment (fedpeft flower-app --secure-aggregation): "
            "without it the server would receive each client's update before any noise"
        )
    if parts.attack is not None:
        return (
            f"DistributedDP cannot run trainer.attack {_name(parts.attack)}: its guarantee assumes every client "
            "adds its noise share, which a malicious client need not"
        )
    return None


RULES = (
    _distributed_dp,
    _schedule,
    _attack,
    _views_with_local_dp,
    _secure_client_reports,
    _secure_strategy,
    _secure_upload,
)
"""Each rule: the one-line reason a run's parts cannot run together, or None."""


def check_run(parts: RunParts) -> None:
    """Refuse, with the first rule's one line, a combination of parts that cannot hold."""
    for rule in RULES:
        reason = rule(parts)
        if reason is not None:
            raise ConfigError(reason)
