"""The federation in plain Python: who takes part in a round, what they receive and what they return.

Nothing here knows Lightning. The loop (:mod:`fedpeft_pl.loop`) builds a :class:`Round`, a
:class:`ClientRunner` trains its clients and returns one :class:`ClientResult` per client, and
the server (:mod:`fedpeft_pl.aggregation`), strategies, privacy and the progress bar receive
these objects through their hooks. How clients run (one by one in this process, all at once
through one batched forward, or on Flower SuperNodes) is the runner's business alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Protocol, Union, runtime_checkable

import numpy as np
import torch

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.seeds import CLIENT_SAMPLING, derive_seed

State = dict[str, torch.Tensor]


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The name of the first tensor holding a NaN or an infinity, or None if all are finite.

    One fused norm over all floating tensors first (a NaN or infinity makes its tensor's norm
    non-finite); only where a norm is not finite, which a huge but finite tensor can also cause,
    are that tensor's elements checked one by one, so the answer is exact.
    """
    names = [n for n, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not names:
        return None
    norms = torch._foreach_norm([tensors[n].detach() for n in names])
    if bool(torch.isfinite(torch.stack([norm.float() for norm in norms])).all()):
        return None
    return next(
        (n for n, norm in zip(names, norms) if not torch.isfinite(norm) and not torch.isfinite(tensors[n]).all()), None
    )


Sampling = Literal["uniform", "poisson"]


@dataclass(frozen=True)
class Federation:
    """The shape of a federated run.

    Args:
        num_clients: N, the clients that hold data.
        clients_per_round: m, sampled each round (the expected number with Poisson sampling).
        num_rounds: communication rounds.
        local_epochs: passes over its own data that a sampled client makes per round.
        sampling: ``uniform`` (exactly m, without replacement) or ``poisson`` (each client with
            probability m/N, as DP-FedAvg's accounting assumes).
        seed: the run's seed; client sampling, availability and local training derive from it.
        sampling_seed: a secret seed for client sampling instead of ``seed`` (central DP's
            amplification by sampling holds only if nobody can predict who is sampled); set by the
            loop when the strategy asks for it.
    """

    num_clients: int
    clients_per_round: int
    num_rounds: int
    local_epochs: int = 1
    sampling: Sampling = "uniform"
    seed: int = 0
    sampling_seed: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("num_clients", "clients_per_round", "num_rounds", "local_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.sampling not in ("uniform", "poisson"):
            raise ConfigError(f"client_sampling must be 'uniform' or 'poisson', got {self.sampling!r}")
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"trainer.clients_per_round ({self.clients_per_round}) exceeds data.num_clients "
                f"({self.num_clients}); lower clients_per_round or add clients"
            )

    def sample(self, server_round: int) -> list[int]:
        """The clients of ``server_round``: a function of the (sampling) seed and the round alone."""
        seed = self.seed if self.sampling_seed is None else self.sampling_seed
        return sample_clients(seed, server_round, self.num_clients, self.clients_per_round, self.sampling)


def sample_clients(
    seed: int, server_round: int, num_clients: int, clients_per_round: int, sampling: str = "uniform"
) -> list[int]:
    """The clients of round ``server_round``, a function of the seed alone.

    ``uniform`` draws exactly ``clients_per_round`` without replacement; ``poisson`` includes each
    client independently with probability ``clients_per_round / num_clients`` (as central DP's
    accounting assumes), so the count varies around ``clients_per_round``.
    """
    rng = np.random.default_rng(derive_seed(seed, CLIENT_SAMPLING, server_round))
    if sampling == "poisson":
        return [int(c) for c in np.flatnonzero(rng.random(num_clients) < clients_per_round / num_clients)]
    return sorted(int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False))


@dataclass(frozen=True)
class Plan:
    """What one sampled client does this round: drop out, or run ``batches`` local batches.

    ``planned`` is what it would run without availability (every local epoch's batches); 0 where unknown.
    """

    dropped: bool
    batches: int
    straggler: bool
    planned: int = 0

    @property
    def work(self) -> float:
        """The share of its planned local work the client does: 1, less for a straggler, 0 if it drops out."""
        if self.dropped:
            return 0.0
        return min(1.0, self.batches / self.planned) if self.planned else 1.0


