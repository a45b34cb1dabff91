"""A warm worker and a thin ClientApp against the ClientApp that trains in its own process.

Flower starts a fresh ClientApp process for every message. This measures that process as each kind
of ClientApp runs it, on the quickstart (tiny ViT) written as a Flower app:

- **per message**: ``--repeats`` fresh processes per kind, each loading the app and answering one
  train message (client 0, round 1, the whole local epoch) as a SuperNode's ``flwr-clientapp`` would
  call it; each reports its CPU time (user + system, its own resource usage), its peak RSS (``VmHWM``)
  and its wall time. ``thin`` forwards to a ``fedpeft worker`` process started once beforehand; ``in-process`` is
  today's ClientApp (imports torch, timm and Lightning, builds the module, reads the backbone, trains).
  Flower's own ``flwr-clientapp`` start (gRPC to the SuperNode, about the same for both) is not in it.
  The worker's CPU time per thin message is read from the worker process.
- **worker memory**: ``--rounds`` train messages through the thin ClientApp (clients 0..2 in turn, each
  with its own node context, as SuperNodes keep theirs; ``--batches`` local steps each), the worker's RSS
  sampled after each; growth is given from round 10 (warm) and from round 1 to the last.

    python benchmarks/worker.py --repeats 5 --rounds 100 --output benchmarks/results/worker.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WEIGHTS = REPO / "fedpeft_pl" / "assets" / "vit_pico_mnist.safetensors"
NUM_NODES = 3

ONE_MESSAGE = """
import json, resource, sys, time
started = time.perf_counter()
from pathlib import Path
from flwr.app import Context, RecordDict
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as MessageProto
from flwr.supercore.task_identity import TaskIdentity
app_dir, message_file, socket, out = sys.argv[1:]
sys.path.insert(0, app_dir)
import fedpeft_app
proto = MessageProto()
proto.ParseFromString(Path(message_file).read_bytes())
message = message_from_proto(proto)
TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 1000
config = {"partition-id": 0, "num-partitions": 3}
if socket != "-":
    config["worker-socket"] = socket
reply = fedpeft_app.client(message, Context(1, 1000, config, RecordDict(), {}))
assert not reply.has_error(), reply.error.reason
usage = resource.getrusage(resource.RUSAGE_SELF)
# the peak of this program's own memory (VmHWM): ru_maxrss keeps the parent's peak across fork and exec
peak_kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
heavy = sorted({"torch", "timm", "lightning"} & {n.split(".")[0] for n in sys.modules})
Path(out).write_text(json.dumps({"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": peak_kib / 1024,
                                 "wall_s": time.perf_counter() - started, "heavy": heavy}))
"""


def write_app(root: Path) -> Path:
    from fedpeft_pl.cli import main

    app = root / "app"
    main(
        [
            "flower-app",
            str(app),
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--data.num_clients",
            str(NUM_NODES),
            "--trainer.clients_per_round",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--model.backbone.weights_file",
            str(WEIGHTS),
            "--trainer.logger",
            "false",
        ]
    )
    return app


def train_message(app: Path, client: int, server_round: int, max_batches: int = 1 << 30):
    from flwr.app import Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft_pl.comm import train_content
    from fedpeft_pl.deploy.flower import build
    from fedpeft_pl.peft import trainable_state

    if not hasattr(train_message, "state"):
        _, module, _, _ = build(app / "fedpeft.yaml", server=False)
        module.configure_model()
        train_message.state = trainable_state(module)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
    content = train_content(train_message.state, {}, server_round, client, max_batches)
    message = Message(content, dst_node_id=1000 + client, message_type=MessageType.TRAIN)
    message.metadata.__dict__.update(_message_id=f"m-{client}-{server_round}", _run_id=1, _src_node_id=1)
    return message


def start_worker(app: Path, sockets: Path) -> tuple[subprocess.Popen, Path]:
    path = sockets / "node" / "worker.sock"
    log = open(sockets / "worker.log", "w")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "fedpeft_pl.cli", "worker", "--config", str(app / "fedpeft.yaml")]
    process = subprocess.Popen([*command, "--socket", str(path)], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while "fedpeft worker: serving" not in (sockets / "worker.log").read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((sockets / "worker.log").read_text()[-3000:])
        time.sleep(0.2)
    return process, path


def one_message(app: Path, message_file: Path, socket: str, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", ONE_MESSAGE, str(app), str(message_file), socket, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--batches", type=int, default=4, help="local steps of each message of the memory run")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from flwr.app import Context, RecordDict
    from flwr.common.serde import message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    with tempfile.TemporaryDirectory(prefix="fw-bench-") as folder:
        root = Path(folder)
        app = write_app(root)
        message_file = root / "message.bin"
        message_file.write_bytes(message_to_proto(train_message(app, 0, 1)).SerializeToString())
        worker, path = start_worker(app, root)
        process = psutil.Process(worker.pid)
        try:
            runs: dict[str, list[dict]] = {"thin": [], "in-process": []}
            worker_cpu = []
            for _ in range(args.repeats):  # interleaved, so both kinds share the machine's state
                before = sum(process.cpu_times()[:2])
                runs["thin"].append(one_message(app, message_file, str(path), root / "thin.json"))
                worker_cpu.append(sum(process.cpu_times()[:2]) - before)
                runs["in-process"].append(one_message(app, message_file, "-", root / "direct.json"))
            per_message = {
                kind: {key: statistics.median(r[key] for r in results) for key in ("cpu_s", "peak_rss_mib", "wall_s")}
                | {"heavy": results[0]["heavy"]}
                for kind, results in runs.items()
            }
            per_message["thin"]["worker_cpu_s"] = statistics.median(worker_cpu)
            print(json.dumps(per_message, indent=1), flush=True)

            sys.path.insert(0, str(app))
            import fedpeft_app

            contexts = {
                c: Context(
                    1,
                    1000 + c,
                    {"partition-id": c, "num-partitions": NUM_NODES, "worker-socket": str(path)},
                    RecordDict(),
                    {},
                )
                for c in range(NUM_NODES)
            }
            rss, seconds = [], []
            for number in range(1, args.rounds + 1):
                client = number % NUM_NODES
                message = train_message(app, client, number, args.batches)
                TaskIdentity._node_id = 1000 + client
                started = time.perf_counter()
                reply = fedpeft_app.client(message, contexts[client])
                seconds.append(time.perf_counter() - started)
                assert not reply.has_error(), reply.error.reason
                rss.append(process.memory_info().rss / 2**20)
            warm = min(10, len(rss)) - 1
            memory = {
                "rounds": args.rounds,
                "rss_mib_round_1": rss[0],
                "rss_mib_round_10": rss[warm],
                "rss_mib_last": rss[-1],
                "rss_mib_max": max(rss),
                "growth_from_round_10": rss[-1] / rss[warm] - 1,
                "growth_from_round_1": rss[-1] / rss[0] - 1,
                "median_message_wall_s": statistics.median(seconds),
                "rss_mib": [round(r, 1) for r in rss],
            }
            print(json.dumps({k: v for k, v in memory.items() if k != "rss_mib"}, indent=1), flush=True)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
    report = {"per_message": per_message, "worker_memory": memory, "repeats": args.repeats, "cpus": os.cpu_count()}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    print("| ClientApp process per message (median) | CPU | peak RSS | wall |")
    print("|---|---|---|---|")
    for kind, m in per_message.items():
        print(f"| {kind} | {m['cpu_s']:.2f} s | {m['peak_rss_mib']:.0f} MiB | {m['wall_s']:.2f} s |")


if __name__ == "__main__":
    main()
