"""``fedpeft worker``: a long-lived process beside a SuperNode that keeps the frozen backbone loaded.

Flower's SuperNode starts a fresh ClientApp process for every message, which would import torch, timm
and Lightning and read the backbone again each time. A worker builds the run's module (backbone + PEFT),
its data and its client-side parts once from the app's ``fedpeft.yaml`` and answers train and evaluate
requests from thin ClientApps (:mod:`fedpeft_pl.deploy.thin`) over a Unix socket, running the same client
task as a ClientApp in its own process (:func:`~fedpeft_pl.deploy.flower.train_task`), so the replies are
the same, bit for bit::

    fedpeft worker --config my-app/fedpeft.yaml --socket /run/fedpeft/node-0/worker.sock
    flower-supernode ... --node-config 'partition-id=0 num-partitions=8 worker-socket="/run/fedpeft/node-0/worker.sock"'

Trust: the socket lives in a folder only its user can enter (made 0700 under a 0077 umask; an
existing one must be the user's and closed to others); a connecting process of another user is
turned away (``SO_PEERCRED``); frames are a JSON header and ``.npy`` arrays, never pickle, under size caps,
and name one of a fixed set of operations (:mod:`fedpeft_pl.deploy.channel`): data in, data out, no
code and no file paths. A ClientApp of another fedpeft version or another run config is refused in one line.

Faults: the worker keeps no client's state between tasks (the SuperNode does), so a restarted worker
loses nothing; a ClientApp that goes away mid-task makes the worker drop that task at its next step. It
serves one task at a time, so SuperNodes that share one worker (one per GPU) take turns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

from fedpeft_pl.deploy import channel
from fedpeft_pl.deploy.node_state import CLIENT, MAX_BATCHES, ROUND, VERSION

__all__ = ["TaskDropped", "Worker", "run"]

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 30.0  # seconds a connecting ClientApp has to say hello and send its task


class TaskDropped(RuntimeError):
    """The ClientApp that asked for the task went away: the worker stops it at the next training step."""


class Worker:
    """Serve the client tasks of the experiment in ``config`` at the Unix socket ``path``.

    Args:
        config: the app's ``fedpeft.yaml`` (the ClientApps' copies must have the same bytes).
        path: the socket; its folder is made private to this user (see the module docstring).
        max_message_bytes: the cap on one request's arrays.
    """

    def __init__(
        self,
        config: Union[str, os.PathLike],
        path: Union[str, os.PathLike],
        max_message_bytes: int = channel.MAX_MESSAGE_BYTES,
    ) -> None:
        self.config = os.fspath(config)
        self.path = Path(path).absolute()
        self.max_message_bytes = max_message_bytes
        self.digest = channel.config_digest(self.config)
        self.version = channel.fedpeft_version()
        self.node: Any = None
        self.tasks = 0  # answered
        self.dropped = 0  # dropped: their ClientApp went away
        self._gone = threading.Event()  # the current task's ClientApp went away
        self._stop = threading.Event()
        self._listener: Optional[socket.socket] = None

    def build(self) -> None:
        """The module with its backbone, the data and the client-side parts, once."""
        from fedpeft_pl.deploy.flower import build_client

        started = time.perf_counter()
        self.node = build_client(self.config)
        self.node.watch_cancellation(self._gone, TaskDropped)
        log.info(f"built the client of {self.config} in {time.perf_counter() - started:.1f} s")

    def bind(self) -> None:
        """Listen at the socket, in its private folder; refuse a path another live worker listens at."""
        folder = channel.private_directory(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_socket():
                raise ValueError(f"{self.path} exists and is not a socket; name another --socket")
            with contextlib.suppress(OSError), channel.connect(self.path, timeout=1):
                raise ValueError(f"another worker listens at {self.path}")
            self.path.unlink()  # a stale socket of a worker that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            listener.bind(os.fspath(self.path))
        finally:
            os.umask(old)
        listener.listen(64)
        self._listener = listener
        log.info(f"listening at {self.path} (folder {folder}, mode 700)")

    def serve(self) -> None:
        """Answer ClientApps one at a time until :meth:`stop`."""
        assert self._listener is not None, "bind() first"
        listener = self._listener
        listener.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                with conn:
                    try:
                        self.handle(conn)
                    except Exception as err:  # one ClientApp's broken request never stops the worker
                        log.warning(f"a request failed: {type(err).__name__}: {err}")
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def handle(self, conn: socket.socket) -> None:
        """One ClientApp: its user, its hello, its one task and the reply."""
        uid = channel.peer_uid(conn)
        if uid != os.getuid():
            log.warning(f"refused a connection of uid {uid}: the worker serves its own user ({os.getuid()}) only")
            return
        conn.settimeout(HELLO_TIMEOUT)
        hello, _ = channel.receive(conn, max_bytes=0)
        refusal = self.refusal(hello)
        if refusal is not None:
            log.warning(refusal)
            channel.send(conn, {"ok": False, "error": refusal})
            return
        channel.send(conn, {"ok": True, "fedpeft": self.version, "config": self.digest})
        request, arrays = channel.receive(conn, self.max_message_bytes)
        op = request.get("op")
        if op not in channel.OPERATIONS - {"hello"}:
            channel.send(conn, {"ok": False, "error": f"unknown operation {op!r}"})
            return
        conn.settimeout(None)
        started, cpu = time.perf_counter(), time.process_time()
        self._gone.clear()
        done = threading.Event()
        watcher = threading.Thread(target=_watch, args=(conn, self._gone, done), daemon=True)
        watcher.start()
        try:
            reply, out = self.train(request, arrays) if op == "train" else self.evaluate(request, arrays)
        except TaskDropped:
            self.dropped += 1
            log.warning(f"dropped a {op} task of client {request.get('client')}: its ClientApp went away")
            return
        except Exception as err:
            log.exception(f"a {op} task of client {request.get('client')} failed")
            reply, out = {"ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0]}, {}
        finally:
            done.set()
            watcher.join()
        if self._gone.is_set() or _closed(conn):  # it went away after the last step: nobody to answer
            self.dropped += 1
            log.warning(f"dropped the reply to a {op} task of client {request.get('client')}: its ClientApp went away")
            return
        channel.send(conn, reply, out)
        self.tasks += 1
        during = f" (round {request['round']})" if "round" in request else ""
        log.info(
            f"answered a {op} task of client {request.get('client')}{during} in {time.perf_counter() - started:.3f} s "
            f"(CPU {time.process_time() - cpu:.3f} s); {self.tasks} answered, {self.dropped} dropped"
        )

    def refusal(self, hello: dict[str, Any]) -> Optional[str]:
        """Why a ClientApp is refused (one line), or None."""
        if hello.get("op") != "hello" or hello.get("protocol") != channel.PROTOCOL:
            return f"the ClientApp speaks another protocol ({hello.get('protocol')!r}; this worker {channel.PROTOCOL})"
        if hello.get("fedpeft") != self.version or hello.get("config") != self.digest:
            return (
                f"this worker runs fedpeft {self.version} with the run config {self.digest} ({self.config}); the "
                f"ClientApp runs fedpeft {hello.get('fedpeft')} with the run config {hello.get('config')}: start the "
                "worker with the app's fedpeft.yaml and the same fedpeft"
            )
        return None

    def train(self, request: dict[str, Any], arrays: channel.Arrays) -> tuple[dict[str, Any], channel.Arrays]:
        from fedpeft_pl.deploy.flower import to_numpy, to_torch, train_task
        from fedpeft_pl.federation import RoundMessage

        settings = dict(request["config"])
        client, server_round = int(settings.pop(CLIENT)), int(settings.pop(ROUND))
        max_batches = int(settings.pop(MAX_BATCHES))
        version = int(settings.pop(VERSION, 0))
        kept = {
            "own": to_torch(arrays.get("own", {})),
            "residual": to_torch(arrays.get("residual", {})) if request.get("residual") else None,
            "accountant": dict(request.get("accountant") or {}),
        }
        message = RoundMessage(
            to_torch(arrays.get("arrays", {})), settings, to_torch(arrays.get("extras", {})), version
        )
        update = to_torch(arrays["model-update"]) if "model-update" in arrays else None
        outcome = train_task(self.node, kept, client, server_round, max_batches, message, update)
        if outcome.declined is not None:
            return {"ok": True, "declined": outcome.declined}, {}
        header = {
            "ok": True,
            "declined": None,
            "num_samples": int(outcome.num_samples),
            "metrics": {k: float(v) for k, v in outcome.metrics.items()},
            "accountant": outcome.accountant,
            "residual": outcome.residual is not None,
        }
        out = {
            "arrays": to_numpy(outcome.payload),
            "extras": to_numpy(outcome.extras),
            "own": to_numpy(outcome.own),
            "residual": to_numpy(outcome.residual or {}),
        }
        return header, out

    def evaluate(self, request: dict[str, Any], arrays: channel.Arrays) -> tuple[dict[str, Any], channel.Arrays]:
        from fedpeft_pl.deploy.flower import evaluate_task, to_torch

        update = to_torch(arrays["model-update"]) if "model-update" in arrays else None
        own, received = to_torch(arrays.get("own", {})), to_torch(arrays.get("arrays", {}))
        count, metrics = evaluate_task(self.node, own, int(request["client"]), received, update)
        values = {k: v if isinstance(v, (int, float)) else float(v) for k, v in metrics.items()}
        return {"ok": True, "count": int(count), "metrics": values}, {}


def _closed(conn: socket.socket) -> bool:
    """Whether the ClientApp has closed its end (or sent what the protocol does not allow here)."""
    readable, _, _ = select.select([conn], [], [], 0)
    return bool(readable)


def _watch(conn: socket.socket, gone: threading.Event, done: threading.Event) -> None:
    """Set ``gone`` once the ClientApp closes its end (or sends anything: one request a connection)."""
    while not done.is_set():
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable:
            gone.set()  # end of file, or bytes the protocol does not allow here
            return


def run(config: Union[str, os.PathLike], path: Union[str, os.PathLike], max_message_bytes: int) -> None:
    """``fedpeft worker`` (its arguments are read by :mod:`fedpeft_pl.cli`): build once, then serve until SIGTERM
    or Ctrl-C; a path it cannot listen at is one line (ConfigError)."""
    import signal

    from fedpeft_pl.errors import ConfigError

    if not hasattr(socket, "SO_PEERCRED"):
        raise ConfigError("fedpeft worker needs Linux (it checks who connects with SO_PEERCRED)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedpeft worker: %(message)s", stream=sys.stderr)
    worker = Worker(config, path, max_message_bytes)
    try:
        worker.bind()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    try:
        worker.build()
        print(f"fedpeft worker: serving {worker.path} (fedpeft {worker.version}, config {worker.digest})", flush=True)
        worker.serve()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
