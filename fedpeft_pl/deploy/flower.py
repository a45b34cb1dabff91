"""Deploy across machines with Flower: a ServerApp and a ClientApp built from a ``fedpeft`` config.

Flower (https://flower.ai, Message API) moves the messages; everything else is fedpeft's own,
built from the same YAML as ``fedpeft fit``:

- The **ServerApp** runs a :class:`~fedpeft_pl.trainer.FederatedTrainer` whose client runner is a
  :class:`FlowerRunner`: it sends train messages to SuperNodes instead of training in-process. Client sampling,
  availability, the aggregation strategy, the codecs, the byte counter, evaluation on the test split, TensorBoard
  tags and checkpoints are exactly those of a simulation.
- The **ClientApp** answers a train message by loading the received trainable tensors into its
  module, training the one client its SuperNode plays (``partition-id`` in the node config) for
  that round with :meth:`~fedpeft_pl.trainer.FederatedTrainer.train_client`, and replying with its
  (encoded) update, the strategy's extra tensors, its sample count and its metrics. Only
  trainable tensors (and a strategy's extras, such as SCAFFOLD's control variates) travel.

A client trains under the seed of its round and partition, as it would in a simulation, so a
deployment with the same config and seed reaches the simulation's global state.

Flower's SuperNode starts a fresh ClientApp process for every message (Flower's design; see
flwrlabs/flower#3670), so the backbone is read from local disk once per message. Within one
process (Flower's simulation engine reuses its workers) the module with its backbone is built
once and kept. Per-client state (Int8 error feedback residuals, a strategy's per-client
tensors, a personalised method's local part, the local-DP accountant) lives in Flower's node
context, or with ``state-dir`` in the node config in files on the SuperNode's disk, which outlive
a restarted SuperNode and a resumed ServerApp (:class:`NodeStore`).

Faults: before each round the server asks which SuperNodes are connected; a client whose
SuperNode went away fails that round (``min_clients`` decides whether the round counts), and a
restarted SuperNode is asked its partition and sampled again. With ``resume = true`` in the run
config the ServerApp continues from the newest ``last.ckpt`` of its config.

With ``secure-aggregation = true`` in the run config (``fedpeft flower-app ... --secure-aggregation``)
the rounds run Flower's SecAgg+ instead and the server is handed only the weighted mean of the
clients' updates: see :mod:`fedpeft_pl.deploy.secagg`.

Write an app directory with ``fedpeft flower-app DIR --config configs/quickstart.yaml``; docs/deploy.md,
"Deploy across machines with Flower", has the commands. Flower is an optional dependency:
``pip install "fedpeft-pl[flower]"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback

from fedpeft_pl.attacks import Attack, PoisonedData, load_attack
from fedpeft_pl.client import FedPEFTModule
from fedpeft_pl.comm import (
    CLIENT as _CLIENT,
)
from fedpeft_pl.comm import (
    MAX_BATCHES as _MAX_BATCHES,
)
from fedpeft_pl.comm import (
    ROUND as _ROUND,
)
from fedpeft_pl.comm import (
    VERSION as _VERSION,
)
from fedpeft_pl.comm import (
    reply_content,
    train_content,
)
from fedpeft_pl.compression import Codec
from fedpeft_pl.config import build_run
from fedpeft_pl.data.datamodule import FederatedDataModule
from fedpeft_pl.deploy.node_state import DECLINED as _DECLINED
from fedpeft_pl.deploy.node_state import MODEL_UPDATE as _MODEL_UPDATE
from fedpeft_pl.deploy.node_state import RUN as _RUN
from fedpeft_pl.deploy.node_state import ArrayStore, answer_query  # noqa: F401  (answer_query: re-exported)
from fedpeft_pl.deploy.writer import NODE_TIMEOUT, REPLY_TIMEOUT
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.exchange import LOCAL, ClientSession, open_session
from fedpeft_pl.federation import ClientEvaluation, ClientResult, Federation, Plan, Round, RoundMessage, State
from fedpeft_pl.hooks import ClientDropped
from fedpeft_pl.peft import load_trainable_state, trainable_state
from fedpeft_pl.privacy import EPSILON_SPENT, LocalDP, releases_client_statistics
from fedpeft_pl.runners.base import ClientExecutor, RunnerHost, client_metrics
from fedpeft_pl.strategies import Strategy
from fedpeft_pl.trainer import FederatedTrainer

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import Grid
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('fedpeft_pl.deploy.flower needs Flower: pip install "fedpeft-pl[flower]"') from err

log = logging.getLogger(__name__)


def build(config: Union[str, os.PathLike], server: bool) -> tuple[FederatedTrainer, Any, Any, dict[str, Any]]:
    """The trainer, module and data module of a ``fedpeft fit`` config, and the config's ``fit`` arguments."""
    return build_run(config, save_config=server)


