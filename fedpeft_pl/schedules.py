"""When the server updates: synchronous rounds (with over-selection and a deadline), FedBuff and FedAsync.

Plain Python, no Lightning. A schedule says which client tasks a server update waits for, on the
virtual clock (:mod:`fedpeft_pl.clock`); the loop drives it and the server
(:mod:`fedpeft_pl.server`) does the rest. Choose one with ``trainer.schedule``; without one, every
round waits for all of its sampled clients, as always.

- :class:`Synchronous` rounds that end at the ``m``-th arrival of ``m * (1 + over_selection)``
  sampled clients, or at a ``deadline`` in simulated seconds, as production cross-device FL runs
  them (Bonawitz et al., MLSys 2019). Late clients' work is discarded and counted.
- :class:`FedBuff` (Nguyen et al., AISTATS 2022): ``concurrency`` clients in flight, each dispatched
  from the newest global version when a slot is free; the server updates once ``buffer_size``
  replies have arrived, each client's change weighted by a function of its staleness (the server
  updates since it was dispatched), then passed through the strategy's aggregator and server
  optimizer (server learning rate, FedAdam, FedYogi).
- :class:`FedAsync` (Xie et al., 2019): one reply at a time, mixed into the global state at a
  staleness-dependent rate.

A staleness weight is one small class; a new one is a subclass::

    class Exponential(Staleness):
        def __init__(self, rate: float = 0.5) -> None:
            self.rate = rate

        def __call__(self, staleness: int) -> float:
            return math.exp(-self.rate * staleness)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from fedpeft_pl.component import ShownByArguments
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientResult, Plan, Round, RoundMessage, State
from fedpeft_pl.seeds import ASYNC_DISPATCH, derive_seed

__all__ = [
    "Constant",
    "FedAsync",
    "FedBuff",
    "Hinge",
    "Polynomial",
    "Schedule",
    "Staleness",
    "Synchronous",
    "Task",
    "Timeline",
]


# -- staleness weights ------------------------------------------------------------------------


class Staleness(ShownByArguments):
    """A reply's weight from its staleness: the server updates between its dispatch and its arrival."""

    def __call__(self, staleness: int) -> float:
        raise NotImplementedError


class Polynomial(Staleness):
    """``(1 + staleness) ** -exponent``: FedBuff's default with exponent 0.5 (``1 / sqrt(1 + staleness)``).

    Args:
        exponent: how fast the weight falls with staleness, >= 0 (0: no discount).
    """

    def __init__(self, exponent: float = 0.5) -> None:
        if not exponent >= 0 or not math.isfinite(exponent):
            raise ConfigError(f"Polynomial staleness exponent must be >= 0, got {exponent!r}")
        self.exponent = float(exponent)

    def __call__(self, staleness: int) -> float:
        return float((1 + staleness) ** -self.exponent)


class Hinge(Staleness):
    """FedAsync's hinge: 1 up to ``cutoff`` updates stale, then ``1 / (slope * (staleness - cutoff) + 1)``.

    Args:
        slope: how fast the weight falls past the cutoff, >= 0.
        cutoff: staleness that costs nothing, >= 0.
    """

    def __init__(self, slope: float = 10.0, cutoff: int = 4) -> None:
        if not slope >= 0 or cutoff < 0:
            raise ConfigError(f"Hinge staleness needs slope >= 0 and cutoff >= 0, got {slope!r} and {cutoff!r}")
        self.slope, self.cutoff = float(slope), int(cutoff)

    def __call__(self, staleness: int) -> float:
        return 1.0 if staleness <= self.cutoff else 1.0 / (self.slope * (staleness - self.cutoff) + 1.0)


class Constant(Staleness):
    """Every reply weighs 1, however stale (FedBuff's ablation without staleness weighting)."""

    def __call__(self, staleness: int) -> float:
        return 1.0


# -- schedules ----------------------------------------------------------------------------------


class Schedule(ShownByArguments):
    """When the server updates. Subclasses: :class:`Synchronous`, :class:`FedBuff`, :class:`FedAsync`."""

    asynchronous = False

    def check(self, num_clients: int, clients_per_round: int) -> None:
        """Refuse, in one line, a schedule this federation cannot run."""

    def reweigh(self, trained: State, started: State, current: State, staleness: int) -> State:
        """What a reply that started from ``started`` counts as against the ``current`` state: as it is here."""
        return trained

    def describe(self, num_clients: int, clients_per_round: int, num_rounds: int) -> str:
        """The federation's shape under this schedule, for the console's start line."""
        return f"{clients_per_round} of {num_clients} clients a round, {num_rounds} rounds"


