"""Secure aggregation in a Flower deployment: fedpeft's rounds through Flower's own SecAgg+.

The protocol is entirely Flower's (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on
the ClientApp); this module only connects it to fedpeft's round loop:

- **Server** (:class:`SecureFlowerRunner`): each round runs the workflow's four stages (setup,
  share keys, collect masked vectors, unmask) for the round's clients. In Flower 1.42 the
  workflow reads its instructions from a legacy ``Strategy.configure_fit`` on a
  ``LegacyContext`` and hands its result to a legacy ``Strategy.aggregate_fit``, with every
  ``FitRes.parameters`` replaced by the unmasked aggregate; so a small legacy strategy here
  builds each client's ``FitIns`` from fedpeft's round message and catches that aggregate. The
  runner then hands the server one :class:`~fedpeft_pl.federation.ClientResult` whose payload
  is the sample-weighted mean of the finished clients' updates (``aggregate_of`` names them,
  ``num_samples`` is their total), so the strategy's ``aggregate_fit`` sees the mean as one update
  of all their samples. A client that fails during the protocol (a SuperNode that goes away, a
  client that drops out under ``trainer.availability``) is left out: SecAgg+ removes its masks
  from its neighbours' shares, as long as every client keeps ``reconstruction_threshold`` live
  neighbours.
- **Client** (:func:`secure_train_mod`): a mod on the ClientApp's train handler. A SecAgg+ message
  goes through ``secaggplus_mod``; in the collect stage the mod calls the ordinary train handler
  through an adapter that turns the ``FitIns`` back into fedpeft's message and the reply into a
  ``FitRes`` holding the client's update (trained minus received state), which the mod weights by
  ``num_samples / max_weight``, quantises, masks and uploads in place of the update (under
  DPFedAvg the client first clips its update to ``clip_norm`` and weighs 1, and the runner hands
  the server the sum of the clipped updates, to which DPFedAvg adds its noise). When the
  run config asks for secure aggregation, a plain train message is refused, so a server cannot
  quietly ask for an update in the clear.

What travels: each client sends two public keys, its encrypted key shares, the masked vector
(``int64`` per element in Flower 1.42, plus the weight) and its shares for unmasking; the
server measures every protocol message each way as Flower serialises it and logs the sum as
``comm/wire_bytes_down`` and ``comm/wire_bytes_up`` (a client that drops out mid-protocol has
received its task and counts there). ``comm/bytes_*`` keep fedpeft's unit, as in a simulation of
the same config: fp32 elements of the state sent to, and of one update from, each client that
takes part.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow

from fedpeft_pl.comm import CLIENT as _CLIENT
from fedpeft_pl.comm import MAX_BATCHES as _MAX_BATCHES
from fedpeft_pl.comm import ROUND as _ROUND
from fedpeft_pl.comm import wire_bytes
from fedpeft_pl.deploy.flower import FlowerRunner, _client
from fedpeft_pl.deploy.secure_aggregation import SecureAggregation
from fedpeft_pl.deploy.writer import NODE_TIMEOUT
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientResult, Round
from fedpeft_pl.privacy import DistributedDP, DPFedAvg
from fedpeft_pl.runners.base import RunnerHost

# a client that availability drops still joins the protocol and fails inside it (a dropout mid-protocol)
_DROP = "fedpeft.drop"
log = logging.getLogger(__name__)

_NAMES = "fedpeft.names"  # the order of the tensors in the FitIns parameters, one name a line
_MODULUS = 2**32  # SecAgg+'s modulus (Flower's largest)
_SAMPLES = "fedpeft.num-examples"  # a client's real sample count (FitRes.num_examples is its SecAgg+ weight)


def clip_update(update: list[np.ndarray], clip_norm: float) -> list[np.ndarray]:
    """The update scaled to L2 norm at most ``clip_norm``, as DPFedAvg's server clips each update.

    Under secure aggregation the server never sees one update, so each client clips its own
    before masking (DP-FedAvg with secure aggregation, McMahan et al. 2018).
    """
    norm = float(np.sqrt(sum(float(np.square(u, dtype=np.float64).sum()) for u in update)))
    factor = min(1.0, clip_norm / (norm + 1e-12))
    return [(u * factor).astype(u.dtype) for u in update]


class _Node:
    """What the workflow needs of a legacy ClientProxy: its node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _RoundStrategy:
    """The legacy strategy the workflow calls: it serves this round's FitIns and catches the aggregate.

    Only ``configure_fit`` and ``aggregate_fit`` are called by ``SecAggPlusWorkflow`` (Flower 1.42).
    """

    def __init__(self, instructions: dict[int, FitIns]) -> None:
        self.instructions = instructions
        self.mean: Optional[list[np.ndarray]] = None
        self.finished: list[tuple[int, dict[str, Any]]] = []  # (node id, metrics with the sample count)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[_Node, FitIns]]:
        return [(_Node(node), fitins) for node, fitins in self.instructions.items()]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        if results:  # every FitRes carries the same unmasked weighted mean; none carries its own update
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.finished = [(proxy.node_id, dict(res.metrics)) for proxy, res in results]
        return None, {}  # the workflow writes nothing back; the runner hands the mean to fedpeft's server