# -- server ---------------------------------------------------------------------------------------


class FlowerRunner:
    """A client runner whose clients train on Flower SuperNodes, one per partition.

    Every client of the round that takes part is sent the round's message; a client that drops
    out (client availability) is sent nothing, as in a simulation. Results come back as
    :class:`~fedpeft_pl.federation.ClientResult` in sampling order; a reply without an update is
    a failed client, never a silent default.

    Args:
        loop: the trainer's federated loop (for ``on_client_start``).
        grid: the ServerApp's grid.
        nodes: SuperNode id of each client (partition id).
        reply_timeout: seconds to wait for a round's replies; a client that has not replied by
            then is left out of the round as failed.
        node_timeout: seconds to wait for SuperNodes to say their partition.
        query_batch: SuperNodes asked their partition at a time (0: all at once); see :func:`query_partitions`.
    """

    def __init__(
        self,
        loop: RunnerHost,
        grid: Grid,
        nodes: dict[int, int],
        reply_timeout: float = REPLY_TIMEOUT,
        node_timeout: float = NODE_TIMEOUT,
        query_batch: int = 0,
    ) -> None:
        self.loop = loop
        self.grid = grid
        self.nodes = nodes
        self.reply_timeout = reply_timeout
        self.node_timeout = node_timeout
        self.query_batch = query_batch
        self._tasks: dict[str, int] = {}  # messages in flight one at a time (dispatch), by id: their client
        self.run_key = DeploymentRun()
        loop.context.keep_in_checkpoints(self.run_key)  # its key goes into the checkpoints
        self._told: set[int] = set()  # nodes that know the run key
        self._online: set[int] = set(nodes.values())
        # wire bytes are those of the real messages below, not the server's own reckoning
        self.wire = loop.server.wire
        self.wire.measured = True
        privacy = loop.context.privacy
        if privacy is not None:  # each client keeps its own accountant on its SuperNode
            privacy.account_on_clients()

    def run(self, round: Round) -> Iterator[ClientResult]:
        message = round.message
        assert message is not None, "the server configures the round before clients run"
        self.refresh()
        module = self.loop.context.module
        peft = getattr(module, "peft", None)
        views = peft if getattr(peft, "per_client_views", False) else None
        shared = None if views is not None else _to_record(message.payload)  # the same for every client
        extras = _to_record(message.extras) if message.extras else None
        update = _model_update(module)
        early: dict[int, ClientResult] = {}
        messages, sent = [], []
        for client in round.share:
            dropped = self.loop.start_client(round, client)
            if dropped is not None:  # a client that drops out is sent nothing
                early[client] = dropped
                continue
            if self.nodes.get(client) not in self._online:  # its SuperNode went away: it fails this round
                reason = f"the SuperNode of partition {client} is not connected"
                early[client] = ClientResult(client, error=RuntimeError(reason), received=False)
                continue
            arrays = shared
            if arrays is None:  # each client is sent its own view (heterogeneous LoRA ranks, FLoRA)
                arrays = _to_record(views.client_view(message.payload, client, round.number, upload=False))
            batches = round.plans[client].batches
            content = train_content(arrays, message.config, round.number, client, batches, extras, message.version)
            if update is not None:
                content[_MODEL_UPDATE] = update
            messages.append(Message(content, dst_node_id=self.nodes[client], message_type=MessageType.TRAIN))
            self.wire.count("down", content)
            sent.append(client)
        replies = self._send(messages, sent)
        for client in round.share:  # in sampling order, as one process would aggregate
            if client in early:
                yield early[client]
                continue
            result = self._result(client, replies.get(client))
            if result.ok:  # without steps the server's global step stands still and Lightning writes no checkpoint
                self.loop.count_steps(int(result.metrics.get("steps", 0)))
            yield result

    def evaluate(self, round: Round, clients: list[int]) -> Iterator[ClientEvaluation]:
        """Each client evaluates the global state (and its own local part) on its SuperNode; only metrics come back."""
        server = self.loop.server
        arrays = _to_record(server.download.encode(server.global_state))
        update = _model_update(self.loop.context.module)
        messages = []
        gone = [c for c in clients if self.nodes.get(c) not in self._online]
        if gone:
            log.warning(f"round {round.number}: client(s) {gone} cannot evaluate: their SuperNodes are not connected")
        clients = [c for c in clients if c not in gone]
        for client in clients:
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({_ROUND: round.number, _CLIENT: client})})
            if update is not None:
                content[_MODEL_UPDATE] = update
            messages.append(Message(content, dst_node_id=self.nodes[client], message_type=MessageType.EVALUATE))
        replies = self._send(messages, clients)
        for client in clients:
            reply = replies.get(client)
            if reply is None or reply.has_error():
                reason = reply.error.reason if reply is not None else f"no reply within {self.reply_timeout:g} s"
                log.warning(f"round {round.number}: client {client} could not evaluate: {reason}")
                continue
            metrics = dict(reply.content["metrics"])
            count = int(metrics.pop("num-examples"))
            yield ClientEvaluation(client, count, {k: float(v) for k, v in metrics.items()})

    def refresh(self) -> None:
        """Before a round: which SuperNodes are connected, and the partition of each that joined since the
        last round (a restarted SuperNode comes back with a new node id and is sampled again)."""
        self._online = set(self.grid.get_node_ids())
        new = sorted(self._online - self._told)
        if not new:
            return
        federation = self.loop.federation
        found = query_partitions(
            self.grid, new, federation.num_clients, self.node_timeout, self.run_key.key, self.query_batch
        )
        for partition, node in found.items():
            if self.nodes.get(partition) not in (None, node):
                log.info(f"partition {partition} is back on SuperNode {node}")
            self.nodes[partition] = node
        self._told |= set(found.values())

    def _send(self, messages: list[Message], clients: list[int]) -> dict[int, Message]:
        """Each client's reply, by the message it answers: the SuperLink's error reply for a node that went
        away comes from the SuperLink, not from that node."""
        replies = self.grid.send_and_receive(messages, timeout=self.reply_timeout)
        client_of = {m.metadata.message_id: c for m, c in zip(messages, clients)}
        return {
            client_of[r.metadata.reply_to_message_id]: r for r in replies if r.metadata.reply_to_message_id in client_of
        }

    # -- one task at a time, in real time: FedBuff and FedAsync on a deployment (FederatedLoop._advance_live) --

    def dispatch(self, round: Round, client: int) -> Union[str, ClientResult]:
        """Send ``client`` its task of ``round`` without waiting for the reply: the message id, or its result
        where it was sent nothing (it drops out, or its SuperNode is not connected)."""
        message = round.message
        assert message is not None, "the server configures the version before clients are sent it"
        if not self._tasks:
            self.refresh()  # who is connected, when no task is in flight to tell
        dropped = self.loop.start_client(round, client)
        if dropped is not None:
            return dropped
        if self.nodes.get(client) not in self._online:
            reason = f"the SuperNode of partition {client} is not connected"
            return ClientResult(client, error=RuntimeError(reason), received=False)
        module = self.loop.context.module
        peft = getattr(module, "peft", None)
        state = message.payload
        if getattr(peft, "per_client_views", False):
            state = peft.client_view(message.payload, client, round.number, upload=False)
        extras = _to_record(message.extras) if message.extras else None
        content = train_content(
            _to_record(state),
            message.config,
            round.number,
            client,
            round.plans[client].batches,
            extras,
            message.version,
        )
        update = _model_update(module)
        if update is not None:
            content[_MODEL_UPDATE] = update
        sent = Message(content, dst_node_id=self.nodes[client], message_type=MessageType.TRAIN)
        [task] = list(self.grid.push_messages([sent]))
        self.wire.count("down", content)
        self._tasks[task] = client
        return task

    def collect(self, tasks: Iterable[str]) -> list[tuple[str, ClientResult]]:
        """The replies that have arrived for ``tasks``, in arrival order, each once; a reply to a message this
        server did not send (an earlier ServerApp's) or one already taken is left out."""
        wanted = [task for task in tasks if task in self._tasks]
        if not wanted:
            return []
        arrived = []
        for reply in self.grid.pull_messages(wanted):
            task = reply.metadata.reply_to_message_id
            client = self._tasks.pop(task, None)
            if client is None:
                log.info(f"a reply to message {task!r}, which this server is not waiting for, is left out")
                continue
            arrived.append((task, self._result(client, reply)))
        return arrived

    def _result(self, client: int, reply: Any) -> ClientResult:
        """``client``'s result from its SuperNode's ``reply``: an untrusted message, checked before anything else
        reads it (:meth:`_refused`); a reply that fails a check is the client's failure this round."""
        if reply is None or reply.has_error():
            reason = reply.error.reason if reply is not None else f"no reply within {self.reply_timeout:g} s"
            return ClientResult(client, error=RuntimeError(f"SuperNode {self.nodes[client]}: {reason}"))
        content = reply.content
        if _DECLINED in content:  # e.g. its privacy budget is spent: the client says so itself
            return ClientResult(client, dropped=str(content[_DECLINED]["reason"]))
        refused = self._refused(content)
        if refused is not None:
            return ClientResult(
                client, error=UntrustedReply(f"SuperNode {self.nodes[client]} sent a reply that is refused: {refused}")
            )
        self.wire.count("up", content)
        metrics = dict(content["metrics"])
        num_samples = int(metrics.pop("num-examples"))
        return ClientResult(
            client,
            num_samples,
            payload=content["arrays"].to_torch_state_dict(),
            extras=content["extras"].to_torch_state_dict() if "extras" in content else {},
            metrics={k: float(v) for k, v in metrics.items()},
        )

    def _refused(self, content: Any) -> Optional[str]:
        """Why a train reply's content cannot be taken, or None. A SuperNode is admitted, not trusted: its reply
        must hold an update (``arrays`` of numeric arrays), a sample count that is an integer between 0 and the
        data set's size, numeric metrics, and at most :meth:`reply_limit` bytes. Whether the update fits the
        global state (names, shapes, dtypes, finite values) the server checks once it is decoded
        (:meth:`~fedpeft_pl.server.Server.accept`)."""
        if "arrays" not in content or not isinstance(content["arrays"], ArrayRecord):
            return "it holds no update"
        if "metrics" not in content or not isinstance(content["metrics"], MetricRecord):
            return "it holds no metrics"
        records = [content["arrays"]] + ([content["extras"]] if "extras" in content else [])
        if any(not isinstance(r, ArrayRecord) for r in records):
            return "its extra tensors are not arrays"
        size = sum(len(array.data) for record in records for array in record.values())
        limit = self.reply_limit()
        if size > limit:
            return f"its tensors take {size:,} bytes, more than the {limit:,} any reply of this run may take"
        for record in records:
            for name, array in record.items():
                if array.dtype not in _NUMERIC_DTYPES:
                    return f"tensor {name!r} has dtype {array.dtype!r}, not a numeric one"
        metrics = dict(content["metrics"])
        count = metrics.get("num-examples")
        if isinstance(count, bool) or not isinstance(count, int):
            return f"its sample count is {count!r}, not an integer"
        most = self.most_samples()
        if not 0 <= count <= most:
            return f"it claims {count:,} samples, outside 0 to {most:,} (the size of the training data)"
        return None

    def reply_limit(self) -> int:
        """The most bytes a train reply's tensors may take: twice the global state in float64 (an update and a
        strategy's extras of its size, in any codec), and 1 MiB more."""
        state = self.loop.server.global_state
        return 2 * 8 * sum(t.numel() for t in state.values()) + (1 << 20)

    def most_samples(self) -> int:
        """The largest sample count a client may report: the training data's size where the server has loaded
        it; else 2**40."""
        splits = getattr(self.loop.context.datamodule, "splits", None)
        return len(splits.train) if splits is not None else 1 << 40