class Synchronous(Schedule):
    """Synchronous rounds under the clock: over-selection and a deadline.

    Each round samples ``ceil(clients_per_round * (1 + over_selection))`` clients (at most all of
    them); it ends when ``clients_per_round`` of them have arrived, or at ``deadline`` simulated
    seconds after it started, whichever comes first. Late clients were sent the round's message
    (their download is counted) and their work is discarded: they are told to stop, so their update
    is never sent (``round/clients_late``, ``comm/bytes_late``). A client that availability drops
    is sent nothing, as without a schedule; stragglers simply take less time.

    Args:
        over_selection: extra clients sampled, as a fraction of ``clients_per_round`` (0.3: 30 % more).
        deadline: simulated seconds after which a round ends with whoever has arrived; none by default.
    """

    def __init__(self, over_selection: float = 0.0, deadline: Optional[float] = None) -> None:
        if not over_selection >= 0 or not math.isfinite(over_selection):
            raise ConfigError(f"Synchronous over_selection must be >= 0, got {over_selection!r}")
        if deadline is not None and not deadline > 0:
            raise ConfigError(f"Synchronous deadline must be > 0 simulated seconds, got {deadline!r}")
        self.over_selection = float(over_selection)
        self.deadline = None if deadline is None else float(deadline)

    def describe(self, num_clients: int, clients_per_round: int, num_rounds: int) -> str:
        cohort = self.cohort(clients_per_round, num_clients)
        deadline = "" if self.deadline is None else f", a deadline of {self.deadline:g} simulated s"
        return (
            f"the first {clients_per_round} of {cohort} sampled of {num_clients} clients a round{deadline}, "
            f"{num_rounds} rounds"
        )

    def cohort(self, clients_per_round: int, num_clients: int) -> int:
        """How many clients a round samples."""
        return min(num_clients, math.ceil(clients_per_round * (1 + self.over_selection) - 1e-9))

    def on_time(self, arrivals: dict[int, float], clients_per_round: int) -> tuple[list[int], float]:
        """The clients whose replies count, in arrival order, and the round's simulated duration.

        ``arrivals`` maps each client that trained to its task's simulated seconds; ties go to the lower client.
        """
        order = sorted(arrivals, key=lambda c: (arrivals[c], c))
        kept = [c for c in order if self.deadline is None or arrivals[c] <= self.deadline][:clients_per_round]
        if len(kept) == clients_per_round and kept:
            ends = arrivals[kept[-1]]
        elif self.deadline is not None:
            ends = self.deadline if len(kept) < len(order) or not kept else arrivals[kept[-1]]
        else:
            ends = arrivals[kept[-1]] if kept else 0.0
        return kept, ends


class FedBuff(Schedule):
    """Buffered asynchronous aggregation (Nguyen et al., AISTATS 2022).

    ``concurrency`` clients train at once. A client is dispatched, with the newest global version,
    as soon as a slot is free, chosen uniformly from the idle clients that have taken no part in the
    coming server update yet (neither trained from its version nor replied into its buffer, so a
    buffer holds at most one reply per client); the server updates once ``buffer_size`` replies have
    arrived. Reply ``i``, which
    started from version ``v_i`` and arrives ``tau_i`` server updates later, counts as the global
    state plus its own change, weighted::

        x_i' = x + staleness(tau_i) * (y_i - x_{v_i})

    and the strategy aggregates the buffer's ``x_i'`` as any round's updates (the sample-weighted mean
    by default), then its server optimizer steps: ``ServerSGD(lr)`` applies the buffer's mean change
    times the server learning rate, FedAdam and FedYogi their moments. ``num_rounds`` counts server
    updates. A run on the vectorised runner trains each update's dispatched clients stacked through
    the one backbone.

    Args:
        concurrency: clients in flight (C), at most the number of clients.
        buffer_size: replies per server update (K), at most ``concurrency``.
        staleness: the weight of a stale reply; :class:`Polynomial` (``1 / sqrt(1 + tau)``) by default.
    """

    asynchronous = True

    def __init__(self, concurrency: int = 32, buffer_size: int = 8, staleness: Optional[Staleness] = None) -> None:
        if concurrency < 1 or buffer_size < 1 or buffer_size > concurrency:
            raise ConfigError(
                f"{type(self).__name__} needs 1 <= buffer_size <= concurrency, got buffer_size={buffer_size} "
                f"and concurrency={concurrency}"
            )
        self.concurrency = int(concurrency)
        self.buffer_size = int(buffer_size)
        self.staleness = staleness if staleness is not None else Polynomial(0.5)

    def check(self, num_clients: int, clients_per_round: int) -> None:
        if self.concurrency > num_clients:
            raise ConfigError(
                f"{type(self).__name__} concurrency {self.concurrency} exceeds the federation's {num_clients} "
                "clients; lower trainer.schedule's concurrency"
            )

    def describe(self, num_clients: int, clients_per_round: int, num_rounds: int) -> str:
        return (
            f"{type(self).__name__}: {self.concurrency} of {num_clients} clients in flight, a server update every "
            f"{self.buffer_size} replies, {num_rounds} server updates"
        )

    def reweigh(self, trained: State, started: State, current: State, staleness: int) -> State:
        """What a reply counts as in the buffer: the current state plus its own change, weighted."""
        weight = self.staleness(staleness)
        return _plus(current, trained, started, weight)


