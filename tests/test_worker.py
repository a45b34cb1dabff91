"""A warm worker beside each SuperNode and a thin ClientApp (``fedpeft worker``, ``deploy/thin.py``).

The same rounds run over the loopback grid (``flower_loopback.py``) through the thin ClientApp and a
worker, and through the ClientApp that trains in its own process: every reply, and what each node
keeps, must be the same bytes. The worker runs in a thread of this process (its socket, frames and
handshake are real); the thin ClientApp's import budget is checked in a fresh process (slow tier).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from flower_loopback import RUN_ID, LoopbackGrid, load_app, run_loopback
from test_cli import scalars
from test_flower import DEPLOYMENTS, NUM_NODES, write_deployment

pytest.importorskip("flwr", reason='Flower is an optional dependency: pip install -e ".[flower]"')

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_to_proto

from fedpeft_pl.deploy import channel
from fedpeft_pl.deploy.worker import Worker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def socket_dir():
    """A short folder for sockets (a Unix socket's path is at most 107 bytes; pytest's tmp_path can be longer)."""
    with tempfile.TemporaryDirectory(prefix="fw-", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture
def workers(socket_dir):
    """Start workers in threads of this process: ``start(config, name)``; all stopped afterwards."""
    started = []

    def start(config: Path, name: str = "node", build: bool = True) -> Worker:
        worker = Worker(config, socket_dir / name / "worker.sock")
        worker.bind()
        if build:
            worker.build()
        thread = threading.Thread(target=worker.serve, daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.stop()
        thread.join(timeout=30)


def content_bytes(message: Message) -> bytes:
    assert not message.has_error(), message.error.reason
    return recorddict_to_proto(message.content).SerializeToString(deterministic=True)


def state_bytes(context: Context) -> bytes:
    return recorddict_to_proto(context.state).SerializeToString(deterministic=True)


def copied(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


def both_ways(seen: list[str]):
    """A ClientApp for the loopback grid that answers every message through the thin ClientApp and its worker,
    and again in its own process from a copy of the node's state: the replies and the kept state must be equal."""

    def wrap(app):
        from fedpeft_pl.deploy import flower

        def client(message: Message, context: Context) -> Message:
            config = {k: v for k, v in context.node_config.items() if k != channel.SOCKET_KEY}
            twin = Context(context.run_id, context.node_id, config, copy.deepcopy(context.state), context.run_config)
            flower._client.cache_clear()  # a fresh ClientApp process, as Flower starts for each message
            direct = app.client(copied(message), twin)
            thin = app.client(message, context)
            assert content_bytes(thin) == content_bytes(direct), message.metadata.message_type
            assert state_bytes(context) == state_bytes(twin), message.metadata.message_type
            seen.append(message.metadata.message_type)
            return thin

        return client

    return wrap


@pytest.mark.parametrize(
    "setting",
    [s if s == "int8-feedback-scaffold" else pytest.param(s, marks=pytest.mark.slow) for s in sorted(DEPLOYMENTS)],
)
def test_the_thin_clientapp_and_a_worker_reply_as_the_clientapp_does_in_its_own_process(
    tmp_path, capsys, workers, setting
):
    """Every message of a deployment, bit for bit: the update, the extras (SCAFFOLD's control variates), the
    metrics, a declined round (local DP), FLoRA's per-client views, evaluation with a personal head, and what
    each node keeps (control variates, codec residuals, accountants) in its Flower context."""
    app = write_deployment(tmp_path, capsys, *DEPLOYMENTS[setting])
    worker = workers(app / "fedpeft.yaml")
    seen: list[str] = []
    nodes = {i: {channel.SOCKET_KEY: str(worker.path)} for i in range(NUM_NODES)}
    run_loopback(app, NUM_NODES, node_configs=nodes, wrap=both_ways(seen))
    trained = seen.count("train")
    assert trained >= 3 and worker.tasks == trained + seen.count("evaluate") and worker.dropped == 0
    if setting == "feddyn-fedrep":
        assert seen.count("evaluate") >= 2
    assert (tmp_path / "deployed" / "prompt" / "version_0" / "checkpoints" / "round=2.ckpt").is_file()