class UntrustedReply(RuntimeError):
    """A SuperNode's reply that fails the server's checks; the client is left out of the round."""


# what an ArrayRecord's arrays may hold: numbers (Flower names numpy's dtypes)
_NUMERIC_DTYPES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)


def discover_clients(grid: Grid, num_clients: int, timeout: float, batch: int = 0) -> dict[int, int]:
    """Wait for ``num_clients`` SuperNodes and map each one's partition id to its node id (asking ``batch``
    of them at a time, 0: all at once)."""
    deadline = time.monotonic() + timeout
    next_report = 0.0
    while True:
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= num_clients:
            break
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{len(node_ids)} SuperNode(s) connected within {timeout:g} s, but data.num_clients is {num_clients} "
                "(one SuperNode per partition); start the missing SuperNodes or raise the run config's node-timeout"
            )
        if time.monotonic() >= next_report:
            log.info(f"waiting for SuperNodes: {len(node_ids)} of {num_clients} connected")
            next_report = time.monotonic() + 10
        time.sleep(0.5)
    nodes = query_partitions(grid, node_ids, num_clients, timeout, batch=batch)
    missing = sorted(set(range(num_clients)) - nodes.keys())
    if missing:
        raise ConfigError(f"no SuperNode answered for partition(s) {missing}; check their --node-config partition-id")
    log.info(f"{num_clients} SuperNodes, one per partition")
    return nodes


