"""A Flower federation on this machine: a SuperLink and one SuperNode per partition, on 127.0.0.1.

For trying a written app with real processes before it goes to real machines, and for what only
processes show: a SuperNode or the ServerApp that dies (the fault test, ``benchmarks/soak.py``)::

    from fedpeft_pl.deploy.local import LocalFederation

    with LocalFederation("flwr-local", num_nodes=3, state_dirs=True) as federation:
        result = federation.run("my-app")           # flwr run my-app local --stream
        print(result.stdout)

Everything is insecure (no TLS, no node authentication) and listens on 127.0.0.1 only; each
process runs in its own process group with its output in ``ROOT/<name>.log``, and leaving the
``with`` block (or :meth:`LocalFederation.down`) stops them all, with the ClientApp and ServerApp
processes they started. Needs Flower: ``pip install "fedpeft-pl[flower]"``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["LocalFederation", "free_port", "rounds_ended"]

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr beside this Python
_CONNECTED = "SuperNode ID:"  # what a SuperNode logs once the SuperLink has registered it
_SERVING = "fedpeft worker: serving"  # what a worker prints once its module is built and it answers
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # read by every flower-superexec at its start (flwr 1.42)
TASK_POLL_INTERVAL = 0.2  # seconds; Flower's default is 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes (``partition-id`` 0 to ``num_nodes - 1``) as processes.

    Args:
        root: folder for the logs, Flower's home (its ``config.toml`` names this federation) and,
            with ``state_dirs``, each SuperNode's ``node-<i>`` state folder.
        num_nodes: SuperNodes, one per partition (the app's ``data.num_clients``).
        state_dirs: give each SuperNode a ``state-dir`` in its node config, so its clients' state
            survives the SuperNode's restart and a resumed ServerApp.
        name: the federation's name for ``flwr run APP NAME``.
        env: variables added to the processes' environment (``PYTHONPATH`` for a callback the app names).
        worker_config: an app's ``fedpeft.yaml``: start warm workers (``fedpeft worker``) beside the SuperNodes
            and name a worker's socket in each node's config: its ClientApps are thin (:mod:`fedpeft_pl.deploy.thin`).
            :meth:`kill_worker` and :meth:`start_worker` stop and restart one; nothing restarts a worker by itself.
        nodes_per_worker: SuperNodes that share one worker (with ``worker_config``): worker ``w`` serves
            SuperNodes ``w * nodes_per_worker`` to ``(w + 1) * nodes_per_worker - 1``, one task at a time;
            1 (the default) gives each SuperNode its own.
        worker_threads: torch's threads in each worker (its ``OMP_NUM_THREADS``); None gives each worker its share
            of this machine's cores (at least 1), since the workers train at once: each with torch's default of
            every core made a step of the quickstart 5 to 10 times dearer on a busy 2-core machine
            (benchmarks/README.md, "Soak"). An ``OMP_NUM_THREADS`` in ``env`` wins.
        task_poll_interval: seconds between the SuperExecs' asks for a task to launch (Flower's
            ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 1 s by default): the SuperLink's SuperExec starts the
            ServerApp, each SuperNode's starts a ClientApp per message, each up to this late. None keeps
            Flower's default; a value the environment (``env``) already sets wins. docs/deploy.md, "What Flower's
            polling costs", measures it.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        num_nodes: int,
        state_dirs: bool = False,
        name: str = "local",
        env: Optional[dict[str, str]] = None,
        worker_config: Union[str, os.PathLike, None] = None,
        task_poll_interval: Optional[float] = TASK_POLL_INTERVAL,
        nodes_per_worker: int = 1,
        worker_threads: Optional[int] = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        if nodes_per_worker < 1:
            raise ValueError(f"nodes_per_worker must be at least 1, got {nodes_per_worker}")
        self.root = Path(root).resolve()  # the processes run in it: every path they are given is absolute
        self.num_nodes = num_nodes
        self.state_dirs = state_dirs
        self.name = name
        self.port = free_port()
        self.env = dict(
            os.environ,
            FLWR_HOME=str(self.root / "flwr-home"),
            FLWR_TELEMETRY_ENABLED="0",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        )
        if task_poll_interval is not None:
            self.env.setdefault(TASK_POLL_ENV, f"{task_poll_interval:g}")
        self.processes: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.superlink: Optional[subprocess.Popen[bytes]] = None
        self._connected: dict[int, int] = {}  # per node: "SuperNode ID" lines in its log before its newest start
        self.worker_config = Path(worker_config).resolve() if worker_config is not None else None
        self.nodes_per_worker = nodes_per_worker
        self.num_workers = -(-num_nodes // nodes_per_worker) if worker_config is not None else 0
        self.workers: dict[int, subprocess.Popen[bytes]] = {}  # by worker number
        if worker_threads is None:
            worker_threads = max(1, (os.cpu_count() or 1) // max(1, self.num_workers))
        threads = (env or {}).get("OMP_NUM_THREADS", str(worker_threads))
        self.worker_env = dict(self.env, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        self._sockets: Optional[Path] = None  # a short private folder: a socket's path is at most 107 bytes

    def __enter__(self) -> LocalFederation:
        self.up()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.down()

    def start(self, *command: str, log: str) -> subprocess.Popen[bytes]:
        """Start one of Flower's commands in its own process group, its output appended to ``ROOT/log``."""
        return self._spawn([str(BIN / command[0]), *command[1:]], log)

    def worker_of(self, i: int) -> int:
        """The number of the worker that serves SuperNode ``i`` (``i // nodes_per_worker``)."""
        return i // self.nodes_per_worker

    def worker_socket(self, i: int) -> Path:
        """Where the worker of SuperNode ``i`` listens (with ``worker_config``)."""
        return self._socket_of_worker(self.worker_of(i))

    def _socket_of_worker(self, w: int) -> Path:
        if self._sockets is None:
            self._sockets = Path(tempfile.mkdtemp(prefix="fedpeft-workers-"))  # 0700
        return self._sockets / f"worker-{w}" / "worker.sock"

    def start_worker(self, w: int, timeout: float = 300) -> None:
        """Start (or restart) worker ``w`` (SuperNode ``w``'s own with one node per worker); return once it serves
        (its log, ``ROOT/worker-<w>.log``, says so)."""
        self._await_worker(w, self._launch_worker(w), timeout)

    def _launch_worker(self, w: int) -> int:
        """Start worker ``w``; how many times its log said it serves before."""
        assert self.worker_config is not None, "LocalFederation(worker_config=...) starts workers"
        if not 0 <= w < self.num_workers:
            raise ValueError(f"there are workers 0 to {self.num_workers - 1}, not {w}")
        log = self.root / f"worker-{w}.log"
        before = log.read_text().count(_SERVING) if log.exists() else 0
        command = [sys.executable, "-m", "fedpeft_pl.cli", "worker", "--config", str(self.worker_config)]
        self.workers[w] = self._spawn([*command, "--socket", str(self._socket_of_worker(w))], log.name, self.worker_env)
        return before

    def _await_worker(self, w: int, before: int, timeout: float, started: Optional[float] = None) -> None:
        """Wait until worker ``w``'s log says it serves for the ``before + 1``-th time, at most ``timeout`` seconds
        from ``started`` (now by default)."""
        log = self.root / f"worker-{w}.log"
        deadline = (time.monotonic() if started is None else started) + timeout
        while log.read_text().count(_SERVING) <= before:
            if self.workers[w].poll() is not None:
                raise RuntimeError(f"worker {w} exited at start:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {w} did not serve within {timeout:g} s:\n{self.logs()}")
            time.sleep(0.2)

    def kill_worker(self, w: int) -> None:
        """SIGKILL worker ``w``, as one that crashes: its socket stays, nobody answers it."""
        _signal_group(self.workers[w], signal.SIGKILL)
        self.workers[w].wait(timeout=10)

    def _spawn(self, argv: list[str], log: str, env: Optional[dict[str, str]] = None) -> subprocess.Popen[bytes]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / log, "a") as out:
            process = subprocess.Popen(
                argv,
                cwd=self.root,
                env=self.env if env is None else env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def start_node(self, i: int) -> None:
        """Start (or restart) the SuperNode of partition ``i``."""
        log = self.root / f"supernode-{i}.log"
        self._connected[i] = log.read_text().count(_CONNECTED) if log.exists() else 0
        config = f"partition-id={i} num-partitions={self.num_nodes}"
        if self.state_dirs:
            config += f' state-dir="{self.root / f"node-{i}"}"'
        if self.worker_config is not None:
            config += f' worker-socket="{self.worker_socket(i)}"'
        self.nodes[i] = self.start(
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            config,
            log=f"supernode-{i}.log",
        )

    def up(self, timeout: float = 120) -> None:
        """Start the SuperLink and every SuperNode; return once every SuperNode has connected. Whatever
        was started is stopped again if that fails."""
        try:
            self._up(timeout)
        except BaseException:
            self.down()
            raise

    def _up(self, timeout: float) -> None:
        self.superlink = self.start(
            "flower-superlink",
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--port",
            str(self.port),
            log="superlink.log",
        )
        if self.worker_config is not None:  # each builds its module once, all at once
            started = {w: self._launch_worker(w) for w in range(self.num_workers)}
            since = time.monotonic()
            for w, before in started.items():
                self._await_worker(w, before, timeout, since)
        for i in range(self.num_nodes):
            self.start_node(i)
        deadline = time.monotonic() + timeout
        while True:  # the SuperLink takes a few seconds to listen
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the SuperLink did not listen within {timeout:g} s:\n{self.logs()}") from err
                time.sleep(0.5)
        self.wait_for_nodes(deadline - time.monotonic())
        home = self.root / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.name}"\n\n[superlink.{self.name}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def wait_for_nodes(self, timeout: float = 120, retries: int = 3) -> None:
        """Until every SuperNode has connected to the SuperLink (its log names its node id).

        A SuperNode whose port was taken between :func:`free_port` and its bind (another process's
        outgoing connection can get it) exits at once; it is started again on another port, up to
        ``retries`` times.
        """
        deadline = time.monotonic() + timeout
        restarts = dict.fromkeys(self.nodes, 0)
        waiting = set(self.nodes)
        while waiting:
            for i in sorted(waiting):
                # each start appends to the node's log; its newest start has connected once the log
                # names one node id more than before that start
                connected = (self.root / f"supernode-{i}.log").read_text().count(_CONNECTED) > self._connected[i]
                if self.nodes[i].poll() is None and connected:
                    waiting.discard(i)
                elif self.nodes[i].poll() is not None:
                    if restarts[i] >= retries:
                        raise RuntimeError(f"SuperNode {i} exited {retries + 1} times at start:\n{self.logs()}")
                    restarts[i] += 1
                    self.start_node(i)
            if waiting and time.monotonic() > deadline:
                late = sorted(waiting)
                raise RuntimeError(f"SuperNode(s) {late} did not connect within {timeout:g} s:\n{self.logs()}")
            time.sleep(0.2)

    def run(
        self, app: Union[str, os.PathLike], *options: str, stream: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run APP NAME [--stream] OPTIONS``: with ``stream``, until the run ends."""
        return subprocess.run(
            [str(BIN / "flwr"), "run", os.path.abspath(app), self.name, *(["--stream"] if stream else []), *options],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def kill_node(self, i: int) -> None:
        """SIGKILL, as a machine that goes away: the SuperNode and the ClientApp it runs, no goodbye."""
        _signal_group(self.nodes[i], signal.SIGKILL)
        self.nodes[i].wait(timeout=10)

    def serverapps(self) -> list[Any]:
        """The ServerApp processes the SuperLink runs now (``psutil.Process``)."""
        import psutil

        if self.superlink is None:
            return []
        apps = []
        for child in psutil.Process(self.superlink.pid).children(recursive=True):
            try:
                if "flwr-serverapp" in " ".join(child.cmdline()):
                    apps.append(child)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return apps

    def kill_serverapp(self, timeout: float = 30) -> int:
        """SIGKILL the ServerApp of the current run, once it is there; return its pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            apps = self.serverapps()
            if apps:
                for app in apps:
                    app.kill()
                return int(apps[0].pid)
            time.sleep(0.2)
        raise RuntimeError(f"no ServerApp process under the SuperLink within {timeout:g} s:\n{self.logs()}")

    def down(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after 10 s), with every process each one started: the
        SuperLink starts its ServerApps in a session of their own, which its process group does not reach."""
        descendants = []
        try:
            import psutil

            for process in self.processes:
                try:
                    descendants += psutil.Process(process.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
        except ImportError:  # psutil comes with peft; without it the process groups are all that is stopped
            pass
        for process in self.processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for child in descendants:
            with contextlib.suppress(Exception):
                child.kill()
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)
            self._sockets = None

    def wait_for_round(self, checkpoints: Union[str, Path], number: int, timeout: float = 480) -> None:
        """Until the run whose checkpoints go to ``checkpoints`` has ended round ``number`` (:func:`rounds_ended`);
        past ``timeout`` seconds an error with every process's log."""
        deadline = time.monotonic() + timeout
        last, size = Path(checkpoints) / "last.ckpt", -1
        while True:
            if rounds_ended(checkpoints) >= number:
                # and last.ckpt written out: the same size at two looks a quarter of a second apart
                now = last.stat().st_size if last.exists() else -1
                if now == size > 0:
                    return
                size = now
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {number} did not end within {timeout:g} s:\n" + self.logs())
            time.sleep(0.25)

    def logs(self, tail: int = 1500) -> str:
        """The end of every process's log, for an error message."""
        return "\n".join(f"--- {p.name}\n{p.read_text()[-tail:]}" for p in sorted(self.root.glob("*.log")))


def rounds_ended(checkpoints: Union[str, Path]) -> int:
    """The newest round whose ``round=N.ckpt`` is on disk with a ``last.ckpt`` written after it; 0 before
    round 1 ends. Lightning keeps only the newest ``round=N.ckpt``; :meth:`LocalFederation.wait_for_round`
    also waits until ``last.ckpt`` is written out."""
    folder = Path(checkpoints)
    newest = 0
    try:
        last = (folder / "last.ckpt").stat().st_mtime
        for path in folder.glob("round=*.ckpt"):
            if last >= path.stat().st_mtime:
                newest = max(newest, int(path.stem.removeprefix("round=")))
    except FileNotFoundError:  # not yet written, or replaced between the glob and the stat
        pass
    return newest


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the SuperExec and app processes that a node started, too
    except ProcessLookupError:
        pass