def train_message(app: Path, client: int = 0, server_round: int = 1, max_batches: int = 2) -> Message:
    """A train message as the ServerApp sends it: the initial trainable state of the app's config."""
    from flwr.app import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft_pl.comm import train_content
    from fedpeft_pl.deploy.flower import build
    from fedpeft_pl.peft import trainable_state

    _, module, _, _ = build(app / "fedpeft.yaml", server=False)
    module.configure_model()
    content = train_content(trainable_state(module), {}, server_round, client, max_batches)
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = RUN_ID, 1, 0
    try:
        message = Message(content, dst_node_id=1000 + client, message_type=MessageType.TRAIN)
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    return message


def node(app: Path, worker: str | None = None, client: int = 0, **config) -> LoopbackGrid:
    """One SuperNode (of ``NUM_NODES``) on the loopback grid, with the app's ClientApp."""
    configs = {client: {**({channel.SOCKET_KEY: worker} if worker else {}), **config}}
    return LoopbackGrid(load_app(app).client, NUM_NODES, configs)


def ask(grid: LoopbackGrid, message: Message) -> Message:
    [reply] = grid.send_and_receive([copied(message)])
    return reply


def test_a_worker_of_another_run_config_refuses_in_one_line_and_the_clientapp_fails_or_falls_back(
    tmp_path, capsys, workers
):
    app = write_deployment(tmp_path, capsys)
    other = tmp_path / "other.yaml"
    other.write_text((app / "fedpeft.yaml").read_text() + "# another experiment\n")
    worker = workers(other, build=False)  # it refuses before it would train
    message = train_message(app)
    reply = ask(node(app, str(worker.path)), message)
    assert reply.has_error()
    reason = reply.error.reason
    assert "refused: this worker runs fedpeft" in reason and "start the worker with the app's fedpeft.yaml" in reason
    assert "\n" not in reason.split("refused: ", 1)[1]
    # with worker-fallback the ClientApp trains in its own process: the reply of a node without a worker
    fallback = ask(node(app, str(worker.path), **{channel.FALLBACK_KEY: True}), message)
    assert content_bytes(fallback) == content_bytes(ask(node(app), message))
    # no worker at all: the same choice
    missing = str(tmp_path / "nobody" / "worker.sock")
    reply = ask(node(app, missing), message)
    assert reply.has_error() and f"no fedpeft worker listens at {missing}" in reply.error.reason
    assert not ask(node(app, missing, **{channel.FALLBACK_KEY: "true"}), message).has_error()
    assert worker.tasks == 0


def test_a_worker_that_dies_mid_task_fails_the_task_and_the_next_message_finds_the_restarted_one(
    tmp_path, capsys, socket_dir, workers
):
    """The worker takes the task and goes away without a reply: Flower's error reply, and the node keeps what it
    had; the next message reaches the worker started again at the same socket and trains as if nothing happened."""
    app = write_deployment(tmp_path, capsys, *DEPLOYMENTS["int8-feedback-scaffold"][:4])  # Int8 + SCAFFOLD
    path = socket_dir / "node" / "worker.sock"
    channel.private_directory(path.parent)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def dies_mid_task():
        conn, _ = listener.accept()
        with conn:
            channel.receive(conn, max_bytes=0)
            channel.send(conn, {"ok": True})
            channel.receive(conn)  # the task; then the process is gone
        listener.close()
        path.unlink()

    thread = threading.Thread(target=dies_mid_task)
    thread.start()
    grid = node(app, str(path))
    message = train_message(app)
    reply = ask(grid, message)
    thread.join()
    assert reply.has_error() and "went away mid-task" in reply.error.reason
    context = grid.contexts[1000]
    assert len(context.state) == 0  # nothing half-stored: the node keeps what it had before the task

    worker = workers(app / "fedpeft.yaml")  # restarted (by the SuperNode's operator, or LocalFederation)
    assert worker.path == path
    reply = ask(grid, message)
    assert content_bytes(reply) == content_bytes(ask(node(app), message))
    assert worker.tasks == 1