def query_partitions(
    grid: Grid,
    node_ids: list[int],
    num_clients: int,
    timeout: float,
    run_key: Optional[str] = None,
    batch: int = 0,
) -> dict[int, int]:
    """Ask ``node_ids`` which partition each plays (and tell them the experiment's ``run_key``); a node
    that does not answer (one that went away) is left out with a warning.

    Every query starts a ClientApp process on its SuperNode, which imports torch and Lightning. With
    ``batch`` (the run config's ``query-batch``), that many nodes are asked at a time: where many
    SuperNodes share one machine (``LocalFederation``, a soak), asking all at once starts as many
    such processes together, which can exhaust its memory. 0 asks all at once.
    """
    if batch < 0:
        raise ConfigError(f"query-batch must be >= 0 (0 asks every SuperNode at once), got {batch}")
    content = RecordDict({_RUN: ConfigRecord({"key": run_key})}) if run_key else RecordDict()
    size = batch or max(1, len(node_ids))
    replies = []
    for start in range(0, len(node_ids), size):
        queries = [
            Message(RecordDict(dict(content)), dst_node_id=n, message_type=MessageType.QUERY)
            for n in node_ids[start : start + size]
        ]
        replies += list(grid.send_and_receive(queries, timeout=timeout))
    nodes: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            log.warning(f"a SuperNode could not say its partition, and is left out: {reply.error.reason}")
            continue
        partition = reply.content["partition"]
        pid, count = int(partition["partition-id"]), int(partition["num-partitions"])
        if count != num_clients:
            raise ConfigError(
                f"SuperNode {reply.metadata.src_node_id} has num-partitions={count} but data.num_clients is "
                f"{num_clients}; start every SuperNode with --node-config 'partition-id=<i> "
                f"num-partitions={num_clients}'"
            )
        if pid in nodes:
            raise ConfigError(f"two SuperNodes have partition-id={pid}; give every SuperNode its own partition-id")
        nodes[pid] = reply.metadata.src_node_id
    return nodes