class FedAsync(FedBuff):
    """Asynchronous aggregation (Xie et al., 2019): every reply updates the global state on arrival.

    The reply's model is mixed into the current global state::

        x = (1 - a) * x + a * y_i,    a = mixing * staleness(tau_i)

    (with the strategy's default server optimizer; a server learning rate or FedAdam acts on that
    step). ``num_rounds`` counts server updates, one per reply.

    Args:
        concurrency: clients in flight, at most the number of clients.
        mixing: the mixing rate ``a`` of a fresh reply, in (0, 1].
        staleness: the weight of a stale reply; :class:`Polynomial` (``1 / sqrt(1 + tau)``) by default.
    """

    def __init__(self, concurrency: int = 32, mixing: float = 0.6, staleness: Optional[Staleness] = None) -> None:
        super().__init__(concurrency, 1, staleness)
        if not 0 < mixing <= 1:
            raise ConfigError(f"FedAsync mixing must be in (0, 1], got {mixing!r}")
        self.mixing = float(mixing)

    def __repr__(self) -> str:
        return f"FedAsync(concurrency={self.concurrency!r}, mixing={self.mixing!r}, staleness={self.staleness!r})"

    def describe(self, num_clients: int, clients_per_round: int, num_rounds: int) -> str:
        return (
            f"FedAsync: {self.concurrency} of {num_clients} clients in flight, a server update every reply "
            f"(mixing {self.mixing:g}), {num_rounds} server updates"
        )

    def reweigh(self, trained: State, started: State, current: State, staleness: int) -> State:
        rate = self.mixing * self.staleness(staleness)
        return _plus(current, trained, current, rate)


def _plus(base: State, end: State, start: State, weight: float) -> State:
    """``base + weight * (end - start)`` per tensor, in float64, back in ``base``'s dtype."""
    out = {}
    for name, value in base.items():
        change = end[name].to(value.device, torch.float64) - start[name].to(value.device, torch.float64)
        out[name] = (value.to(torch.float64) + weight * change).to(value.dtype)
    return out


# -- the asynchronous timeline --------------------------------------------------------------------


@dataclass
class Task:
    """One client task in flight: who, from which global version, when it started and when it arrives.

    ``update`` is the server update during which it was dispatched (its seeds' round number),
    ``sequence`` the dispatch order (arrival ties go to the earlier dispatch), ``result`` its reply
    once it has trained.
    """

    client: int
    version: int
    update: int
    sequence: int
    dispatched: float
    arrival: float
    plan: Plan
    result: Optional[ClientResult] = None

    def round(self, message: Optional[RoundMessage] = None) -> Round:
        """The task as a round of its one client: the update it was dispatched in, its plan (and ``message``)."""
        return Round(self.update, (self.client,), {self.client: self.plan}, (self.client,), message)