def test_a_clientapp_that_goes_away_mid_task_makes_the_worker_drop_it(tmp_path, capsys, workers):
    app = write_deployment(tmp_path, capsys)
    worker = workers(app / "fedpeft.yaml")
    message = train_message(app, max_batches=10_000)  # longer than it takes to notice the ClientApp went away
    from fedpeft_pl.deploy.node_state import from_record

    sock = channel.connect(worker.path)
    channel.send(sock, channel.hello(app / "fedpeft.yaml"))
    assert channel.receive(sock)[0]["ok"]
    settings = dict(message.content["config"])
    request = {"op": "train", "config": settings, "accountant": {}, "residual": False}
    channel.send(sock, request, {"arrays": from_record(message.content["arrays"])})
    sock.close()  # the ClientApp's process ends (Flower killed it, or its SuperNode went away)
    for _ in range(600):
        if worker.dropped:
            break
        threading.Event().wait(0.1)
    assert worker.dropped == 1 and worker.tasks == 0
    # the worker goes on, from the module's initial state: the next task replies as a fresh process would
    short = train_message(app)
    assert content_bytes(ask(node(app, str(worker.path)), short)) == content_bytes(ask(node(app), short))
    assert worker.tasks == 1


def test_the_worker_accepts_data_only_under_its_caps(socket_dir, tmp_path, monkeypatch, workers):
    config = tmp_path / "fedpeft.yaml"
    config.write_text("seed_everything: 0\n")
    worker = workers(config, build=False)
    assert (worker.path.parent.stat().st_mode & 0o777) == 0o700
    assert worker.path.is_socket()

    def exchange(*frames: bytes) -> dict:
        """The worker's answer to the last frame, or ``closed`` where it hung up without one."""
        with channel.connect(worker.path) as sock:
            answers = []
            try:
                # the worker may hang up while a refused frame is still being sent (a broken pipe here)
                for frame in frames:
                    sock.sendall(frame)
                while len(answers) < len(frames):
                    answers.append(channel.receive(sock)[0])
                    if not answers[-1]["ok"]:
                        break
            except (channel.ChannelError, OSError):
                return {"closed": True}
            return answers[-1]

    def frame(header: dict, blobs: list[tuple[str, str, bytes]] = ()) -> bytes:
        listed = [[g, n, len(b)] for g, n, b in blobs]
        text = json.dumps({**header, "arrays": listed}).encode()
        return channel.MAGIC + len(text).to_bytes(4, "big") + text + b"".join(b for *_, b in blobs)

    hello = frame(channel.hello(config))
    assert exchange(hello, frame({"op": "run-code", "code": "import os"})) == {
        "ok": False,
        "error": "unknown operation 'run-code'",
    }
    import io
    import pickle

    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # an object array: pickle inside
    assert exchange(hello, frame({"op": "train"}, [("arrays", "x", pickled.getvalue())])) == {"closed": True}
    assert exchange(hello, pickle.dumps({"op": "train"})) == {"closed": True}  # not a frame at all
    assert exchange(frame({"op": "train"}))["ok"] is False  # no hello first: refused
    assert exchange(frame({"op": "hello", "protocol": 99}))["ok"] is False
    worker.max_message_bytes = 1000
    big = io.BytesIO()
    np.save(big, np.zeros(1000, dtype=np.float32))
    assert exchange(hello, frame({"op": "train"}, [("arrays", "x", big.getvalue())])) == {"closed": True}
    assert worker.tasks == 0
    # a process of another user is turned away before it says anything
    monkeypatch.setattr(channel, "peer_uid", lambda sock: os.getuid() + 1)
    assert exchange(hello) == {"closed": True}
    # a folder open to others is refused; a path another worker listens at too
    open_folder = socket_dir / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(ValueError, match="is open to others"):
        Worker(config, open_folder / "worker.sock").bind()
    with pytest.raises(ValueError, match="another worker listens at"):
        Worker(config, worker.path).bind()