class DeploymentRun(Callback):
    """The key of one experiment across ServerApp restarts: drawn at its start, kept in its checkpoints, so a
    resumed ServerApp (a new Flower run) finds the state its SuperNodes keep on disk (:class:`NodeStore`)."""

    def __init__(self) -> None:
        self.key = secrets.token_hex(8)

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.key = str(state_dict["key"])


# -- client ---------------------------------------------------------------------------------------


class DeployedClient:
    """What a ClientApp process holds while it lives: the module with its backbone, the data, and the run's
    client-side parts (the strategy's client hooks, the codecs, local DP), built once from the config.

    Args:
        trainer: the run's trainer, built from the config; it trains one client per message
            (:meth:`~fedpeft_pl.trainer.FederatedTrainer.train_client`).
        module: the module, its backbone loaded.
        datamodule: the data module.
    """

    def __init__(self, trainer: FederatedTrainer, module: FedPEFTModule, datamodule: FederatedDataModule) -> None:
        self._trainer = trainer
        self.module = module
        self.datamodule = datamodule
        server = trainer.aggregation
        self.strategy: Strategy = server.strategy
        self.upload: Codec = server.upload
        self.download: Codec = server.download
        self.privacy: Optional[LocalDP] = trainer.privacy

    @property
    def releases_client_statistics(self) -> bool:
        """Whether the client may report un-noised statistics (its training loss) with its update."""
        return releases_client_statistics(self._trainer)

    @property
    def federation(self) -> Federation:
        """The run's federation as the config sets it (its seed: an attack's draws)."""
        return self._trainer.federation_of(self.datamodule.num_clients)

    def train(self, session: ClientSession, max_batches: Optional[int]) -> int:
        """Train the client of ``session`` from the state the module holds; its number of samples."""
        return self._trainer.train_client(self.module, self.datamodule, session, max_batches)

    def watch_cancellation(self, cancelled: threading.Event, error: type[Exception]) -> None:
        """Stop training with ``error`` at the next step once ``cancelled`` is set (a worker whose ClientApp went
        away); the task's :func:`train_task` then puts the module back as it found it."""
        self._trainer.callbacks.append(_Cancellation(cancelled, error))


