"""The server in plain torch: versioned global states, what a server update has received, and the update itself.

Nothing here knows Lightning. :class:`Server` holds the global state and a version that counts
server updates; it configures the message a client task starts from
(:meth:`Server.configure`), accepts each reply against the version its client started from
(:meth:`Server.accept`), and updates through the strategy: its aggregator, then its server
optimizer (:meth:`Server.update`). What one server update has received so far is one object,
:class:`Pending`, which the loop gathers whole under DDP; the server's whole state is one
dictionary (:meth:`Server.state_dict`), which a checkpoint stores.

Synchronous rounds are one schedule of this server: every client of a round is dispatched with
the same version, and the round's end is one update. A schedule in which clients start from
different versions (buffered asynchronous aggregation) needs nothing else of it: each reply names
its version, and the server keeps each version's state while a client started from it is in flight.

The Lightning side, :class:`~fedpeft_pl.aggregation.ServerAggregation`, is a thin callback: it
calls the server from the loop's hooks and logs each round.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

import torch

from fedpeft_pl.attacks import Attack
from fedpeft_pl.clock import VirtualClock
from fedpeft_pl.comm import WireCounter, payload_bytes
from fedpeft_pl.compression import Codec
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.exchange import decode_reply
from fedpeft_pl.federation import (
    ClientEvaluation,
    ClientResult,
    Federation,
    Round,
    RoundMessage,
    State,
    client_accuracy_summary,
    first_non_finite,
    weighted_metrics,
)
from fedpeft_pl.peft import PEFTMethod, PerClientViews
from fedpeft_pl.schedules import FedBuff, Schedule
from fedpeft_pl.strategies import ClientUpdate, FedAvg, Strategy

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

log = logging.getLogger(__name__)

__all__ = ["Dispatch", "Pending", "Server"]


@dataclass
class Dispatch:
    """One global version as it was sent: the state the strategy configured, the message, and what clients decode.

    Args:
        version: server updates before this message.
        sent: the state the strategy configured (before the download codec).
        received: what every client decodes from ``message`` (the download codec's round trip).
        message: the message itself.
    """

    version: int
    sent: State
    received: State
    message: RoundMessage


@dataclass
class Pending:
    """What one server update has received so far: its replies, its counts and its bytes.

    Under DDP each process fills its own for its share of the clients; :meth:`Server.gather`
    merges them in the order of a single process, so every process aggregates to the same bits.
    """

    updates: list[ClientUpdate] = field(default_factory=list)
    reports: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)  # (client, samples, metrics)
    bytes: dict[str, int] = field(default_factory=lambda: {"down": 0, "up": 0})
    dropped: int = 0
    failed: int = 0
    contributors: int = 0
    delivered: list[int] = field(default_factory=list)
    seconds: dict[int, float] = field(default_factory=dict)  # simulated seconds of each client's task, with a clock
    task_bytes: dict[int, int] = field(default_factory=dict)  # each client's download bytes, for its task time
    late: int = 0  # sent the message, arrived after the round had ended: work discarded
    late_bytes: int = 0  # what the late clients were sent
    staleness: list[int] = field(default_factory=list)  # each accepted reply's server updates since its dispatch
    ends: Optional[float] = None  # the update's simulated seconds, where a schedule decided them

    def to_cpu(self) -> Pending:
        cpu = [
            replace(u, state={k: v.cpu() for k, v in u.state.items()}, extras={k: v.cpu() for k, v in u.extras.items()})
            for u in self.updates
        ]
        return replace(self, updates=cpu)


class Server:
    """The federation's server: global state and its versions, a client task's message, the update.

    Args:
        strategy: the aggregation strategy (an aggregator and a server optimizer); FedAvg by default.
        upload: codec for the clients' updates; none by default.
        download: codec for the global state sent to clients; none by default.
        clock: simulated time of each client task (:class:`~fedpeft_pl.clock.VirtualClock`); none by default.
        schedule: when the server updates (:mod:`fedpeft_pl.schedules`); where one is set, the loop
            hands each reply to :meth:`accept` once the schedule says it counts (on time, or arrived),
            not as the client finishes.
        attack: the clients that lie, in a simulation (:mod:`fedpeft_pl.attacks`): an omniscient attack
            rewrites its clients' updates before each aggregation (:meth:`update`), and every attack's
            figures are logged with the round (:attr:`attack_metrics`); none by default.
    """

    def __init__(
        self,
        strategy: Optional[Strategy] = None,
        upload: Optional[Codec] = None,
        download: Optional[Codec] = None,
        clock: Optional[VirtualClock] = None,
        schedule: Optional[Schedule] = None,
        attack: Optional[Attack] = None,
    ) -> None:
        self.strategy = strategy if strategy is not None else FedAvg()
        self.attack = attack
        self.attack_metrics: dict[str, float] = {}
        self.attack_sets: dict[str, Any] = {}  # the attack's own test sets, by metric (set by the loop)
        self.upload = upload if upload is not None else Codec()
        self.download = download if download is not None else Codec()
        self.clock = clock
        self.schedule = schedule
        self.simulated_seconds = 0.0
        self.round_seconds = 0.0
        self._seed = 0
        self._local_epochs = 1
        self.wire = WireCounter()
        self.version = 0
        self.global_state: State = {}
        self.cumulative_bytes = 0
        self.pending = Pending()
        self.aggregated = 0
        self.evaluation: dict[str, float] = {}
        self._dispatched: dict[int, Dispatch] = {}
        self._counted: set[tuple[Optional[int], int]] = set()  # (version, client) whose download is counted
        self.in_flight: frozenset[int] = frozenset()  # versions an asynchronous schedule's clients started from
        self._views: Optional[PerClientViews] = None  # set where clients exchange their own views
        self._views_state: dict[str, Any] = {}  # the method's server state from a checkpoint, until it starts

    @property
    def asynchronous(self) -> bool:
        """Whether replies from several global versions meet in one update (FedBuff, FedAsync)."""
        return self.schedule is not None and self.schedule.asynchronous

    # -- the run --------------------------------------------------------------------------------

    def start(self, global_state: State, peft: Optional[PEFTMethod] = None) -> None:
        """Hold ``global_state``; ``peft`` where its clients exchange their own views of it (heterogeneous ranks)."""
        self.global_state = dict(global_state)
        if isinstance(peft, PerClientViews):
            self._views = peft
            self.wire.enabled = False  # one message layout per client: not measured
            if self._views_state:
                peft.load_server_state(self._views_state)
                self._views_state = {}

    def setup(self, federation: Federation) -> None:
        """The federation's shape, once, before the first client task."""
        if isinstance(self.schedule, FedBuff):
            self.strategy.setup_buffered(federation, self.schedule.buffer_size)
        else:
            self.strategy.setup(federation)
        self._seed, self._local_epochs = federation.seed, federation.local_epochs

    # -- a server update's client tasks -----------------------------------------------------------

    def begin(self) -> None:
        """Start collecting for the next server update."""
        self.pending = Pending()
        self.evaluation = {}
        self.attack_metrics = {}

    def configure(self, round: Round) -> RoundMessage:
        """The message the clients of ``round`` start from, at the current version."""
        state, config = self.strategy.configure_fit(round.number, self.global_state)
        payload = self.download.encode(state)
        message = RoundMessage(
            payload,
            dict(config),
            self.strategy.client_extras(round.number, self.global_state),
            version=self.version,
        )
        self._dispatched[self.version] = Dispatch(
            self.version, state, self.download.decode(payload, like=state), message
        )
        self.wire.start_round(payload)
        return message

    def dispatch(self, version: Optional[int] = None) -> Dispatch:
        """What was sent at ``version`` (the newest by default); kept while clients started from it are in flight."""
        version = max(self._dispatched) if version is None else version
        if version not in self._dispatched:
            raise RuntimeError(f"no global version {version} is in flight (in flight: {sorted(self._dispatched)})")
        return self._dispatched[version]

    def download_size(self, round: Round, client: int, version: Optional[int] = None) -> int:
        """What ``client`` is sent for ``round`` (from ``version``, the newest by default), in the bytes its task
        time uses: the wire bytes where they are measured, else the payload's; nothing is counted."""
        sent = self.dispatch(version)
        message = sent.message
        if self._views is not None:
            view = self._views.client_view(sent.sent, client, round.number, upload=False)
            size = payload_bytes(self.download.encode(view)) + payload_bytes(message.extras)
            return size + self._views.pending_download_bytes(client, round.number)
        plan = round.plans.get(client)
        wire = self.wire.download_size(
            message.config, round.number, client, plan.batches if plan else 0, message.extras, message.version
        )
        return wire if wire is not None else payload_bytes(message.payload) + payload_bytes(message.extras)

    def reply_size(self, round: Round, client: int, num_samples: int, metrics: Mapping[str, float]) -> int:
        """What ``client``'s reply to ``round`` will weigh, known before it trains: its update's layout
        through the upload codec (a zero change), in wire bytes where they are measured. For a schedule
        that orders replies by their arrival (FedBuff, FedAsync), whose strategies send no extras."""
        like = self.dispatch().received
        if self._views is not None:
            like = self._views.client_view(like, client, round.number, upload=True)
        payload = self.upload.encode({name: torch.zeros_like(t) for name, t in like.items()})
        wire = self.wire.reply_size(payload, num_samples, metrics, {})
        return wire if wire is not None else payload_bytes(payload)

    def upload_size(self, result: ClientResult) -> int:
        """What ``result``'s reply weighs, in the bytes its task time uses; nothing is counted."""
        assert result.payload is not None
        wire = self.wire.reply_size(result.payload, result.num_samples, result.metrics, result.extras)
        return wire if wire is not None else payload_bytes(result.payload) + payload_bytes(result.extras)

    def task_seconds(
        self, round: Round, client: int, samples: float, upload_bytes: int, download_bytes: Optional[int] = None
    ) -> float:
        """The simulated seconds of ``client``'s task in ``round``: download, ``samples`` (a client's training
        samples in one local epoch), upload, latency (:meth:`~fedpeft_pl.clock.VirtualClock.task_time`)."""
        assert self.clock is not None, "task times need a clock"
        plan = round.plans.get(client)
        work = plan.work if plan is not None else 1.0
        if download_bytes is None:
            version = round.message.version if round.message is not None else None
            download_bytes = self.download_size(round, client, version)
        return self.clock.task_time(
            self._seed,
            round.number,
            client,
            download_bytes,
            samples * self._local_epochs * work,
            upload_bytes,
        ).total

    def count_download(self, round: Round, result: ClientResult) -> None:
        """What ``result``'s client (each of them, for a securely aggregated result) received, in bytes; once."""
        if not result.received or (result.version, result.client) in self._counted:
            return
        self._counted.add((result.version, result.client))
        sent = self.dispatch(result.version)
        message = sent.message
        clients = list(result.aggregate_of) or [result.client]
        if self._views is not None:  # each client its own view, at its own rank
            self.pending.delivered += clients
            for client in clients:
                size = self.download_size(round, client, result.version)
                self.pending.bytes["down"] += size
                self.pending.task_bytes[client] = size
        else:
            size = payload_bytes(message.payload) + payload_bytes(message.extras)
            self.pending.bytes["down"] += size * len(clients)
            self.pending.task_bytes.update(dict.fromkeys(clients, size))
        plan = round.plans.get(result.client)
        wire = self.wire.download(
            message.config, round.number, result.client, plan.batches if plan else 0, message.extras, message.version
        )
        if wire is not None:  # the message as a deployment sends it: what the network carries
            self.pending.task_bytes[result.client] = wire

    def dropped(self, round: Round, result: ClientResult) -> None:
        self.count_download(round, result)
        self.pending.dropped += 1

    def failed(self, round: Round, result: ClientResult) -> None:
        self.count_download(round, result)
        self.pending.failed += 1

    def late(self, round: Round, result: ClientResult) -> None:
        """A client that was sent the round's message and arrived after the round had ended: discarded."""
        before = self.pending.bytes["down"]
        self.count_download(round, result)
        self.pending.late += max(1, len(result.aggregate_of))
        self.pending.late_bytes += self.pending.bytes["down"] - before

    def accept(self, round: Round, result: ClientResult, device: torch.device) -> Optional[ClientUpdate]:
        """Take ``result``'s update, decoded against the version its client started from; None if left out.

        An update holding NaN or Inf is left out with a warning naming the client and the tensor.
        """
        if not self.asynchronous:
            self.count_download(round, result)  # an asynchronous client's was counted when it was sent
        if result.payload is None:
            raise RuntimeError(f"round {round.number}: client {result.client} reported success but sent no update")
        pending = self.pending
        # a securely aggregated result stands for that many clients, each of which uploaded an update
        # of this size (in SecAgg+'s masked form; see fedpeft_pl.deploy.secagg for its wire size)
        upload = payload_bytes(result.payload) + payload_bytes(result.extras)
        pending.bytes["up"] += upload * max(1, len(result.aggregate_of))
        wire = self.wire.upload(result.payload, result.num_samples, result.metrics, result.extras)
        if self.clock is not None and not self.asynchronous:
            self._time_task(round, result, upload if wire is None else wire)
        pending.reports.append((result.client, result.num_samples, dict(result.metrics)))
        sent = self.dispatch(result.version)
        payload = {k: v.to(device) for k, v in result.payload.items()}
        extras = {k: v.to(device) for k, v in result.extras.items()}
        try:
            state = decode_reply(self.upload, payload, sent.received, self._views, result.client, round.number)
            misfit = _misfit(state, sent.received)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as err:  # a payload the codec cannot read
            misfit = f"the upload codec cannot decode it ({type(err).__name__}: {err})"
        if misfit is not None:
            log.warning(
                f"round {round.number}: client {result.client} sent an update that does not fit the global state "
                f"({misfit}); its update is left out of this round",
                extra={"each_process": True},
            )
            return None
        broken = first_non_finite({**state, **extras})
        if broken is not None:
            log.warning(
                f"round {round.number}: client {result.client} sent NaN or Inf values (in {broken}); "
                "its update is left out of this round",
                extra={"each_process": True},  # only the process that trained the client knows
            )
            return None
        if self.schedule is not None and self.asynchronous:  # (the first test narrows the type)
            stale = self.version - sent.version
            state = self.schedule.reweigh(state, sent.received, self.global_state, stale)
            pending.staleness.append(stale)
        update = ClientUpdate(
            result.client, result.num_samples, state, extras, tuple(result.aggregate_of), sent.version
        )
        pending.updates.append(update)
        pending.contributors += max(1, len(result.aggregate_of))  # secure aggregation: one mean of several clients
        return update

    def _time_task(self, round: Round, result: ClientResult, upload_bytes: int) -> None:
        """The simulated seconds of ``result``'s task (each client's, for a securely aggregated result)."""
        clients = list(result.aggregate_of) or [result.client]
        samples = result.num_samples / len(clients)  # a secure aggregate: its clients' total, shared out evenly
        for client in clients:
            self.pending.seconds[client] = self.task_seconds(
                round, client, samples, upload_bytes, self.pending.task_bytes.get(client)
            )

    def gather(self, round: Round, gather: Callable[[Any], list[Any]], device: torch.device) -> None:
        """Merge every process's :class:`Pending` (and upload-codec state) into each, in a single process's order."""
        mine = {
            "pending": self.pending.to_cpu(),
            "wire": self.wire.bytes,
            "upload": self.upload.client_state(list(round.share)),
        }
        order = {c: i for i, c in enumerate(round.clients)}
        merged = Pending()
        self.wire.bytes = {"down": 0, "up": 0} if self.wire.bytes is not None else None
        for part in gather(mine):
            theirs: Pending = part["pending"]
            merged.updates += [
                replace(
                    u,
                    state={k: v.to(device) for k, v in u.state.items()},
                    extras={k: v.to(device) for k, v in u.extras.items()},
                )
                for u in theirs.updates
            ]
            merged.reports += theirs.reports
            merged.bytes = {k: merged.bytes[k] + theirs.bytes[k] for k in merged.bytes}
            merged.dropped += theirs.dropped
            merged.failed += theirs.failed
            merged.late += theirs.late
            merged.late_bytes += theirs.late_bytes
            merged.delivered += theirs.delivered
            merged.seconds.update(theirs.seconds)
            if self.wire.bytes is not None and part["wire"] is not None:
                self.wire.bytes = {k: v + part["wire"][k] for k, v in self.wire.bytes.items()}
            self.upload.load_client_state(part["upload"])
        merged.updates.sort(key=lambda u: order[u.client])
        merged.reports.sort(key=lambda r: order[r[0]])
        self.pending = merged

    def update(self, round: Round, model: Optional[VisionTransformer] = None) -> bool:
        """The server update at the end of ``round``: aggregate what arrived and step, or skip with a warning.

        Under DDP the gathered updates are every process's; a securely aggregated update counts its
        clients. The update's simulated duration is its last client's arrival, or what the schedule
        decided (``pending.ends``). Returns whether the global state moved; the version advances either
        way, and the versions no client is working from any more (none of :attr:`in_flight`) are let go.
        """
        pending = self.pending
        arrived = max(len(pending.updates), pending.contributors)
        moved = arrived >= self.strategy.min_clients
        if moved:
            if self.attack is not None and self.attack.omniscient:
                pending.updates = self._collude(pending.updates)
            state = self.strategy.aggregate_fit(round.number, self.global_state, pending.updates)
            if self.attack is not None:
                aggregator = self.strategy.aggregator
                self.attack_metrics = self.attack.round_metrics(
                    pending.updates, aggregator.client_shares(), aggregator.rejected_clients()
                )
            if self._views is not None:
                assert model is not None, "a method with per-client views aggregates with the model"
                state = self._views.aggregate(model, state, pending.updates, round.number)
            self.global_state = state
            self.aggregated = arrived
        else:
            log.warning(
                f"round {round.number}: {arrived} usable update(s) of {len(round.clients)} sampled clients, fewer "
                f"than min_clients={self.strategy.min_clients}; the round is skipped and the global state is unchanged"
            )
            self.aggregated = 0
        pending.updates = []
        if self._views is not None:
            self._views.delivered(pending.delivered, round.number)
        self.cumulative_bytes += pending.bytes["down"] + pending.bytes["up"]
        # a synchronous round ends when its last client arrives
        self.round_seconds = max(pending.seconds.values(), default=0.0) if pending.ends is None else pending.ends
        self.simulated_seconds += self.round_seconds
        self.version += 1
        for version in [v for v in self._dispatched if v not in self.in_flight]:
            del self._dispatched[version]  # every client started from it has answered
        self._counted = {key for key in self._counted if key[0] in self.in_flight}  # sent; may yet fail
        return moved

    def _collude(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """The round's updates with the malicious clients' rewritten by the omniscient attack, from the honest ones."""
        assert self.attack is not None
        bad = [u for u in updates if self.attack.is_malicious(u.client) and not u.aggregate_of]
        honest = [u for u in updates if not self.attack.is_malicious(u.client) or u.aggregate_of]
        crafted = dict(zip((id(u) for u in bad), self.attack.collude(bad, honest, self.global_state)))
        return [replace(u, state=crafted[id(u)]) if id(u) in crafted else u for u in updates]

    # -- what the server knows of the clients ------------------------------------------------------

    @property
    def client_metrics(self) -> dict[str, float]:
        """This update's client metrics so far, each weighted by the reporting clients' sample counts."""
        return weighted_metrics(ClientResult(c, n, metrics=m) for c, n, m in self.pending.reports)

    def record_client_evaluations(self, evaluations: list[ClientEvaluation]) -> None:
        """Every client's accuracy on its own test split: ``clients/acc_*``, and the state sent to evaluate."""
        self.evaluation.update(client_accuracy_summary(evaluations))
        # each evaluated client receives the global state: counted apart from the training traffic
        self.evaluation["comm/bytes_eval_down"] = len(evaluations) * payload_bytes(
            self.download.encode(self.global_state)
        )

    # -- the server's state: one object -------------------------------------------------------------

    def components(self) -> dict[str, str]:
        """The server's strategy and codecs by setting, as a checkpoint records them for a resume."""

        def name(part: Any) -> str:
            return "none" if type(part) is Codec else type(part).__name__

        return {
            "trainer.aggregation": name(self.strategy),
            "trainer.compress_upload": name(self.upload),
            "trainer.compress_download": name(self.download),
        }

    def check_resume(self, state: Mapping[str, Any]) -> None:
        """Refuse, before anything is written, a checkpoint's server state that this run cannot continue.

        Checkpoints record their strategy and codecs (:meth:`components`); the state is also loaded
        into copies, so a checkpoint from before that record is checked too.
        """
        saved = state.get("components", {})
        for setting, name in self.components().items():
            if setting in saved and saved[setting] != name:
                raise ConfigError(
                    f"the checkpoint was written with {setting} {saved[setting]}, this run has {name}; "
                    "resume with the configuration that wrote it (its run folder's config.yaml)"
                )
        for part, target in (("strategy", self.strategy), ("upload", self.upload), ("download", self.download)):
            try:
                copy.deepcopy(target).load_state_dict(state[part])
            except Exception as error:  # the state of another strategy or codec: KeyError, shape errors
                raise ConfigError(
                    f"the checkpoint's server state ({part}) does not fit this run's {type(target).__name__} "
                    f"({type(error).__name__}: {error}); resume with the configuration that wrote it"
                ) from None

    def state_dict(self) -> dict[str, Any]:
        """The server's whole state. The global state itself is the module's trainable state in a checkpoint."""
        return {
            "components": self.components(),
            "version": self.version,
            "cumulative_bytes": self.cumulative_bytes,
            "simulated_seconds": self.simulated_seconds,
            "in_flight": {str(v): _dispatch_state(d) for v, d in self._dispatched.items()},
            "strategy": self.strategy.state_dict(),
            "upload": self.upload.state_dict(),
            "download": self.download.state_dict(),
            "peft": self._views.server_state() if self._views is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cumulative_bytes = state["cumulative_bytes"]
        self.version = state.get("version", 0)
        self.simulated_seconds = state.get("simulated_seconds", 0.0)
        self._dispatched = {int(v): _dispatch_from_state(d) for v, d in state.get("in_flight", {}).items()}
        self.in_flight = frozenset(self._dispatched)
        self._counted = set()
        self.strategy.load_state_dict(state["strategy"])
        self.upload.load_state_dict(state["upload"])
        self.download.load_state_dict(state["download"])
        self._views_state = dict(state.get("peft", {}))


def _misfit(state: State, like: State) -> Optional[str]:
    """How a decoded update differs from the state its client started from (names, shapes, dtypes), or None."""
    missing, extra = sorted(like.keys() - state.keys()), sorted(state.keys() - like.keys())
    if missing or extra:
        return f"tensors missing: {missing[:3]}, unknown: {extra[:3]}"
    for name, tensor in like.items():
        got = state[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            return f"{name} is {tuple(got.shape)} {got.dtype}, not {tuple(tensor.shape)} {tensor.dtype}"
    return None


def _dispatch_state(sent: Dispatch) -> dict[str, Any]:
    """A global version in flight, in types a checkpoint holds (an asynchronous run's, at an update's end)."""
    message = sent.message
    return {
        "version": sent.version,
        "sent": dict(sent.sent),
        "received": dict(sent.received),
        "payload": dict(message.payload),
        "config": dict(message.config),
        "extras": dict(message.extras),
    }


def _dispatch_from_state(state: Mapping[str, Any]) -> Dispatch:
    message = RoundMessage(dict(state["payload"]), dict(state["config"]), dict(state["extras"]), int(state["version"]))
    return Dispatch(int(state["version"]), dict(state["sent"]), dict(state["received"]), message)