def test_frames_round_trip_arrays_without_pickle():
    left, right = socket.socketpair()
    with left, right:
        arrays = {"arrays": {"a": np.arange(6, dtype=np.int8).reshape(2, 3), "b": np.float32(2.5)}, "own": {}}
        channel.send(left, {"op": "train", "x": [1, 2.0, "s", True]}, arrays)
        header, got = channel.receive(right)
        assert header == {"op": "train", "x": [1, 2.0, "s", True]}
        assert got["arrays"]["a"].dtype == np.int8 and got["arrays"]["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
        assert float(got["arrays"]["b"]) == 2.5 and "own" not in got
        channel.send(left, {"op": "train"}, {"arrays": {"a": np.zeros(100, np.float32)}})
        with pytest.raises(channel.ChannelError, match="exceeds the cap of 10"):
            channel.receive(right, max_bytes=10)


def test_the_thin_clientapps_message_keys_are_the_servers():
    from fedpeft_pl import comm
    from fedpeft_pl.deploy import node_state

    assert (node_state.ROUND, node_state.CLIENT, node_state.MAX_BATCHES, node_state.VERSION) == (
        comm.ROUND,
        comm.CLIENT,
        comm.MAX_BATCHES,
        comm.VERSION,
    )


THIN_PROCESS = """
import json, sys
from pathlib import Path
from flwr.app import Context, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as MessageProto
from flwr.supercore.task_identity import TaskIdentity
app_dir, message_file, socket, out = sys.argv[1:]
sys.path.insert(0, app_dir)
import fedpeft_app
proto = MessageProto()
proto.ParseFromString(Path(message_file).read_bytes())
message = message_from_proto(proto)
TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 1000
config = {"partition-id": 0, "num-partitions": 3, "worker-socket": socket}
reply = fedpeft_app.client(message, Context(1, 1000, config, RecordDict(), {}))
Path(out).with_suffix(".reply").write_bytes(message_to_proto(reply).SerializeToString())
loaded = sorted({name.split(".")[0] for name in sys.modules})
Path(out).write_text(json.dumps({"loaded": loaded, "error": reply.error.reason if reply.has_error() else None}))
"""


@pytest.mark.slow  # a process
def test_the_thin_clientapp_imports_flower_and_numpy_only(tmp_path, capsys, workers):
    """A ClientApp process with a worker, as Flower starts one per message: no torch, timm or Lightning, and the
    reply of the ClientApp that trains in its own process."""
    app = write_deployment(tmp_path, capsys)
    worker = workers(app / "fedpeft.yaml")
    message = train_message(app)
    message.metadata.__dict__.update(_message_id="m-1", _run_id=RUN_ID, _src_node_id=1)
    (tmp_path / "message.bin").write_bytes(message_to_proto(message).SerializeToString())
    out = tmp_path / "thin.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", THIN_PROCESS, str(app), str(tmp_path / "message.bin"), str(worker.path), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["error"] is None
    heavy = {"torch", "timm", "lightning", "torchvision", "torchmetrics", "transformers", "jsonargparse", "yaml"}
    assert not heavy & set(result["loaded"]), heavy & set(result["loaded"])
    assert {"flwr", "numpy"} <= set(result["loaded"])
    from flwr.proto.message_pb2 import Message as MessageProto

    proto = MessageProto()
    proto.ParseFromString(out.with_suffix(".reply").read_bytes())
    assert content_bytes(message_from_proto(proto)) == content_bytes(ask(node(app), message))
    assert worker.tasks == 1
    assert RecordDict  # the Flower import the test's process shares with the thin one


def test_supernodes_share_workers_by_number(tmp_path):
    from fedpeft_pl.deploy.local import LocalFederation

    federation = LocalFederation(tmp_path, 5, worker_config=tmp_path / "fedpeft.yaml", nodes_per_worker=2)
    assert federation.num_workers == 3
    assert [federation.worker_of(i) for i in range(5)] == [0, 0, 1, 1, 2]
    sockets = [federation.worker_socket(i) for i in range(5)]
    assert sockets[0] == sockets[1] != sockets[2] == sockets[3] != sockets[4] != sockets[0]
    with pytest.raises(ValueError, match="workers 0 to 2, not 3"):
        federation.start_worker(3)
    assert LocalFederation(tmp_path, 5).num_workers == 0  # no worker_config, no workers
    # the workers train at once: each gets its share of the cores, unless told
    cores = os.cpu_count() or 1
    assert federation.worker_env["OMP_NUM_THREADS"] == str(max(1, cores // 3))
    told = LocalFederation(tmp_path, 2, worker_config=tmp_path / "fedpeft.yaml", worker_threads=4)
    assert told.worker_env["OMP_NUM_THREADS"] == "4"
    pinned = LocalFederation(tmp_path, 2, worker_config=tmp_path / "fedpeft.yaml", env={"OMP_NUM_THREADS": "3"})
    assert pinned.worker_env["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="nodes_per_worker must be at least 1"):
        LocalFederation(tmp_path, 2, worker_config=tmp_path / "fedpeft.yaml", nodes_per_worker=0)
    federation.down()  # removes the sockets' folder


def answered(log: str) -> list[int]:
    """The clients of the train tasks a worker's log says it answered."""
    lines = [line for line in log.splitlines() if "answered a train task" in line]
    return [int(line.split(" of client ")[1].split()[0]) for line in lines]


@pytest.mark.slow  # processes: a SuperLink, three SuperNodes and two workers
@pytest.mark.timeout(600)
def test_a_deployment_with_shared_workers_runs_thin_and_survives_a_worker_restart(tmp_path, capsys):
    """Real Flower processes on loopback: three SuperNodes, two workers (nodes 0 and 1 share worker 0), three
    rounds of all three clients. Worker 1 (node 2's) is SIGKILLed as round 1 ends, with the ServerApp held
    (SIGSTOP) until the operator (here LocalFederation.start_worker) has restarted it: round 2 may lose
    client 2 (if its task reached the dead worker), round 3 has every client, client 2's answered by the
    restarted worker. Every train task went through a worker (the ClientApps were thin)."""
    import signal

    from fedpeft_pl.deploy.local import LocalFederation

    rounds = 3
    # every client a straggler that makes one step (of about 19): the test is about processes, not training
    straggle = ["--trainer.availability", "fedpeft_pl.ClientAvailability", "--trainer.availability.stragglers", "1.0"]
    straggle += ["--trainer.availability.straggler_work", "[0.01, 0.02]"]
    app = write_deployment(tmp_path, capsys, *straggle, rounds=rounds, per_round=NUM_NODES)
    checkpoints = tmp_path / "deployed" / "prompt" / "version_0" / "checkpoints"
    running = LocalFederation(
        tmp_path / "federation", NUM_NODES, state_dirs=True, worker_config=app / "fedpeft.yaml", nodes_per_worker=2
    )
    try:
        running.up()
        assert running.num_workers == 2 and running.worker_socket(0) == running.worker_socket(1)
        submitted = running.run(app, stream=False)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
        running.wait_for_round(checkpoints, 1)
        servers = running.serverapps()
        for server in servers:
            server.send_signal(signal.SIGSTOP)
        try:
            running.kill_worker(1)
            running.start_worker(1)
        finally:
            for server in servers:
                server.send_signal(signal.SIGCONT)
        running.wait_for_round(checkpoints, rounds)
    finally:
        running.down()
    logs = {w: (running.root / f"worker-{w}.log").read_text() for w in range(2)}
    assert logs[1].count("fedpeft worker: serving") == 2  # started, killed, restarted
    before, after = logs[1].split("fedpeft worker: serving")[1:]
    assert sorted(answered(logs[0])) == [0, 0, 0, 1, 1, 1]  # the shared worker served both of its nodes
    assert answered(before) == [2] and answered(after) in ([2], [2, 2])  # round 3, perhaps round 2
    failed = [v for _, v in scalars(checkpoints.parent)["round/clients_failed"]]
    assert failed[0] == 0 and failed[2] == 0 and failed[1] == 2 - len(answered(after)), failed
    # each trained message's ClientApp process says what it cost: thin, it never loaded torch (about 1 GiB)
    node_logs = "".join((running.root / f"supernode-{i}.log").read_text() for i in range(NUM_NODES))
    trained = [line for line in node_logs.splitlines() if "trained on" in line and "this process:" in line]
    assert len(trained) == NUM_NODES * rounds - failed[1], node_logs[-3000:]
    peaks = [float(line.split("peak RSS ")[1].split()[0]) for line in trained]
    assert max(peaks) < 200, peaks


def test_a_worker_that_never_serves_is_reported_with_the_seconds_waited(tmp_path, monkeypatch):
    from fedpeft_pl.deploy.local import LocalFederation

    federation = LocalFederation(tmp_path, 2, worker_config=tmp_path / "fedpeft.yaml", nodes_per_worker=2)
    spawned = []

    def spawn(argv, log, env=None):  # a worker that starts and never says it serves
        spawned.append(argv)
        (tmp_path / log).write_text("building\n")
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
        federation.processes.append(process)
        return process

    monkeypatch.setattr(federation, "_spawn", spawn)
    try:
        with pytest.raises(RuntimeError, match=r"worker 0 did not serve within 0\.5 s"):
            federation.start_worker(0, timeout=0.5)
        assert spawned[0][-2:] == ["--socket", str(federation.worker_socket(1))]  # its nodes' socket
    finally:
        federation.down()