class _Cancellation(Callback):
    runs_on = "client"

    def __init__(self, cancelled: threading.Event, error: type[Exception]) -> None:
        self.cancelled = cancelled
        self.error = error

    def on_train_batch_start(self, *args: Any) -> None:
        if self.cancelled.is_set():
            raise self.error("the task was cancelled")


def build_client(config: str) -> DeployedClient:
    """The client side of the experiment in ``config``: module with its backbone, data, strategy hooks, codecs."""
    trainer, module, datamodule, _ = build(config, server=False)
    module.configure_model()
    privacy = trainer.privacy
    if privacy is not None:  # local DP-SGD on this client, accounted here (answer_train)
        privacy.attach(module, datamodule)
        privacy.on_federation_start(trainer, module, trainer.federation_of(datamodule.num_clients))
    return DeployedClient(trainer, module, datamodule)


@functools.lru_cache(maxsize=4)
def _client(config: str) -> DeployedClient:
    """Built once per process: the backbone stays loaded while the process lives."""
    return build_client(config)


class NodeTask:
    """One message to a SuperNode's client as a :class:`~fedpeft_pl.runners.base.ClientHost`: the
    :class:`~fedpeft_pl.runners.base.ClientExecutor` of the in-process runners starts and finishes it, so
    the client's :class:`~fedpeft_pl.federation.ClientContext` is built as on every other runner.

    Args:
        node: the ClientApp's (or the worker's) client.
        kept: what the client kept from earlier rounds (:meth:`NodeStore.load`).
        model_update: what the server sent besides the state (FLoRA's merged update), if anything.
        attack: the attack this SuperNode plays (its node config's ``attack``), or None for an honest node.
    """

    def __init__(
        self,
        node: DeployedClient,
        kept: dict[str, Any],
        model_update: Optional[State] = None,
        attack: Optional[Attack] = None,
    ) -> None:
        self.node = node
        self.kept = kept
        self.model_update = model_update
        self.attack = attack
        self.own_state: State = dict(kept["own"])

    @staticmethod
    def round(client: int, server_round: int, max_batches: int, message: Optional[RoundMessage] = None) -> Round:
        """The round as this client sees it: itself, its step cap and the message it received."""
        plan = Plan(dropped=False, batches=max_batches, straggler=False)
        return Round(server_round, (client,), {client: plan}, (client,), message)

    def start_client(self, round: Round, client: int) -> Optional[ClientResult]:
        """With local DP the client checks its own budget first and declines if this round would exceed it."""
        node = self.node
        privacy = node.privacy
        if privacy is not None:
            _set_up_data(node.module, node.datamodule)  # the accountant's sampling rate needs the client's count
            privacy.load_client_accountant(client, self.kept["accountant"])
            try:
                privacy.begin(client, round.number)
            except ClientDropped as reason:
                return ClientResult(client, dropped=str(reason), received=False)
        if self.model_update is not None:
            _load_model_update(node.module, self.model_update)
        return None

    def open_session(
        self, round: Round, client: int, like: dict[str, torch.Tensor], local_init: dict[str, torch.Tensor]
    ) -> ClientSession:
        """The message holds only this client's view; its own state comes from the node."""
        node = self.node
        assert round.message is not None, "a train message carries the round's message"
        return open_session(
            node.strategy,
            node.upload,
            node.download,
            round.message,
            client,
            round.number,
            like,
            self.kept["own"],
            local_init,
            node.module.peft,
            view_sent=True,
            attack=self.attack,
        )

    def close_session(self, session: ClientSession) -> None:
        """The client's own state, for the node to store (:class:`NodeStore`)."""
        self.own_state = session.context.state


class NodeStore(ArrayStore):
    """:class:`~fedpeft_pl.deploy.node_state.ArrayStore` with torch tensors: what one client keeps between the
    rounds it trains in (its own tensors, its upload codec's residual, its DP accountant), in Flower's node
    context or, with ``state-dir`` in the node config, in one file per round on the SuperNode's disk."""

    def load(self) -> dict[str, Any]:
        """``{"own": State, "residual": State or None, "accountant": dict}``, as the client left them."""
        kept = super().load()
        residual = kept["residual"]
        return {
            "own": to_torch(kept["own"]),
            "residual": None if residual is None else to_torch(residual),
            "accountant": kept["accountant"],
        }

    def save(self, own: State, residual: Optional[State], accountant: dict[str, Any]) -> None:  # type: ignore[override]
        super().save(to_numpy(own), None if residual is None else to_numpy(residual), accountant)


