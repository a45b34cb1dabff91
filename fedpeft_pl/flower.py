"""Deploy across machines with Flower: a ServerApp and a ClientApp built from a ``fedpeft`` config.

Flower (https://flower.ai, Message API) moves the messages; everything else is fedpeft's own,
built from the same YAML as ``fedpeft fit``:

- The **ServerApp** runs a :class:`~fedpeft_pl.loop.FederatedTrainer` whose rounds send train
  messages to SuperNodes instead of training in-process. Client sampling, availability, the
  aggregation strategy, the codecs, the byte counter, evaluation on the test split, TensorBoard
  tags and checkpoints are exactly those of a simulation.
- The **ClientApp** answers a train message by loading the received trainable tensors into its
  module, training the one client its SuperNode plays (``partition-id`` in the node config) for
  that round with :meth:`~fedpeft_pl.loop.FederatedTrainer.train_client`, and replying with its
  (encoded) update and sample count. Only trainable tensors travel.

A client trains under the seed of its round and partition, as it would in a simulation, so a
deployment with the same config and seed reaches the simulation's global state.

Flower's SuperNode starts a fresh ClientApp process for every message (Flower's design; see
flwrlabs/flower#3670), so the backbone is read from local disk once per message. Within one
process (Flower's simulation engine reuses its workers) the module with its backbone is built
once and kept. Per-client codec state (Int8 error feedback) lives in Flower's node context.

Write an app directory with ``fedpeft flower-app DIR --config configs/quickstart.yaml``; README,
"Deploy across machines with Flower", has the commands. Flower is an optional dependency:
``pip install "fedpeft-pl[flower]"``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

from fedpeft_pl.aggregation import decode_update, encode_update
from fedpeft_pl.comm import CLIENT as _CLIENT, MAX_BATCHES as _MAX_BATCHES, ROUND as _ROUND, reply_content, train_content
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.loop import FederatedLoop, FederatedTrainer
from fedpeft_pl.peft import load_trainable_state, trainable_state
from fedpeft_pl.privacy import releases_client_statistics

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('fedpeft_pl.flower needs Flower: pip install "fedpeft-pl[flower]"') from err

log = logging.getLogger(__name__)

_RESIDUAL = "fedpeft.upload-codec"


def build(config: Union[str, os.PathLike], server: bool) -> tuple[FederatedTrainer, Any, Any, dict[str, Any]]:
    """The trainer, module and data module of a ``fedpeft fit`` config, as the CLI builds them,
    and the config's arguments of ``fit`` itself (``ckpt_path``, ``weights_only``)."""
    from fedpeft_pl.cli import FedPEFTCLI, _configure_logging

    _configure_logging()
    settings = yaml.safe_load(Path(config).read_text())
    if not isinstance(settings, dict):
        raise ConfigError(f"{os.fspath(config)!r} is not a fedpeft config (a YAML mapping with trainer, model and data)")
    fit_args = {k: settings.pop(k) for k in ("ckpt_path", "weights_only") if k in settings}
    kwargs = {} if server else {"save_config_callback": None}
    with _own_argv():
        cli = FedPEFTCLI(args=["--config", yaml.safe_dump(settings)], run=False, **kwargs)
    trainer = cli.trainer
    if trainer.privacy is not None:
        raise ConfigError(
            "trainer.privacy (local DP) is not supported in a Flower deployment yet: its accounting runs "
            "beside the server; remove it, or use central DP (trainer.aggregation: fedpeft_pl.privacy.DPFedAvg)"
        )
    return trainer, cli.model, cli.datamodule, fit_args


# -- server ---------------------------------------------------------------------------------------


