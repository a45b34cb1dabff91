"""A Flower deployment in one process: a Grid whose SuperNodes are ClientApps called in place.

Every message crosses Flower's protobuf serialisation both ways and gets the metadata a SuperLink
gives it (run id, message id, source node); each SuperNode keeps its own Flower ``Context`` (node
config, state) across rounds; each message starts its ClientApp from nothing, as the per-message
``flwr-clientapp`` process of a real SuperNode does (the client's cached model is dropped); and a
ClientApp that raises is answered with Flower's error reply. What this leaves out is the processes
themselves: ``test_flower.py`` runs real SuperLink and SuperNode processes for that, once. A
deployment here costs seconds instead of minutes (each message of a real one starts a Python
process that imports torch and Lightning).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RUN_ID = 1
SUPERLINK_NODE = 1  # the node id Flower's grids give the ServerApp's messages


def _wire(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


class LoopbackGrid:
    """The ServerApp's side of a SuperLink whose SuperNodes (one per partition) are ``client_app``."""

    def __init__(
        self,
        client_app: Any,
        num_partitions: int,
        node_configs: dict[int, dict[str, Any]] | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        self.client_app = client_app
        self.contexts: dict[int, Context] = {}
        for partition in range(num_partitions):
            node_id = 1000 + partition
            config = {"partition-id": partition, "num-partitions": num_partitions}
            config.update((node_configs or {}).get(partition, {}))
            # a SuperNode gives its ClientApps the run's config, as the ServerApp gets it
            self.contexts[node_id] = Context(RUN_ID, node_id, config, RecordDict(), dict(run_config or {}))
        self.messages = 0
        # asynchronous use (push_messages, pull_messages): each node's reply is held for its node config's
        # "delay" seconds; a node with "die-after" stops replying after that many train messages and leaves
        self._held: dict[str, tuple[float, Message]] = {}
        self._trained: dict[int, int] = {}
        # the next pull of train replies also returns a reply to a message nobody sent, and one reply twice
        self.stray = False
        self.pulled = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        import time

        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            config = self.contexts[node].node_config if node in self.contexts else {}
            [reply] = self.send_and_receive([message])
            ids.append(message.metadata.message_id)
            if message.metadata.message_type == "train" and node in self.contexts:
                self._trained[node] = self._trained.get(node, 0) + 1
                if self._trained[node] > int(config.get("die-after", 1 << 30)):
                    del self.contexts[node]  # the SuperNode died with the message: no reply ever comes
                    continue
            self._held[message.metadata.message_id] = (time.monotonic() + float(config.get("delay", 0.0)), reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        import time

        now, replies = time.monotonic(), []
        for message_id in message_ids:
            if message_id in self._held and self._held[message_id][0] <= now:
                replies.append(self._held.pop(message_id)[1])
        if self.stray and replies and replies[0].metadata.message_type == "train":
            self.stray = False
            stray = _wire(replies[0])
            stray.metadata.__dict__["_reply_to_message_id"] = str(uuid4())  # an earlier incarnation's message
            replies += [stray, _wire(replies[0])]  # and one reply delivered twice
        self.pulled += len(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        from fedpeft_pl.deploy import flower

        replies = []
        for message in messages:
            # what a SuperLink stamps on a message it accepts
            metadata = message.metadata.__dict__
            metadata["_message_id"] = str(uuid4())
            metadata["_run_id"] = RUN_ID
            metadata["_src_node_id"] = SUPERLINK_NODE
            node = message.metadata.dst_node_id
            if node not in self.contexts:  # as the SuperLink answers for a node it does not know
                error = Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"node {node} is not connected")
                replies.append(_wire(Message(error, reply_to=message)))
                continue
            context = self.contexts[node]
            flower._client.cache_clear()  # a fresh ClientApp process for each message
            TaskIdentity._node_id = node
            try:
                reply = self.client_app(_wire(message), context)
            except Exception as ex:  # as flwr-clientapp answers for a ClientApp that raised
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"), reply_to=message
                )
            finally:
                TaskIdentity._node_id = 0
            replies.append(_wire(reply))
            self.messages += 1
        return replies


def load_app(app_dir: Path) -> Any:
    """The ``fedpeft_app`` module of an app directory written by ``fedpeft flower-app``."""
    name = f"fedpeft_app_{uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, app_dir / "fedpeft_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_loopback(
    app_dir: Path,
    num_partitions: int,
    run_config: dict[str, Any] | None = None,
    node_configs: dict[int, dict[str, Any]] | None = None,
    stray: bool = False,
    wrap: Any = None,
) -> LoopbackGrid:
    """Run the app's ServerApp to its end over a :class:`LoopbackGrid` of its ClientApp, with the run config
    of the app's ``pyproject.toml`` updated by ``run_config`` (as ``flwr run --run-config`` would); with
    ``stray`` the first pull of train replies also brings a reply to a message nobody sent and one reply twice; ``wrap``
    (a function of the app module) gives the ClientApp the SuperNodes call instead of the app's own."""
    app = load_app(app_dir)
    settings = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    settings = {**settings, **(run_config or {})}
    grid = LoopbackGrid(app.client if wrap is None else wrap(app), num_partitions, node_configs, settings)
    grid.stray = stray
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = RUN_ID, 1, 0
    try:
        app.server(grid, Context(RUN_ID, 0, {}, RecordDict(), settings))
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    return grid