def to_torch(arrays: dict[str, Any]) -> State:
    """numpy arrays (from a store or the worker's socket) as tensors, without copying writable ones."""
    return {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in arrays.items()}


def to_numpy(state: State) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}


@dataclasses.dataclass
class TrainOutcome:
    """What one train task of a deployed client gives: its reply (or why it declines) and what it keeps."""

    declined: Optional[str] = None
    payload: State = dataclasses.field(default_factory=dict)
    num_samples: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    extras: State = dataclasses.field(default_factory=dict)
    own: State = dataclasses.field(default_factory=dict)
    residual: Optional[State] = None
    accountant: dict[str, Any] = dataclasses.field(default_factory=dict)


def train_task(
    node: DeployedClient,
    kept: dict[str, Any],
    client: int,
    server_round: int,
    max_batches: int,
    message: RoundMessage,
    model_update: Optional[State] = None,
    attack: Optional[Attack] = None,
) -> TrainOutcome:
    """Train ``client`` for one round from ``message`` and what it ``kept``: the task that the ClientApp runs in its
    own process (:func:`answer_train`) and a warm worker runs for a thin ClientApp (:mod:`fedpeft_pl.deploy.worker`).

    The client task is the in-process runners' :class:`~fedpeft_pl.runners.base.ClientExecutor`, on a
    :class:`NodeTask`. The module is back in its initial state afterwards, and the upload codec holds no
    state of the client (the node keeps it), also when training raised, so the next task starts as a
    fresh process would. ``attack``: the attack the node plays (its node config's), which poisons the client's
    samples while it trains and tampers with its reply.
    """
    module = node.module
    task = NodeTask(node, kept, model_update, attack)
    # the module holds the initial state between messages; a personalised method's local part
    # starts from it the first time and from the node's own copy afterwards
    executor = ClientExecutor(task, module)
    try:
        session = executor.start(NodeTask.round(client, server_round, max_batches, message), client)
        if isinstance(session, ClientResult):
            return TrainOutcome(declined=str(session.dropped))
        session.load_into(module)
        if kept["residual"] is not None:
            node.upload.load_client_state({client: kept["residual"]})
        with poisoned(node.datamodule, attack, client):
            num_samples = node.train(session, max_batches)
        result = executor.finish(
            session, trainable_state(module), num_samples, client_metrics(node.releases_client_statistics, module)
        )
        accountant: dict[str, Any] = {}
        privacy = node.privacy
        if privacy is not None:
            privacy.end(client, server_round)
            accountant = privacy.client_accountant(client)
            result.metrics[EPSILON_SPENT] = privacy.spent(client)
        residual = node.upload.client_state([client]).get(client)
        return TrainOutcome(
            None, result.payload, num_samples, result.metrics, result.extras, task.own_state, residual, accountant
        )
    finally:
        executor.restore()  # the next message in this process starts from the initial state
        node.upload.drop_client_state([client])


def evaluate_task(
    node: DeployedClient, own: State, client: int, arrays: State, model_update: Optional[State] = None
) -> tuple[int, dict[str, float]]:
    """Evaluate ``client`` on its own test split with the received global state (and its own local part)."""
    module, datamodule = node.module, node.datamodule
    _set_up_data(module, datamodule)
    if model_update is not None:
        _load_model_update(module, model_update)
    # the module's state split as every client task splits it: what travels, and a personalised method's local part
    executor = ClientExecutor(NodeTask(node, {"own": own}), module)
    try:
        received = node.download.decode(arrays, like=executor.shared_like)
        mine = {n: own.get(LOCAL + n, t) for n, t in executor.local_init.items()}
        load_trainable_state(module, {**received, **mine})
        count, metrics = module.evaluate_on(datamodule.client_test_dataloader(client))
    finally:
        executor.restore()
    return count, metrics