class FlowerLoop(FederatedLoop):
    """A federated loop whose clients train on Flower SuperNodes.

    Args:
        grid: the ServerApp's grid.
        nodes: SuperNode id of each client (partition id).
        reply_timeout: seconds to wait for a round's replies; a client that has not replied by
            then is left out of the round as failed.
    """

    def __init__(self, loop: FederatedLoop, grid: Grid, nodes: dict[int, int], reply_timeout: float) -> None:
        super().__init__(
            loop.trainer, loop.num_rounds, loop.clients_per_round, loop.local_epochs, loop.seed,
            client_sampling=loop.client_sampling, availability=loop.availability,
        )
        self.grid = grid
        self.nodes = nodes
        self.reply_timeout = reply_timeout
        # wire bytes are those of the real messages below, not the server's own reckoning
        self.trainer.aggregation.wire.measured = True

    def own_share(self, clients: list[int]) -> list[int]:
        return clients

    def _run_clients(self, server_round: int, clients: list[int]) -> list[BaseException]:
        trainer = self.trainer
        module = trainer.lightning_module
        aggregation = trainer.aggregation
        encoded, round_config = aggregation.round_payload  # the same for every client of the round
        payload = {k: v.detach().cpu().contiguous() for k, v in encoded.items()}
        messages, sent = [], []
        for client in clients:
            if not self.start_client(server_round, client):
                continue
            content = train_content(payload, round_config, server_round, client, self.round_plans[client].batches)
            messages.append(Message(content, dst_node_id=self.nodes[client], message_type=MessageType.TRAIN))
            aggregation.wire.count("down", messages[-1].content)
            sent.append(client)
        self.client = None
        client_of = {self.nodes[c]: c for c in sent}
        replies = {client_of[r.metadata.src_node_id]: r for r in self.grid.send_and_receive(messages, timeout=self.reply_timeout)}
        failures: list[BaseException] = []
        for client in sent:  # in sampling order, as one process would aggregate
            reply = replies.get(client)
            if reply is None or reply.has_error():
                reason = reply.error.reason if reply is not None else f"no reply within {self.reply_timeout:g} s"
                error = RuntimeError(f"SuperNode {self.nodes[client]}: {reason}")
                failures.append(error)
                self.client_failed(server_round, client, error)
                continue
            metrics = reply.content["metrics"]
            aggregation.wire.count("up", reply.content)
            self.uploads[client] = {k: v.to(module.device) for k, v in reply.content["arrays"].to_torch_state_dict().items()}
            if hasattr(module, "track_loss") and metrics.get("train-samples", 0) > 0:
                module.track_loss(torch.tensor(float(metrics["train-loss-sum"])), int(metrics["train-samples"]))
            self.client = client
            self._call_federated_hook("on_client_end", client, int(metrics["num-examples"]))
        self.client = None
        return failures


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
            raise ConfigError(f"SuperNode {reply.metadata.src_node_id} could not say its partition: {reply.error.reason}")
        partition = reply.content["partition"]
        pid, count = int(partition["partition-id"]), int(partition["num-partitions"])
        if count != num_clients:
            raise ConfigError(
                f"SuperNode {reply.metadata.src_node_id} has num-partitions={count} but data.num_clients is "
                f"{num_clients}; start every SuperNode with --node-config 'partition-id=<i> num-partitions={num_clients}'"
            )
        if pid in nodes:
            raise ConfigError(f"two SuperNodes have partition-id={pid}; give every SuperNode its own partition-id")
        nodes[pid] = reply.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - nodes.keys())
    if missing:
        raise ConfigError(f"no SuperNode answered for partition(s) {missing}; check their --node-config partition-id")
    log.info(f"{num_clients} SuperNodes, one per partition")
    return nodes


