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
tensors) lives in Flower's node context, so it persists across rounds on the SuperNode.

With ``secure-aggregation = true`` in the run config (``fedpeft flower-app ... --secure-aggregation``)
the rounds run Flower's SecAgg+ instead and the server is handed only the weighted mean of the
clients' updates: see :mod:`fedpeft_pl.deploy.secagg`.

Write an app directory with ``fedpeft flower-app DIR --config configs/quickstart.yaml``; README,
"Deploy across machines with Flower", has the commands. Flower is an optional dependency:
``pip install "fedpeft-pl[flower]"``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Union

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
    reply_content,
    train_content,
)
from fedpeft_pl.config import build_run
from fedpeft_pl.deploy.writer import REPLY_TIMEOUT
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.exchange import LOCAL, open_session
from fedpeft_pl.federation import ClientEvaluation, ClientResult, Round, RoundMessage, State
from fedpeft_pl.peft import load_trainable_state, local_names, trainable_state
from fedpeft_pl.runners.base import RunnerHost, client_metrics
from fedpeft_pl.trainer import FederatedTrainer

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import Grid
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('fedpeft_pl.deploy.flower needs Flower: pip install "fedpeft-pl[flower]"') from err

log = logging.getLogger(__name__)

_RESIDUAL, _OWN_STATE = "fedpeft.upload-codec", "fedpeft.client-state"


def build(config: Union[str, os.PathLike], server: bool) -> tuple[FederatedTrainer, Any, Any, dict[str, Any]]:
    """The trainer, module and data module of a ``fedpeft fit`` config, and the config's ``fit`` arguments."""
    trainer, module, datamodule, fit_args = build_run(config, save_config=server)
    if trainer.privacy is not None:
        raise ConfigError(
            "trainer.privacy (local DP) is not supported in a Flower deployment yet: its accounting runs "
            "beside the server; remove it, or use central DP (trainer.aggregation: fedpeft_pl.privacy.DPFedAvg)"
        )
    if getattr(module.peft, "per_client_views", False):
        raise ConfigError(
            f"{module.peft!r} (heterogeneous LoRA ranks or FLoRA's stacking) is not supported in a Flower deployment "
            "yet: its clients exchange views the deployed messages do not carry; run it with fedpeft fit"
        )
    return trainer, module, datamodule, fit_args


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
    """

    def __init__(
        self, loop: RunnerHost, grid: Grid, nodes: dict[int, int], reply_timeout: float = REPLY_TIMEOUT
    ) -> None:
        self.loop = loop
        self.grid = grid
        self.nodes = nodes
        self.reply_timeout = reply_timeout
        # wire bytes are those of the real messages below, not the server's own reckoning
        self.wire = loop.trainer.aggregation.wire
        self.wire.measured = True

    def run(self, round: Round) -> Iterator[ClientResult]:
        message = round.message
        assert message is not None, "the server configures the round before clients run"
        arrays = _to_record(message.payload)  # the same for every client of the round
        extras = _to_record(message.extras) if message.extras else None
        early: dict[int, ClientResult] = {}
        messages, sent = [], []
        for client in round.share:
            dropped = self.loop.start_client(round, client)
            if dropped is not None:  # a client that drops out is sent nothing
                early[client] = dropped
                continue
            content = train_content(arrays, message.config, round.number, client, round.plans[client].batches, extras)
            messages.append(Message(content, dst_node_id=self.nodes[client], message_type=MessageType.TRAIN))
            self.wire.count("down", content)
            sent.append(client)
        client_of = {self.nodes[c]: c for c in sent}
        replies = {
            client_of[r.metadata.src_node_id]: r
            for r in self.grid.send_and_receive(messages, timeout=self.reply_timeout)
        }
        for client in round.share:  # in sampling order, as one process would aggregate
            if client in early:
                yield early[client]
                continue
            yield self._result(client, replies.get(client))

    def evaluate(self, round: Round, clients: list[int]) -> Iterator[ClientEvaluation]:
        """Each client evaluates the global state (and its own local part) on its SuperNode; only metrics come back."""
        server = self.loop.trainer.aggregation
        arrays = _to_record(server.download.encode(server.global_state))
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord({_ROUND: round.number, _CLIENT: client})}),
                dst_node_id=self.nodes[client],
                message_type=MessageType.EVALUATE,
            )
            for client in clients
        ]
        client_of = {self.nodes[c]: c for c in clients}
        replies = {
            client_of[r.metadata.src_node_id]: r
            for r in self.grid.send_and_receive(messages, timeout=self.reply_timeout)
        }
        for client in clients:
            reply = replies.get(client)
            if reply is None or reply.has_error():
                reason = reply.error.reason if reply is not None else f"no reply within {self.reply_timeout:g} s"
                log.warning(f"round {round.number}: client {client} could not evaluate: {reason}")
                continue
            metrics = dict(reply.content["metrics"])
            count = int(metrics.pop("num-examples"))
            yield ClientEvaluation(client, count, {k: float(v) for k, v in metrics.items()})

    def _result(self, client: int, reply: Any) -> ClientResult:
        if reply is None or reply.has_error():
            reason = reply.error.reason if reply is not None else f"no reply within {self.reply_timeout:g} s"
            return ClientResult(client, error=RuntimeError(f"SuperNode {self.nodes[client]}: {reason}"))
        content = reply.content
        if "arrays" not in content:
            return ClientResult(client, error=RuntimeError(f"SuperNode {self.nodes[client]} replied without an update"))
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


def discover_clients(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """Wait for ``num_clients`` SuperNodes and map each one's partition id to its node id."""
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
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    nodes: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise ConfigError(
                f"SuperNode {reply.metadata.src_node_id} could not say its partition: {reply.error.reason}"
            )
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
    missing = sorted(set(range(num_clients)) - nodes.keys())
    if missing:
        raise ConfigError(f"no SuperNode answered for partition(s) {missing}; check their --node-config partition-id")
    log.info(f"{num_clients} SuperNodes, one per partition")
    return nodes