@dataclass(frozen=True)
class RoundMessage:
    """What the server sends every sampled client of a round.

    ``payload`` is the encoded global state, ``config`` the strategy's round config, and
    ``extras`` any further tensors a strategy sends (SCAFFOLD's server control variate); the
    byte counter counts ``payload`` and ``extras``. ``version`` is the global version the
    payload holds: the number of server updates before it was sent.
    """

    payload: State
    config: Mapping[str, Any] = field(default_factory=dict)
    extras: State = field(default_factory=dict)
    version: int = 0


@dataclass(frozen=True)
class Round:
    """One communication round as every component sees it.

    Args:
        number: counts from 1.
        clients: the sampled clients, in sampling order.
        plans: each sampled client's :class:`Plan` (dropout, straggler cap).
        share: the sampled clients this process trains (all of them, or a share under DDP).
        message: what the server sends; set once the server has configured the round.
    """

    number: int
    clients: tuple[int, ...]
    plans: Mapping[int, Plan]
    share: tuple[int, ...]
    message: Optional[RoundMessage] = None

    @property
    def batches(self) -> int:
        """Local batches planned this round over all sampled clients (what a progress bar counts)."""
        return sum(plan.batches for plan in self.plans.values())

    @property
    def stragglers(self) -> int:
        """How many of the round's clients straggle (train fewer steps)."""
        return sum(plan.straggler for plan in self.plans.values())


@dataclass
class ClientResult:
    """What came back from one sampled client.

    Exactly one of three outcomes: ``payload`` holds its encoded update (it trained), ``error``
    says why it failed, or ``dropped`` says why it took no part. ``received`` tells whether the
    round's message reached it (a client that failed did; one that dropped out or whose privacy
    budget is spent did not). ``metrics`` are the client's own figures (``train_loss``,
    ``steps``), which the server averages weighted by ``num_samples``; ``extras`` are tensors
    a strategy sends besides the update (SCAFFOLD's control-variate change).
    ``aggregate_of`` is set when the result is the sample-weighted mean of several clients'
    updates (secure aggregation): those clients, ``num_samples`` their total and ``payload``
    the mean; no individual update reaches the server then. ``version`` is the global version
    the client started from (that of the message it received); None where it received none or
    the runner did not say, which means the newest.
    """

    client: int
    num_samples: int = 0
    payload: Optional[State] = None
    extras: State = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: Optional[BaseException] = None
    dropped: Optional[str] = None
    received: bool = True
    aggregate_of: tuple[int, ...] = ()
    version: Optional[int] = None

    @property
    def ok(self) -> bool:
        """Whether the client trained and sent an update (neither dropped nor failed)."""
        return self.error is None and self.dropped is None


@dataclass
class ClientEvaluation:
    """One client's evaluation on its own held-out test split: ``acc`` and ``loss`` over ``num_samples``."""

    client: int
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def client_accuracy_summary(evaluations: Iterable[ClientEvaluation]) -> dict[str, float]:
    """Client accuracy across clients: sample-weighted and plain mean, worst decile (10th percentile), spread."""
    scored = [e for e in evaluations if e.num_samples > 0 and "acc" in e.metrics]
    if not scored:
        return {}
    acc = np.array([e.metrics["acc"] for e in scored])
    weights = np.array([e.num_samples for e in scored], dtype=float)
    summary = {
        "clients/acc_mean": float(np.average(acc, weights=weights)),
        "clients/acc_mean_unweighted": float(acc.mean()),
        "clients/acc_p10": float(np.percentile(acc, 10)),
        "clients/acc_std": float(acc.std()),
    }
    if all("loss" in e.metrics for e in scored):
        summary["clients/loss_mean"] = float(np.average([e.metrics["loss"] for e in scored], weights=weights))
    return summary


