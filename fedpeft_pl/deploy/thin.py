"""The thin ClientApp: forward a message to the warm worker beside the SuperNode, and its reply back.

Flower starts a fresh ClientApp process for every message. When the SuperNode's node config names a
worker (``worker-socket="/run/fedpeft/node-0/worker.sock"``), that process imports Flower and numpy only
(no torch, timm or Lightning): it loads what its client kept (:class:`~fedpeft_pl.deploy.node_state.ArrayStore`:
the node context or ``state-dir``, as without a worker), sends the message's arrays, config and the kept
state to the worker (:mod:`fedpeft_pl.deploy.channel`), stores what the worker says the client keeps and
replies with the worker's answer. The worker (``fedpeft worker``, :mod:`fedpeft_pl.deploy.worker`) runs the
same client task the ClientApp runs in its own process, so the replies are the same, bit for bit.

Faults: no worker listening, or a worker of another fedpeft version or run config, is :class:`NoWorker`:
the ClientApp fails the task (Flower's error reply) or, with ``worker-fallback=true`` in the node config,
trains in its own process. A worker that goes away mid-task fails the task (Flower's error reply); the
client's state is stored only from a complete reply, so the next round starts from what it kept before.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from typing import Any, Optional, Union

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedpeft_pl.deploy import channel
from fedpeft_pl.deploy.node_state import (
    CLIENT,
    DECLINED,
    MAX_BATCHES,
    MODEL_UPDATE,
    ROUND,
    VERSION,
    ArrayStore,
    from_record,
    to_record,
)
from fedpeft_pl.errors import ConfigError

__all__ = ["NoWorker", "evaluate", "falls_back", "train", "worker_socket"]

# Flower's logger has the handler that a ClientApp process prints through (into its SuperNode's log); a
# logger of our own would print warnings only there
log = logging.getLogger("flwr").getChild(__name__)

CONNECT_TIMEOUT = (
    10.0  # seconds to reach the socket; a task then takes as long as it takes (a dead worker's socket closes)
)


class NoWorker(RuntimeError):
    """No worker answers at the configured socket, or it refused this ClientApp (another version or config)."""


def worker_socket(context: Context) -> Optional[str]:
    """The worker socket the SuperNode's node config names (``worker-socket``), if any."""
    path = context.node_config.get(channel.SOCKET_KEY)
    return str(path) if path else None


def falls_back(context: Context) -> bool:
    """Whether the node config says to train in the ClientApp's own process when no worker answers."""
    value = context.node_config.get(channel.FALLBACK_KEY, False)
    return value is True or str(value).lower() in ("true", "1", "yes")


def train(message: Message, context: Context, config: Union[str, os.PathLike]) -> Message:
    """Answer a train message through the worker: the reply the ClientApp would give in its own process."""
    started, cpu = time.perf_counter(), time.process_time()
    received: Any = message.content  # Flower's records, typed loosely
    settings: dict[str, Any] = dict(received["config"])
    client, server_round = int(settings[CLIENT]), int(settings[ROUND])
    _check_partition(context, client, "was sent client")
    store = ArrayStore(context, client, server_round)
    kept = store.load()
    request = {
        "op": "train",
        "config": _plain(settings),
        "client": client,
        "round": server_round,
        "max_batches": int(settings[MAX_BATCHES]),
        "version": int(settings.get(VERSION, 0)),
        "accountant": kept["accountant"],
        "residual": kept["residual"] is not None,
    }
    arrays = {"arrays": from_record(received["arrays"]), "own": kept["own"], "residual": kept["residual"] or {}}
    if "extras" in received:
        arrays["extras"] = from_record(received["extras"])
    if MODEL_UPDATE in received:
        arrays["model-update"] = from_record(received[MODEL_UPDATE])
    asked = time.perf_counter()
    header, out = _exchange(context, config, request, arrays)
    waited = time.perf_counter() - asked
    if header.get("declined") is not None:
        log.info(f"round {server_round}: client {client} declines: {header['declined']}")
        return Message(RecordDict({DECLINED: ConfigRecord({"reason": str(header["declined"])})}), reply_to=message)
    store.save(out.get("own", {}), out.get("residual", {}) if header["residual"] else None, header["accountant"])
    metrics: dict[str, Any] = {"num-examples": int(header["num_samples"])}
    metrics.update((k, float(v)) for k, v in header["metrics"].items())
    content: dict[str, Any] = {"arrays": to_record(out.get("arrays", {})), "metrics": MetricRecord(metrics)}
    if out.get("extras"):
        content["extras"] = to_record(out["extras"])
    log.info(
        f"round {server_round}: client {client} trained on {header['num_samples']} samples in "
        f"{time.perf_counter() - started:.1f} s (worker {worker_socket(context)}, {waited:.3f} s of it); "
        f"{this_process(cpu)}"
    )
    return Message(RecordDict(content), reply_to=message)