# -- client ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _client(config: str) -> tuple[FederatedTrainer, Any, Any]:
    """Built once per process: the backbone stays loaded while the process lives."""
    trainer, module, datamodule, _ = build(config, server=False)
    module.configure_model()
    return trainer, module, datamodule


def answer_query(message: Message, context: Context) -> Message:
    """The partition this SuperNode plays (the server's client discovery)."""
    partition = ConfigRecord({k: int(context.node_config[k]) for k in ("partition-id", "num-partitions")})
    return Message(RecordDict({"partition": partition}), reply_to=message)


def answer_evaluate(message: Message, context: Context, config: str) -> Message:
    """Evaluate the client of this SuperNode on its own test split with the received global state."""
    trainer, module, datamodule = _client(config)
    client = int(message.content["config"][_CLIENT])
    partition = int(context.node_config["partition-id"])
    if client != partition:
        raise ConfigError(f"this SuperNode plays partition {partition} but was asked to evaluate client {client}")
    if datamodule.splits is None:  # a fresh process: nothing has set the data up yet
        datamodule.data_config = module.data_config
        datamodule.setup("validate")
    local = local_names(module)
    start = trainable_state(module)
    shared = {n: t for n, t in start.items() if n not in local}
    received = trainer.aggregation.download.decode(message.content["arrays"].to_torch_state_dict(), like=shared)
    own = context.state[_OWN_STATE].to_torch_state_dict() if _OWN_STATE in context.state else {}
    mine = {n: own.get(LOCAL + n, t) for n, t in start.items() if n in local}
    load_trainable_state(module, {**received, **mine})
    try:
        count, metrics = module.evaluate_on(datamodule.client_test_dataloader(client))
    finally:
        load_trainable_state(module, start)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": count, **metrics})}), reply_to=message)


def answer_train(message: Message, context: Context, config: str) -> Message:
    """Train the client of this SuperNode for one round and reply with its (encoded) update."""
    started = time.perf_counter()
    trainer, module, datamodule = _client(config)
    settings = dict(message.content["config"])
    client, server_round = int(settings.pop(_CLIENT)), int(settings.pop(_ROUND))
    max_batches = int(settings.pop(_MAX_BATCHES))
    partition = int(context.node_config["partition-id"])
    if client != partition:
        raise ConfigError(f"this SuperNode plays partition {partition} but was sent client {client}")
    server = trainer.aggregation
    extras = message.content["extras"].to_torch_state_dict() if "extras" in message.content else {}
    round_message = RoundMessage(message.content["arrays"].to_torch_state_dict(), settings, extras)
    own = context.state[_OWN_STATE].to_torch_state_dict() if _OWN_STATE in context.state else {}
    # the module holds the initial state between messages; a personalised method's local part
    # starts from it the first time and from the node's own copy afterwards
    local = local_names(module)
    start = trainable_state(module)
    local_init = {n: t for n, t in start.items() if n in local}
    session = open_session(
        server.strategy,
        server.upload,
        server.download,
        round_message,
        client,
        server_round,
        {n: t for n, t in start.items() if n not in local},
        own,
        local_init,
    )
    session.load_into(module)
    if _RESIDUAL in context.state:
        server.upload.load_client_state({client: context.state[_RESIDUAL].to_torch_state_dict()})
    num_samples = trainer.train_client(module, datamodule, session, max_batches)
    result = session.finish(trainable_state(module), num_samples, client_metrics(trainer, module))
    load_trainable_state(module, start)  # the next message in this process starts from the initial state
    residual = server.upload.client_state([client]).get(client)
    if residual is not None:
        context.state[_RESIDUAL] = _to_record(residual)
    context.state[_OWN_STATE] = _to_record(session.context.state)
    log.info(
        f"round {server_round}: client {client} trained on {num_samples} samples in "
        f"{time.perf_counter() - started:.1f} s (this process)"
    )
    content = reply_content(result.payload, num_samples, result.metrics, result.extras)
    return Message(content, reply_to=message)


def _to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})