def answer_evaluate(message: Message, context: Context, config: str) -> Message:
    """Evaluate the client of this SuperNode on its own test split with the received global state."""
    node = _client(config)
    settings = message.content["config"]
    client = int(settings[_CLIENT])
    partition = int(context.node_config["partition-id"])
    if client != partition:
        raise ConfigError(f"this SuperNode plays partition {partition} but was asked to evaluate client {client}")
    own = NodeStore(context, client, int(settings[_ROUND]) + 1).load()["own"]
    arrays = message.content["arrays"].to_torch_state_dict()
    count, metrics = evaluate_task(node, own, client, arrays, _model_update_of(message))
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": count, **metrics})}), reply_to=message)


def answer_train(message: Message, context: Context, config: str) -> Message:
    """Train the client of this SuperNode for one round and reply with its (encoded) update (:func:`train_task`).

    With local DP the client checks its own budget first and declines (a reply without an update
    that says why) if this round would exceed it; it reports the epsilon it has spent with its update.
    """
    started = time.perf_counter()
    node = _client(config)
    settings = dict(message.content["config"])
    client, server_round = int(settings.pop(_CLIENT)), int(settings.pop(_ROUND))
    max_batches = int(settings.pop(_MAX_BATCHES))
    version = int(settings.pop(_VERSION, 0))
    partition = int(context.node_config["partition-id"])
    if client != partition:
        raise ConfigError(f"this SuperNode plays partition {partition} but was sent client {client}")
    store = NodeStore(context, client, server_round)
    extras = message.content["extras"].to_torch_state_dict() if "extras" in message.content else {}
    round_message = RoundMessage(message.content["arrays"].to_torch_state_dict(), settings, extras, version)
    attack = node_attack(context, node, client)
    outcome = train_task(
        node, store.load(), client, server_round, max_batches, round_message, _model_update_of(message), attack
    )
    if outcome.declined is not None:
        log.info(f"round {server_round}: client {client} declines: {outcome.declined}")
        return Message(RecordDict({_DECLINED: ConfigRecord({"reason": outcome.declined})}), reply_to=message)
    store.save(outcome.own, outcome.residual, outcome.accountant)
    log.info(
        f"round {server_round}: client {client} trained on {outcome.num_samples} samples in "
        f"{time.perf_counter() - started:.1f} s (this process)"
    )
    content = reply_content(outcome.payload, outcome.num_samples, outcome.metrics, outcome.extras)
    return Message(content, reply_to=message)


def node_attack(context: Context, node: DeployedClient, client: int) -> Optional[Attack]:
    """The attack this SuperNode plays on its client, from its node config's ``attack`` (a YAML file with
    ``class_path`` and ``init_args``, or a class path); None for an honest node."""
    spec = context.node_config.get("attack")
    if not spec:
        return None
    attack = load_attack(str(spec))
    if attack.omniscient:
        raise ConfigError(
            f"node config attack {type(attack).__name__} is omniscient (it needs every honest update of the round), "
            "which a SuperNode never sees; give this node a non-omniscient attack"
        )
    _set_up_data(node.module, node.datamodule)
    attack.setup(node.federation, node.datamodule.splits.num_classes)
    attack.play([client])
    return attack


@contextlib.contextmanager
def poisoned(datamodule: Any, attack: Optional[Attack], client: int) -> Iterator[None]:
    """While the client trains, its training samples as ``attack`` poisons them (nothing for an honest node)."""
    if attack is None or not attack.poisons_data:
        yield
        return
    splits = datamodule.splits
    owners = PoisonedData.owners_of(datamodule.client_indices, frozenset([client]))
    clean = datamodule.use_splits(dataclasses.replace(splits, train=PoisonedData(splits.train, attack, owners)))
    try:
        yield
    finally:
        datamodule.use_splits(clean)


def _set_up_data(module: Any, datamodule: Any) -> None:
    if datamodule.splits is None:  # a fresh process: nothing has set the data up yet
        datamodule.data_config = module.data_config
        datamodule.setup("fit")


def _model_update(module: Any) -> Optional[ArrayRecord]:
    """What a client needs of the server's model besides the trainable state (FLoRA's merged update)."""
    update = module.peft.model_update() if getattr(getattr(module, "peft", None), "per_client_views", False) else {}
    return _to_record(update) if update else None


def _load_model_update(module: Any, update: State) -> None:
    module.peft.load_model_update(update)


def _model_update_of(message: Message) -> Optional[State]:
    """What the server sent besides the trainable state (FLoRA's merged update), if anything."""
    return message.content[_MODEL_UPDATE].to_torch_state_dict() if _MODEL_UPDATE in message.content else None


def _to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})