def evaluate(message: Message, context: Context, config: Union[str, os.PathLike]) -> Message:
    """Answer an evaluate message through the worker."""
    cpu = time.process_time()
    received: Any = message.content
    settings = received["config"]
    client = int(settings[CLIENT])
    _check_partition(context, client, "was asked to evaluate client")
    own = ArrayStore(context, client, int(settings[ROUND]) + 1).load()["own"]
    arrays = {"arrays": from_record(received["arrays"]), "own": own}
    if MODEL_UPDATE in received:
        arrays["model-update"] = from_record(received[MODEL_UPDATE])
    asked = time.perf_counter()
    header, _ = _exchange(context, config, {"op": "evaluate", "client": client}, arrays)
    log.info(
        f"round {settings[ROUND]}: client {client} evaluated (worker {worker_socket(context)}, "
        f"{time.perf_counter() - asked:.3f} s); {this_process(cpu)}"
    )
    metrics: dict[str, Any] = {"num-examples": int(header["count"]), **header["metrics"]}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


def this_process(cpu_before: float) -> str:
    """What this ClientApp process has cost so far, for its log: seconds since it started (Flower's start, the
    imports, the message), its CPU seconds (of which those after ``cpu_before``, the message's) and its peak
    RSS (Linux; "?" where not known)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
            age = f"{float(uptime.read().split()[0]) - ticks / os.sysconf('SC_CLK_TCK'):.2f}"
    except (OSError, ValueError, IndexError):
        age = "?"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    now = time.process_time()
    return (
        f"this process: {age} s since its start, CPU {now:.3f} s ({now - cpu_before:.3f} s for the message), "
        f"peak RSS {peak:.0f} MiB"
    )


def _check_partition(context: Context, client: int, says: str) -> None:
    partition = int(context.node_config["partition-id"])
    if client != partition:
        raise ConfigError(f"this SuperNode plays partition {partition} but {says} {client}")


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """The round config as JSON: numbers, strings, booleans and lists of them travel; bytes do not."""
    for key, value in settings.items():
        if isinstance(value, bytes) or (isinstance(value, list) and any(isinstance(v, bytes) for v in value)):
            raise ConfigError(f"the round config's {key!r} holds bytes, which a fedpeft worker is not sent")
    return settings


def _exchange(
    context: Context, config: Union[str, os.PathLike], request: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]]
) -> tuple[dict[str, Any], channel.Arrays]:
    """Say hello, send one task, return the worker's answer; NoWorker before the task is sent, RuntimeError after."""
    path = worker_socket(context)
    assert path is not None, "a thin ClientApp needs worker-socket in its node config"
    try:
        sock = channel.connect(path, CONNECT_TIMEOUT)
    except OSError as err:
        raise NoWorker(f"no fedpeft worker listens at {path}: {err.strerror or err}") from err
    with sock:
        sock.settimeout(None)  # a worker serving another SuperNode's task first answers when it is done
        try:
            channel.send(sock, channel.hello(config))
            answer, _ = channel.receive(sock, max_bytes=0)
        except (OSError, channel.ChannelError) as err:
            raise NoWorker(f"the fedpeft worker at {path} did not answer: {err}") from err
        if not answer.get("ok"):
            raise NoWorker(f"the fedpeft worker at {path} refused: {answer.get('error', 'no reason given')}")
        try:
            channel.send(sock, request, arrays)
            header, out = channel.receive(sock)
        except (OSError, channel.ChannelError) as err:
            raise RuntimeError(f"the fedpeft worker at {path} went away mid-task: {err}") from err
    if not header.get("ok"):
        raise RuntimeError(f"the fedpeft worker at {path} failed the task: {header.get('error', 'no reason given')}")
    return header, out