class Timeline:
    """A buffered asynchronous run's clients in flight, ordered by their arrival on the virtual clock.

    Which idle client takes a free slot is drawn from its own stream (``ASYNC_DISPATCH``), by the
    dispatch's sequence number, so the events repeat exactly for a seed.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sequence = 0
        self.fresh: set[int] = set()  # clients dispatched from the newest version or replied into its buffer
        self._heap: list[tuple[float, int, Task]] = []

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def tasks(self) -> list[Task]:
        """The tasks in flight, in arrival order."""
        return [task for _, _, task in sorted(self._heap, key=lambda e: (e[0], e[1]))]

    def busy(self) -> set[int]:
        """The clients with a task in flight."""
        return {task.client for _, _, task in self._heap}

    def versions(self) -> set[int]:
        """The global versions some task in flight started from."""
        return {task.version for _, _, task in self._heap}

    def candidates(self, num_clients: int, busy: Iterable[int] = ()) -> list[int]:
        """Idle clients that have taken no part in the coming server update: neither dispatched from the newest
        version nor replied into its buffer (nor in ``busy``, tasks in flight kept elsewhere)."""
        taken = self.busy() | self.fresh | set(busy)
        return [c for c in range(num_clients) if c not in taken]

    def choose(self, seed: int, candidates: Sequence[int]) -> int:
        """One of the idle ``candidates``, drawn from the dispatch stream of ``seed`` and this dispatch's number."""
        rng = np.random.default_rng(derive_seed(seed, ASYNC_DISPATCH, self.sequence))
        return int(candidates[int(rng.integers(len(candidates)))])

    def draw(self, seed: int, num_clients: int, busy: Iterable[int] = ()) -> Optional[int]:
        """The next client to dispatch from the newest version (marked as taking part), or None if none is free."""
        candidates = self.candidates(num_clients, busy)
        if not candidates:
            return None
        client = self.choose(seed, candidates)
        self.sequence += 1
        self.fresh.add(client)
        return client

    def push(self, task: Task) -> None:
        """Add ``task`` to the tasks in flight, ordered by its arrival time."""
        heapq.heappush(self._heap, (task.arrival, task.sequence, task))

    def pop(self) -> Task:
        """The next arrival; the clock moves to it."""
        _, _, task = heapq.heappop(self._heap)
        self.now = max(self.now, task.arrival)
        self.fresh.add(task.client)  # its reply is in this update's buffer: not sent out again before it
        return task

    def new_version(self) -> None:
        """A server update happened: the global version the next tasks start from advances."""
        self.fresh = set()

    # a checkpoint holds the tasks in flight with their replies, so a resumed run continues exactly
    def state_dict(self) -> dict[str, Any]:
        """The tasks in flight and the dispatch count, for checkpoints."""
        return {
            "now": self.now,
            "sequence": self.sequence,
            "fresh": sorted(self.fresh),
            "tasks": [_task_state(task) for task in self.tasks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the tasks in flight and the dispatch count :meth:`state_dict` gave."""
        self.now, self.sequence = float(state["now"]), int(state["sequence"])
        self.fresh = set(state["fresh"])
        self._heap = []
        for entry in state["tasks"]:
            self.push(_task_from_state(entry))


def _task_state(task: Task) -> dict[str, Any]:
    plan = task.plan
    state: dict[str, Any] = {
        "client": task.client,
        "version": task.version,
        "update": task.update,
        "sequence": task.sequence,
        "dispatched": task.dispatched,
        "arrival": task.arrival,
        "plan": [plan.dropped, plan.batches, plan.straggler, plan.planned],
    }
    result = task.result
    if result is not None:
        state["result"] = {
            "num_samples": result.num_samples,
            "payload": None if result.payload is None else dict(result.payload),
            "extras": dict(result.extras),
            "metrics": dict(result.metrics),
            "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}",
            "dropped": result.dropped,
            "received": result.received,
            "version": result.version,
        }
    return state


def _task_from_state(state: dict[str, Any]) -> Task:
    dropped, batches, straggler, planned = state["plan"]
    task = Task(
        int(state["client"]),
        int(state["version"]),
        int(state["update"]),
        int(state["sequence"]),
        float(state["dispatched"]),
        float(state["arrival"]),
        Plan(bool(dropped), int(batches), bool(straggler), int(planned)),
    )
    saved = state.get("result")
    if saved is not None:
        task.result = ClientResult(
            task.client,
            int(saved["num_samples"]),
            saved["payload"],
            dict(saved["extras"]),
            dict(saved["metrics"]),
            error=None if saved["error"] is None else RuntimeError(saved["error"]),
            dropped=saved["dropped"],
            received=bool(saved["received"]),
            version=saved["version"],
        )
    return task


def staleness_summary(staleness: Iterable[int]) -> dict[str, float]:
    """``async/staleness_mean`` and ``async/staleness_max`` of one server update's replies."""
    values = list(staleness)
    if not values:
        return {}
    return {"async/staleness_mean": float(np.mean(values)), "async/staleness_max": float(max(values))}