class _MeteredGrid:
    """The ServerApp's grid, counting every protocol message each way as Flower serialises it.

    The bytes go to the server's wire counter too (``comm/wire_bytes_*``), measured as every other
    deployment's messages are (:func:`~fedpeft_pl.comm.wire_bytes`).
    """

    def __init__(self, grid: Any, wire: Any) -> None:
        self.grid = grid
        self.wire = wire
        self.sent = 0
        self.received = 0

    def send_and_receive(self, messages: Any, *, timeout: Optional[float] = None) -> Any:
        messages = list(messages)
        sent = sum(wire_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        received = sum(wire_bytes(r.content) for r in replies if r.has_content())
        self.sent += sent
        self.received += received
        self.wire.add("down", sent)
        self.wire.add("up", received)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class SecureFlowerRunner(FlowerRunner):
    """A :class:`~fedpeft_pl.deploy.flower.FlowerRunner` whose rounds run Flower's SecAgg+ protocol.

    Args:
        loop, grid, nodes, reply_timeout: as for :class:`~fedpeft_pl.deploy.flower.FlowerRunner`.
        context: the ServerApp's context (the workflow runs on a ``LegacyContext`` made from it).
        settings: the SecAgg+ settings.
        node_timeout, query_batch: as for :class:`~fedpeft_pl.deploy.flower.FlowerRunner` (the partition queries
            of SuperNodes that join later).

    Example::

        trainer.use_runner(SecureFlowerRunner(trainer.fit_loop, grid, nodes, 600, context,
                                              SecureAggregation(num_shares=3, reconstruction_threshold=2)))
    """

    def __init__(
        self,
        loop: RunnerHost,
        grid: Any,
        nodes: dict[int, int],
        reply_timeout: float,
        context: Context,
        settings: SecureAggregation,
        node_timeout: float = NODE_TIMEOUT,
        query_batch: int = 0,
    ) -> None:
        super().__init__(loop, grid, nodes, reply_timeout, node_timeout, query_batch)
        self.context = context
        self.settings = settings
        self.workflow = SecAggPlusWorkflow(
            settings.num_shares,
            settings.reconstruction_threshold,
            max_weight=settings.max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            timeout=reply_timeout,
        )
        self.last_bytes = (0, 0)  # (sent, received) by the last round's protocol messages

    secure_aggregation = True  # the server sees only the masked sum (capabilities.check_run)

    def _workflow(self, clients: int) -> SecAggPlusWorkflow:
        """The round's workflow: the settings' own, or under DistributedDP one that carries the clients' integer
        vectors exactly: Flower's fixed point with ``clipping_range = 2**(bits-1)`` and ``quantization_range =
        2**bits`` maps an integer ``v`` in ``[-2**(bits-1), 2**(bits-1))`` to ``v + 2**(bits-1)`` without rounding,
        every client weighing 1 (``max_weight``), and the sum modulo ``2**32`` keeps it modulo ``2**bits``."""
        strategy = self.loop.server.strategy
        if not isinstance(strategy, DistributedDP):
            return self.workflow
        levels = 1 << strategy.bits
        if clients * levels >= _MODULUS:  # Flower sums the clients' weights (levels each) modulo 2**32 too
            raise ConfigError(
                f"DistributedDP with {strategy.bits} bits cannot run {clients} clients a round under SecAgg+: "
                f"{clients} * 2**{strategy.bits} must stay below 2**32; lower bits"
            )
        if self.settings.max_weight != round(self.settings.max_weight):
            raise ConfigError(
                f"DistributedDP needs an integer secure aggregation max_weight, got {self.settings.max_weight}"
            )
        return SecAggPlusWorkflow(
            self.settings.num_shares,
            self.settings.reconstruction_threshold,
            max_weight=self.settings.max_weight,
            clipping_range=float(levels // 2),  # Flower checks its type
            quantization_range=levels,
            modulus_range=_MODULUS,
            timeout=self.workflow.timeout,
        )

    def run(self, round: Round) -> Iterator[ClientResult]:
        message = round.message
        assert message is not None, "the server configures the round before clients run"
        if message.extras:
            raise ConfigError("secure aggregation cannot send a strategy's extra tensors; see check_composition")
        names = list(message.payload)
        tensors = ndarrays_to_parameters([message.payload[n].detach().cpu().numpy() for n in names])
        early: dict[int, ClientResult] = {}
        instructions: dict[int, FitIns] = {}
        for client in round.share:
            dropped = self.loop.start_client(round, client)
            if dropped is not None:
                early[client] = dropped
                if not round.plans[client].dropped:  # e.g. a spent privacy budget: it is sent nothing
                    continue
            # a client that drops out (availability) takes part in the key exchange, receives its
            # task and then fails: a dropout in the middle of the protocol, which SecAgg+ recovers from
            config = {
                **message.config,
                _ROUND: round.number,
                _CLIENT: client,
                _MAX_BATCHES: round.plans[client].batches,
                _DROP: int(dropped is not None),
                _NAMES: "\n".join(names),
            }
            instructions[self.nodes[client]] = FitIns(tensors, config)
        strategy = _RoundStrategy(instructions)
        grid = _MeteredGrid(self.grid, self.wire)
        if len(instructions) >= 2:  # SecAgg+ needs two clients at least; the workflow halts otherwise
            legacy = LegacyContext(self.context, strategy=strategy)
            # the workflow reads the round number and (for configure_fit, which ignores them) the parameters
            legacy.state = RecordDict(
                {"config": ConfigRecord({"current_round": round.number}), "parameters": ArrayRecord()}
            )
            self._workflow(len(instructions))(grid, legacy)
        self.last_bytes = (grid.sent, grid.received)
        log.info(
            f"round {round.number}: secure aggregation of {len(strategy.finished)} of {len(instructions)} clients; "
            f"protocol messages {grid.sent} bytes down, {grid.received} bytes up (as Flower serialises them)"
        )
        client_of = {node: client for client, node in self.nodes.items()}
        finished = {client_of[node]: (int(metrics.pop(_SAMPLES)), metrics) for node, metrics in strategy.finished}
        for _, metrics in finished.values():  # each client's step count travels in the clear beside its masked
            # update; counted as the plain rounds count them, or Lightning writes no round checkpoint
            self.loop.count_steps(int(metrics.get("steps", 0)))
        aggregate = self._aggregate(round, names, strategy.mean, finished) if strategy.mean is not None else None
        for client in round.share:  # sampling order; the mean takes the place of its first client
            if client in early:
                yield early[client]
            elif aggregate is not None and client in finished:
                if client == aggregate.aggregate_of[0]:
                    yield aggregate
            else:
                why = (
                    "failed during secure aggregation"
                    if strategy.mean is not None
                    else (
                        "secure aggregation did not complete (fewer clients than SecAgg+ needs, or below "
                        "reconstruction_threshold)"
                    )
                )
                yield ClientResult(client, error=RuntimeError(f"SuperNode {self.nodes[client]}: {why}"))

    def _aggregate(
        self, round: Round, names: list[str], mean: list[np.ndarray], finished: dict[int, tuple[int, dict[str, Any]]]
    ) -> ClientResult:
        server = self.loop.server
        received = server.download.decode(round.message.payload, like=server.global_state)
        if isinstance(server.strategy, DistributedDP):
            # Flower hands the mean of the clients' integer vectors (each weighing 1): times their number, rounded,
            # it is their sum modulo 2**32, hence modulo 2**bits; the strategy decodes it. Noised by every client.
            integers = np.rint(np.asarray(mean[0], dtype=np.float64) * len(finished)).astype(np.int64)
            total = server.strategy.decode_sum(integers, round.number, received, self.loop.federation)
            payload = {n: (received[n].double() + total[n]).to(received[n].dtype) for n in names}
        else:
            payload = self._mean_payload(server, names, mean, received, len(finished))
        total_samples = sum(count for count, _ in finished.values())
        keys = set.intersection(*(set(m) for _, m in finished.values()))
        metrics = {k: sum(count * float(m[k]) for count, m in finished.values()) / max(total_samples, 1) for k in keys}
        clients = tuple(c for c in round.share if c in finished)
        return ClientResult(clients[0], total_samples, payload=payload, metrics=metrics, aggregate_of=clients)

    @staticmethod
    def _mean_payload(server: Any, names: list[str], mean: list[np.ndarray], received: Any, finished: int) -> Any:
        # DPFedAvg's clients weigh 1 each, so the mean times their number is the sum of their clipped updates
        scale = finished if isinstance(server.strategy, DPFedAvg) else 1
        return {
            n: (
                received[n].float()
                + scale * torch.from_numpy(np.asarray(m, dtype=np.float64)).float().reshape(received[n].shape)
            ).to(received[n].dtype)
            for n, m in zip(names, mean)
        }


# -- client ---------------------------------------------------------------------------------------


def secure_train_mod(config: str) -> Any:
    """The ClientApp's train mod for the experiment in ``config``.

    SecAgg+ messages go through Flower's ``secaggplus_mod``, other messages as they are; with
    ``secure-aggregation = true`` in the run config, a train message outside the protocol is
    refused: the client sends its update only masked.

    Example::

        @app.train(mods=[secure_train_mod("fedpeft.yaml")])
        def train(message, context): ...
    """

    def mod(message: Message, context: Context, call_next: Any) -> Message:
        if message.metadata.message_type != MessageType.TRAIN:
            return call_next(message, context)
        settings = SecureAggregation.from_run_config(context.run_config)
        if RECORD_KEY_CONFIGS in message.content.config_records:
            return secaggplus_mod(
                message,
                context,
                lambda m, c: _train_from_fitins(m, c, call_next, settings or SecureAggregation(), config),
            )
        if settings is not None:
            raise ConfigError(
                "this deployment uses secure aggregation; the client refuses to send its update in the clear"
            )
        return call_next(message, context)

    return mod


def _train_from_fitins(
    message: Message, context: Context, call_next: Any, settings: SecureAggregation, config: str
) -> Message:
    """fedpeft's train handler behind SecAgg+'s collect stage: FitIns in, the client's update as FitRes out."""

    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    round_config = dict(fitins.config)
    names = str(round_config.pop(_NAMES)).split("\n")
    if int(round_config.get(_DROP, 0)):  # client availability: it received its task and goes offline
        raise RuntimeError(
            f"client {round_config[_CLIENT]} dropped out during secure aggregation (client availability)"
        )
    arrays = {n: torch.from_numpy(a) for n, a in zip(names, parameters_to_ndarrays(fitins.parameters))}
    message.content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(round_config)})
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    trained = reply.content["arrays"].to_torch_state_dict()
    metrics = dict(reply.content["metrics"])
    num_examples = int(metrics.pop("num-examples"))
    node = _client(config)
    received = node.download.decode(arrays, like=trained)  # the state the client started from
    update = [(trained[n].float() - received[n].float()).numpy() for n in names]
    weight_count = num_examples
    if isinstance(node.strategy, DistributedDP):  # clipped, rotated, rounded and NOISED here, before the masks
        delta = {n: torch.from_numpy(u) for n, u in zip(names, update)}
        vector = node.strategy.encode_update(
            delta, int(round_config[_ROUND]), int(round_config[_CLIENT]), node.federation, config=round_config
        )
        fitres = FitRes(
            Status(Code.OK, ""),
            ndarrays_to_parameters([vector.astype(np.float64)]),
            round(settings.max_weight),  # weighs 1: the server needs the plain sum
            {**metrics, _SAMPLES: num_examples},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)
    if isinstance(node.strategy, DPFedAvg):
        update = clip_update(update, node.strategy.clip_norm)
        weight_count = round(settings.max_weight)  # every client weighs 1: the server needs the plain sum
    weight = weight_count / settings.max_weight
    largest = max((float(np.abs(u).max()) for u in update if u.size), default=0.0) * weight
    if largest > settings.clipping_range:
        log.warning(
            f"client {round_config[_CLIENT]}: its weighted update reaches {largest:.3g}, beyond secure aggregation's "
            f"clipping_range {settings.clipping_range:g}; SecAgg+ clips it (raise --clipping-range)"
        )
    fitres = FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters(update), weight_count, {**metrics, _SAMPLES: num_examples}
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)
