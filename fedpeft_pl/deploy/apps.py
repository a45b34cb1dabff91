"""The Flower apps of a deployment: a ServerApp and a ClientApp built from a ``fedpeft fit`` config.

``fedpeft flower-app`` writes an app directory whose ``app.py`` calls :func:`server_app` and
:func:`client_app` (:mod:`fedpeft_pl.deploy.writer`). This module chooses between the plain rounds
of :mod:`fedpeft_pl.deploy.flower` and Flower's SecAgg+ rounds of :mod:`fedpeft_pl.deploy.secagg`;
both of those import nothing from here. Needs Flower: ``pip install "fedpeft-pl[flower]"``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Union

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid, ServerApp

from fedpeft_pl.deploy import thin
from fedpeft_pl.deploy.node_state import answer_query
from fedpeft_pl.deploy.secure_aggregation import SecureAggregation

__all__ = ["client_app", "server_app"]

log = logging.getLogger(__name__)


def server_app(config: Union[str, os.PathLike]) -> ServerApp:
    """A ServerApp that runs ``fedpeft fit`` with the given config over Flower's SuperNodes.

    Run config (``[tool.flwr.app.config]``): ``node-timeout`` (seconds to wait for the
    SuperNodes), ``reply-timeout`` (seconds to wait for a round's replies), whose defaults are
    :data:`~fedpeft_pl.deploy.writer.NODE_TIMEOUT` and :data:`~fedpeft_pl.deploy.writer.REPLY_TIMEOUT`,
    and ``query-batch`` (SuperNodes asked their partition at a time, 0 for all, the default:
    :func:`~fedpeft_pl.deploy.flower.query_partitions`) and ``pull-interval`` (seconds between the
    ServerApp's pulls of replies, :data:`~fedpeft_pl.deploy.polling.PULL_INTERVAL` by default; Flower's
    own grid waits 3 s: :class:`~fedpeft_pl.deploy.polling.PollingGrid`).
    ``resume = true`` continues the experiment from its newest ``last.ckpt`` (a ServerApp that
    died: ``flwr run DIR FEDERATION --run-config resume=true``).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # imported here: a ClientApp process loads this module too, and a thin one imports no torch
        from fedpeft_pl.deploy.flower import FlowerRunner, build, discover_clients
        from fedpeft_pl.deploy.polling import PULL_INTERVAL, PollingGrid
        from fedpeft_pl.deploy.secagg import SecureFlowerRunner
        from fedpeft_pl.deploy.writer import NODE_TIMEOUT, REPLY_TIMEOUT

        grid = PollingGrid(grid, float(context.run_config.get("pull-interval", PULL_INTERVAL)))  # type: ignore[assignment]
        trainer, module, datamodule, fit_args = build(config, server=True)
        node_timeout = float(context.run_config.get("node-timeout", NODE_TIMEOUT))
        query_batch = int(context.run_config.get("query-batch", 0))
        nodes = discover_clients(grid, datamodule.num_clients, node_timeout, query_batch)
        reply_timeout = float(context.run_config.get("reply-timeout", REPLY_TIMEOUT))
        if context.run_config.get("resume", False):  # continue from the newest round checkpoint of this config
            fit_args["ckpt_path"] = "last"
        secure = SecureAggregation.from_run_config(context.run_config)
        if secure is None:
            trainer.use_runner(FlowerRunner(trainer.fit_loop, grid, nodes, reply_timeout, node_timeout, query_batch))
        else:
            trainer.check_parts(module, secure_aggregation=True, live=True)
            runner = SecureFlowerRunner(
                trainer.fit_loop, grid, nodes, reply_timeout, context, secure, node_timeout, query_batch
            )
            trainer.use_runner(runner)
        trainer.fit(module, datamodule=datamodule, **fit_args)

    return app


def client_app(config: Union[str, os.PathLike]) -> ClientApp:
    """A ClientApp that trains the client of its SuperNode's ``partition-id`` with the given config.

    With ``worker-socket`` in the node config it is thin: it forwards each train and evaluate message
    to that warm worker (``fedpeft worker``) and imports Flower and numpy only
    (:mod:`fedpeft_pl.deploy.thin`). Without one, under secure aggregation, or on a node that plays an attack
    (its node config's ``attack``), it trains in its own process.
    """
    app = ClientApp()
    path = os.fspath(config)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return answer_query(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        if thin.worker_socket(context) is not None:
            try:
                return thin.evaluate(message, context, path)
            except thin.NoWorker as err:
                _fall_back(context, err)
        from fedpeft_pl.deploy.flower import answer_evaluate

        return answer_evaluate(message, context, path)

    @app.train(mods=[_secure_train_mod(path)])
    def train(message: Message, context: Context) -> Message:
        # an attacking node (its node config's attack, a file the worker would have to read) trains in its own process
        thin_path = not context.node_config.get("attack")
        if (
            thin_path
            and thin.worker_socket(context) is not None
            and SecureAggregation.from_run_config(context.run_config) is None
        ):
            try:
                return thin.train(message, context, path)
            except thin.NoWorker as err:
                _fall_back(context, err)
        from fedpeft_pl.deploy.flower import answer_train

        return answer_train(message, context, path)

    return app


def _fall_back(context: Context, err: thin.NoWorker) -> None:
    """Without a worker: fail the task (Flower's error reply), or with ``worker-fallback`` train in this process."""
    if not thin.falls_back(context):
        raise err
    log.warning(f"{err}; training in this ClientApp's own process (worker-fallback)")


def _secure_train_mod(path: str) -> Any:
    """Flower's SecAgg+ around the train handler (:func:`~fedpeft_pl.deploy.secagg.secure_train_mod`), imported
    only for a message or a run that uses it."""

    def mod(message: Message, context: Context, call_next: Any) -> Message:
        if message.metadata.message_type == MessageType.TRAIN and (
            RECORD_KEY_CONFIGS in message.content.config_records
            or SecureAggregation.from_run_config(context.run_config) is not None
        ):
            from fedpeft_pl.deploy.secagg import secure_train_mod

            return secure_train_mod(path)(message, context, call_next)
        return call_next(message, context)

    return mod