@runtime_checkable
class ClientRunner(Protocol):
    """How the sampled clients of a round train: one by one, all at once, or remotely.

    ``run`` yields one :class:`ClientResult` per client of ``round.share``, in that order. A
    runner may yield as each client finishes or all at the end; an in-process runner puts each
    client's trained state in the module before it yields its result, so a callback's
    ``on_client_end`` sees that client's state there (:class:`~fedpeft_pl.runners.base.ClientExecutor`).
    """

    def run(self, round: Round) -> Iterable[ClientResult]:
        """Train the clients of ``round``; one result per client, in the round's order."""
        ...

    def evaluate(self, round: Round, clients: list[int]) -> Iterable[ClientEvaluation]:
        """Evaluate the current global model (with each client's own local part, if personalised)
        on each of ``clients``' held-out test splits."""
        ...


@runtime_checkable
class LiveRunner(ClientRunner, Protocol):
    """A runner whose clients train elsewhere, in real time, one task at a time (a Flower deployment): what an
    asynchronous schedule (FedBuff, FedAsync) drives without a virtual clock.

    ``dispatch`` sends ``client`` its task of ``round`` (``round.message``, from one global version) and
    returns the task's id, or the client's result where it was sent nothing (dropped out, not connected).
    ``collect`` returns the replies that have arrived for any of ``tasks``, as ``(task id, result)`` in their
    arrival order, each once; replies to tasks it was not given are left out.
    """

    reply_timeout: float

    def dispatch(self, round: Round, client: int) -> Union[str, ClientResult]: ...

    def collect(self, tasks: Iterable[str]) -> list[tuple[str, ClientResult]]: ...


@dataclass
class ClientContext:
    """One client's view of one round while it trains, handed to the strategy's client hooks.

    Args:
        client: the client's id.
        server_round: the round, from 1.
        received: the global state it received (decoded).
        config: the strategy's round config.
        extras: tensors the server sent besides the state.
        state: this client's own tensors, kept across the rounds it takes part in (SCAFFOLD's
            control variate, FedDyn's gradient); a hook may replace entries.
        steps: optimizer steps taken so far (set by the runner).
        lr: the learning rate of the client's optimizer (its first parameter group).
        version: the global version the client started from (server updates before its message).
    """

    client: int
    server_round: int
    received: State
    config: Mapping[str, Any] = field(default_factory=dict)
    extras: State = field(default_factory=dict)
    state: State = field(default_factory=dict)
    steps: int = 0
    lr: float = 0.0
    version: int = 0


class ClientStore:
    """Per-client tensors that persist across rounds, where the clients run in this process.

    Keys are client ids; values are a client's named tensors. The loop checkpoints the store,
    merges it across processes under DDP, and a Flower SuperNode keeps the same tensors in its
    node context instead.
    """

    def __init__(self) -> None:
        self._states: dict[int, State] = {}

    def get(self, client: int) -> State:
        return dict(self._states.get(client, {}))

    def put(self, client: int, state: State) -> None:
        if state:
            self._states[client] = {k: v.detach() for k, v in state.items()}
        else:
            self._states.pop(client, None)

    def of(self, clients: Iterable[int]) -> dict[int, State]:
        """The stored state of ``clients`` on the CPU, to move between processes."""
        return {c: {k: v.cpu() for k, v in self._states[c].items()} for c in clients if c in self._states}

    def update(self, states: Mapping[int, State]) -> None:
        for client, state in states.items():
            self._states[client] = dict(state)

    def __len__(self) -> int:
        return len(self._states)

    def state_dict(self) -> dict[str, State]:
        return {str(c): {k: v.cpu() for k, v in s.items()} for c, s in self._states.items()}

    def load_state_dict(self, state: Mapping[str, State]) -> None:
        self._states = {int(c): dict(s) for c, s in state.items()}


def weighted_metrics(results: Iterable[ClientResult]) -> dict[str, float]:
    """Each metric's mean over the clients that report it, weighted by their sample counts."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for result in results:
        for name, value in result.metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value) * result.num_samples
            weights[name] = weights.get(name, 0.0) + result.num_samples
    return {name: sums[name] / weights[name] for name in sums if weights[name] > 0}