def server_app(config: Union[str, os.PathLike]) -> ServerApp:
    """A ServerApp that runs ``fedpeft fit`` with the given config over Flower's SuperNodes.

    Run config (``[tool.flwr.app.config]``): ``node-timeout`` (seconds to wait for the
    SuperNodes, default 300) and ``reply-timeout`` (seconds to wait for a round's replies,
    default 3600).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        trainer, module, datamodule, fit_args = build(config, server=True)
        nodes = discover_clients(grid, datamodule.num_clients, float(context.run_config.get("node-timeout", 300)))
        trainer.fit_loop = FlowerLoop(trainer.fit_loop, grid, nodes, float(context.run_config.get("reply-timeout", 3600)))
        trainer.fit(module, datamodule=datamodule, **fit_args)

    return app


# -- client ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _client(config: str) -> tuple[FederatedTrainer, Any, Any]:
    """Built once per process: the backbone stays loaded while the process lives."""
    trainer, module, datamodule, _ = build(config, server=False)
    module.configure_model()
    return trainer, module, datamodule


def client_app(config: Union[str, os.PathLike]) -> ClientApp:
    """A ClientApp that trains the client of its SuperNode's ``partition-id`` with the given config."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        partition = ConfigRecord({k: int(context.node_config[k]) for k in ("partition-id", "num-partitions")})
        return Message(RecordDict({"partition": partition}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        started = time.perf_counter()
        trainer, module, datamodule = _client(os.fspath(config))
        settings = dict(message.content["config"])
        client, server_round = int(settings.pop(_CLIENT)), int(settings.pop(_ROUND))
        max_batches = int(settings.pop(_MAX_BATCHES))
        partition = int(context.node_config["partition-id"])
        if client != partition:
            raise ConfigError(f"this SuperNode plays partition {partition} but was sent client {client}")
        server = trainer.aggregation
        received = server.download.decode(message.content["arrays"].to_torch_state_dict(), like=trainable_state(module))
        load_trainable_state(module, received)
        module.fit_config = settings
        if _RESIDUAL in context.state:
            server.upload.load_client_state({client: context.state[_RESIDUAL].to_torch_state_dict()})
        num_samples = trainer.train_client(module, datamodule, server_round, client, max_batches)
        payload = encode_update(server.upload, trainable_state(module), received, client)
        residual = server.upload.client_state([client]).get(client)
        if residual is not None:
            context.state[_RESIDUAL] = _to_record(residual)
        loss = None
        if releases_client_statistics(trainer):  # a private run's clients keep their un-noised loss
            loss_sum = getattr(module, "_loss_sum", None)
            loss = (float(loss_sum) if loss_sum is not None else 0.0, int(getattr(module, "_loss_count", 0)))
        log.info(
            f"round {server_round}: client {client} trained on {num_samples} samples in "
            f"{time.perf_counter() - started:.1f} s (this process)"
        )
        return Message(reply_content(payload, num_samples, loss), reply_to=message)

    return app


@contextlib.contextmanager
def _own_argv() -> Any:
    """LightningCLI given ``args`` warns about the process's own command line (Flower's, here); hide it."""
    saved = sys.argv[:]
    sys.argv[1:] = []
    try:
        yield
    finally:
        sys.argv[:] = saved


def _to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


# -- the app directory ----------------------------------------------------------------------------

_PYPROJECT = """\
# A Flower app written by `fedpeft flower-app`; fedpeft.yaml beside it is the whole experiment.
# Every machine needs fedpeft-pl with Flower installed: pip install "fedpeft-pl[flower]"
[project]
name = "{name}"
version = "1.0.0"
description = "fedpeft-pl federated PEFT, deployed with Flower"
dependencies = []

[tool.flwr.app]
publisher = "fedpeft"

[tool.flwr.app.components]
serverapp = "fedpeft_app:server"
clientapp = "fedpeft_app:client"

[tool.flwr.app.config]
node-timeout = 300
reply-timeout = 3600
"""

_APP = '''\
"""Flower entry points for the experiment in fedpeft.yaml (written by `fedpeft flower-app`)."""

from pathlib import Path

from fedpeft_pl.flower import client_app, server_app

CONFIG = Path(__file__).with_name("fedpeft.yaml")
server = server_app(CONFIG)
client = client_app(CONFIG)
'''


def write_app(directory: Union[str, os.PathLike], fit_args: list[str], name: Optional[str] = None) -> Path:
    """Write a Flower app directory for the config that ``fedpeft fit <fit_args>`` would run.

    The config is resolved (every ``--config`` and override merged) into ``fedpeft.yaml``.
    """
    from fedpeft_pl.cli import FedPEFTCLI

    out = io.StringIO()
    with contextlib.redirect_stdout(out), _own_argv():
        try:
            FedPEFTCLI(args=["fit", *fit_args, "--print_config"])
        except SystemExit as done:
            if done.code not in (0, None):
                raise
    text = out.getvalue()
    if "trainer:" not in text:
        raise ConfigError("could not resolve the config; check it with: fedpeft fit <the same arguments> --print_config")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fedpeft.yaml").write_text(text)
    (directory / "fedpeft_app.py").write_text(_APP)
    (directory / "pyproject.toml").write_text(_PYPROJECT.format(name=name or _project_name(directory)))
    return directory


def _project_name(directory: Path) -> str:
    name = "".join(c if c.isalnum() else "-" for c in directory.resolve().name.lower()).strip("-")
    return name or "fedpeft-app"
