"""Soak a Flower deployment on 127.0.0.1: SuperNodes killed and restarted every round, the ServerApp killed once.

A SuperLink and ``--nodes`` SuperNodes (each keeping its clients' state in its own ``state-dir``) run
the quickstart with its tiny ViT for ``--rounds`` rounds of ``--clients-per-round`` clients. As each
round ends, one random SuperNode (never node 0, whose memory is watched) is SIGKILLed and restarted
at once; as round ``--kill-server-after`` ends the ServerApp is SIGKILLed, and ``flwr run`` with
``resume=true`` continues from its last round checkpoint. Afterwards the same config runs as a
simulation (``fedpeft fit``). The report (JSON, and a Markdown table with ``--output``):

- rounds completed, clients lost (``round/clients_failed``) and SuperNodes that rejoined (a
  restarted node whose client trained again: it wrote a state file for a later round);
- median seconds per round (``round/seconds``) deployed and simulated;
- peak RSS of the SuperLink process, of SuperNode 0 alone, and of SuperNode 0 with its ClientApp
  processes (sampled every 0.5 s);
- whether the final checkpoint loads with every round in it, and whether every TensorBoard tag
  has each round exactly once.

The partition queries (``--query-batch`` at a time, run config ``query-batch``) and every round's
messages each start a ClientApp process of about 0.6 GB on its SuperNode; with 32 SuperNodes on one
24 GiB machine, asking all of them at once ran it out of memory (the kernel killed the ServerApp).

With ``--workers`` a warm worker (``fedpeft worker``) runs beside the SuperNodes, shared by
``--nodes-per-worker`` of them (LocalFederation's ``nodes_per_worker``), and the ClientApps are thin. As
each round ends one random worker (never worker 0, whose memory is watched) is SIGKILLed too and the
soak restarts it at once, as the operator's service manager would (``Restart=always``): nothing in
Flower or fedpeft restarts a worker. The report then adds the per-message costs read from the logs
(``--no-faults`` kills nothing at all, to measure what a round costs without recovering from faults):

- each thin ClientApp process (its own log line): seconds from its start to its reply, its CPU
  seconds (those before the message reached fedpeft's code are Flower's start and the imports), its
  peak RSS, and the seconds it waited on the worker;
- fedpeft's imports in a ClientApp process, measured apart: a fresh process imports Flower's
  ``flwr-clientapp`` module, then the app's (CPU and wall, median of 3);
- each worker: its build (once per start) and each task's seconds and CPU seconds (the training);
- per round: the round's seconds less its slowest ClientApp process, which is Flower's polling and
  the ServerApp's own work (its aggregation, its evaluation), the rest of a round;
- peak RSS of worker 0 and of all workers together, worker 0's RSS as each round ends, and the
  machine's load average (sampled every 0.5 s; the machine may be shared).

Every run also reports the deployment's CPU seconds by process kind (``cpu_seconds_deployed_by_kind``:
SuperLink, SuperNodes, their SuperExecs, ServerApp, workers, and what each SuperExec reaped of its finished
ClientApps or ServerApp), read as the last round ends; a killed process takes its CPU with it, so the split
is complete only with ``--no-faults``. ``--task-poll-interval`` sets the SuperExecs' task poll
(``LocalFederation``'s ``task_poll_interval``, 0.2 s by default; Flower's own is 1 s, the better choice for
32 SuperNodes on one machine: benchmarks/README.md, "Flower's task poll on 32 SuperNodes")::

    python benchmarks/soak.py --nodes 32 --rounds 20 --clients-per-round 8 --workers --nodes-per-worker 4 \
        --no-faults --task-poll-interval 1

Not part of the test suite (``tests/test_flower.py`` has the short fault test). The full soak::

    python benchmarks/soak.py --nodes 32 --rounds 20 --clients-per-round 8 --kill-server-after 10

A reduced variant for a small machine::

    python benchmarks/soak.py --nodes 6 --rounds 4 --clients-per-round 3 --kill-server-after 2

With workers, four SuperNodes to a worker (a worker holds about 1 GB)::

    python benchmarks/soak.py --nodes 32 --rounds 20 --clients-per-round 8 --kill-server-after 10 \
        --workers --nodes-per-worker 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workloads import live_processes  # noqa: E402

from fedpeft_pl.deploy.local import TASK_POLL_INTERVAL, LocalFederation, rounds_ended  # noqa: E402

BIN = Path(sys.executable).parent
WEIGHTS = REPO / "fedpeft_pl" / "assets" / "vit_pico_mnist.safetensors"


def flwr_run(deployment: LocalFederation, app: Path, *options: str) -> None:
    """Submit the run (``flwr run`` without ``--stream`` returns once the SuperLink has it)."""
    result = deployment.run(app, *options, stream=False, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"flwr run failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _status(process: psutil.Process) -> str:
    try:
        return process.status()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _rss(process: psutil.Process, with_children: bool = False) -> int:
    try:
        total = process.memory_info().rss
        if with_children:
            for child in process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        return total
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


KINDS = (  # what a deployment's processes are, by their command line
    ("flwr-clientapp", "clientapp"),
    ("flwr-serverapp", "serverapp"),
    ("flower-superexec", "superexec"),
    ("flower-supernode", "supernode"),
    ("flower-superlink", "superlink"),
    ("worker", "worker"),
)


def cpu_by_kind(deployment: LocalFederation) -> dict[str, float]:
    """CPU seconds (user + system) of the deployment's live processes by kind, each with the children it
    has reaped (a SuperExec's include its finished ClientApp or ServerApp processes: reported apart as
    ``reaped_by_<kind>``). A process killed during the run takes its CPU with it, so this is complete
    only without faults (``--no-faults``)."""
    roots = [deployment.superlink, *deployment.nodes.values(), *deployment.workers.values()]
    totals: dict[str, float] = {}
    for process in live_processes(root.pid for root in roots if root is not None):
        line = " ".join(_cmdline(process))
        kind = next((k for marker, k in KINDS if marker in line), None)
        if kind is None and _status(process) == psutil.STATUS_ZOMBIE:
            kind = "exited_not_yet_reaped"  # a ClientApp that has replied, its SuperExec not yet waited on it
        if kind is None:
            words = [Path(w).name for w in _cmdline(process)[:3] if not w.startswith("-")]
            kind = "other (" + " ".join(words) + ")"
        elif kind == "superexec":  # the SuperLink's starts the ServerApp, a SuperNode's its ClientApps
            try:
                parent = " ".join(_cmdline(process.parent())) if process.parent() else ""
            except psutil.NoSuchProcess:
                parent = ""
            kind = "superexec_of_superlink" if "flower-superlink" in parent else "superexec_of_supernode"
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        totals[kind] = totals.get(kind, 0.0) + times.user + times.system
        reaped = times.children_user + times.children_system
        if reaped:
            totals[f"reaped_by_{kind}"] = totals.get(f"reaped_by_{kind}", 0.0) + reaped
    return {k: round(v, 1) for k, v in sorted(totals.items())}


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def fit_args(args: argparse.Namespace, save_dir: Path) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--data.num_clients",
        str(args.nodes),
        "--trainer.num_rounds",
        str(args.rounds),
        "--trainer.clients_per_round",
        str(args.clients_per_round),
        "--trainer.local_epochs",
        str(args.local_epochs),
        "--trainer.enable_progress_bar",
        "false",
        "--model.backbone.weights_file",
        str(WEIGHTS),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
    ]


def soak(args: argparse.Namespace, root: Path) -> dict:
    rng = random.Random(args.seed)
    app = root / "app"
    subprocess.run(
        [str(BIN / "fedpeft"), "flower-app", str(app), *fit_args(args, root / "deployed")],
        check=True,
        capture_output=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    run_dir = root / "deployed" / "prompt" / "version_0"
    checkpoints = run_dir / "checkpoints"
    deployment = LocalFederation(
        root,
        args.nodes,
        state_dirs=True,
        name="soak",
        worker_config=app / "fedpeft.yaml" if args.workers else None,
        nodes_per_worker=args.nodes_per_worker,
        task_poll_interval=args.task_poll_interval,
    )
    peaks = {"superlink": 0, "supernode": 0, "supernode_with_clientapps": 0}
    if args.workers:
        peaks |= {"worker_0": 0, "all_workers": 0}
    worker_rss: list[float] = []  # worker 0's, as each round ends (MiB)
    loads: list[float] = []  # the 1-minute load average, every 0.5 s
    restarts: list[tuple[int, int]] = []  # (after round, partition)
    worker_restarts: list[tuple[int, int, float]] = []  # (after round, worker, seconds until it served again)
    server_killed_at = None
    started = time.monotonic()
    try:
        deployment.up()
        print(f"up in {time.monotonic() - started:.1f} s", flush=True)
        # the partition queries start a ClientApp process on every SuperNode: a few at a time on one machine
        flwr_run(deployment, app, "--run-config", f"query-batch={args.query_batch}")
        done = 0
        deadline = time.monotonic() + args.timeout
        while done < args.rounds:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {args.rounds} rounds within {args.timeout:g} s")
            assert deployment.superlink is not None
            peaks["superlink"] = max(peaks["superlink"], _rss(psutil.Process(deployment.superlink.pid)))
            node0 = psutil.Process(deployment.nodes[0].pid)
            peaks["supernode"] = max(peaks["supernode"], _rss(node0))
            peaks["supernode_with_clientapps"] = max(peaks["supernode_with_clientapps"], _rss(node0, True))
            loads.append(os.getloadavg()[0])
            if args.workers:
                rss = [_rss(psutil.Process(w.pid), True) for w in deployment.workers.values()]
                peaks["worker_0"] = max(peaks["worker_0"], rss[0])
                peaks["all_workers"] = max(peaks["all_workers"], sum(rss))
            for _ in range(done, rounds_ended(checkpoints)):
                done += 1
                if args.workers:
                    worker_rss.append(round(_rss(psutil.Process(deployment.workers[0].pid), True) / 2**20, 1))
                if args.no_faults:
                    continue
                if done == args.kill_server_after and server_killed_at is None:
                    for process in deployment.serverapps():
                        process.kill()
                    server_killed_at = done
                    print(f"round {done} ended: ServerApp killed; flwr run --run-config resume=true", flush=True)
                    flwr_run(deployment, app, "--run-config", f"resume=true query-batch={args.query_batch}")
                if done < args.rounds and args.nodes > 1:
                    victim = rng.randrange(1, args.nodes)
                    deployment.kill_node(victim)
                    deployment.start_node(victim)
                    restarts.append((done, victim))
                    print(f"round {done} ended: SuperNode {victim} killed and restarted", flush=True)
                if done < args.rounds and args.workers and deployment.num_workers > 1:
                    victim = rng.randrange(1, deployment.num_workers)
                    deployment.kill_worker(victim)
                    restarted = time.monotonic()
                    deployment.start_worker(victim)  # the operator's restart: nothing else restarts a worker
                    worker_restarts.append((done, victim, round(time.monotonic() - restarted, 1)))
                    print(f"round {done} ended: worker {victim} killed and restarted", flush=True)
            time.sleep(0.5)
        wall = time.monotonic() - started
        cpu = cpu_by_kind(deployment)
        # the last round's ServerApp finishes its logs after the checkpoint
        end = time.monotonic() + 60
        while deployment.serverapps() and time.monotonic() < end:
            time.sleep(0.5)
    finally:
        deployment.down()

    logs = scalars(run_dir)
    once = {tag: [s for s, _ in v] == list(range(1, args.rounds + 1)) for tag, v in logs.items() if "/" in tag}
    # server/acc_vs_cumulative_bytes is stepped by bytes, not rounds
    once = {
        t: ok
        for t, ok in once.items()
        if t.startswith(("round/", "server/", "comm/bytes")) and t != "server/acc_vs_cumulative_bytes"
    }
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False)
    rejoined = 0
    for after, victim in restarts:
        later = [
            int(p.stem.removeprefix("round-"))
            for p in (root / f"node-{victim}").rglob("round-*.npz")
            if int(p.stem.removeprefix("round-")) > after
        ]
        rejoined += bool(later)

    simulated_dir = root / "simulated"
    sim_started = time.monotonic()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [
            str(BIN / "fedpeft"),
            "fit",
            "--config",
            str(app / "fedpeft.yaml"),
            "--trainer.logger.init_args.save_dir",
            str(simulated_dir),
        ],
        check=True,
        capture_output=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    sim_wall = time.monotonic() - sim_started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sim_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    simulated = scalars(simulated_dir / "prompt" / "version_0")
    costs = per_message(root, args, logs) if args.workers else None
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "rounds_completed": len(logs.get("round/seconds", [])),
        "final_checkpoint_rounds": int(checkpoint["epoch"]) + 1,
        "clients_lost": int(sum(v for _, v in logs.get("round/clients_failed", []))),
        "supernode_restarts": len(restarts),
        "restarted_nodes_that_trained_again": rejoined,
        "serverapp_killed_after_round": server_killed_at,
        "seconds_per_round_deployed_median": statistics.median(v for _, v in logs["round/seconds"]),
        "seconds_per_round_simulated_median": statistics.median(v for _, v in simulated["round/seconds"]),
        "wall_seconds_deployed": round(wall, 1),
        "wall_seconds_simulated": round(sim_wall, 1),
        "cpu_seconds_simulated": round(sim_cpu, 1),
        "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
        "every_tag_each_round_once": all(once.values()),
        "tags_not_once": sorted(t for t, ok in once.items() if not ok),
        "server_acc_deployed": logs["server/acc"][-1][1],
        "server_acc_simulated": simulated["server/acc"][-1][1],
        "deployed_over_simulated": round(
            statistics.median(v for _, v in logs["round/seconds"])
            / statistics.median(v for _, v in simulated["round/seconds"]),
            1,
        ),
        "cpu_seconds_deployed_by_kind": cpu,
        "load_average_1min": {
            "min": min(loads),
            "median": statistics.median(loads),
            "max": max(loads),
            "cpus": os.cpu_count(),
        },
        **(
            {
                "workers": deployment.num_workers,
                "worker_restarts": worker_restarts,
                "worker_0_rss_mib_by_round": worker_rss,
                "per_message": costs,
            }
            if args.workers
            else {}
        ),
    }


THIN = re.compile(
    r"round (\d+): client (\d+) trained on \d+ samples in ([\d.]+) s \(worker .*?, ([\d.]+) s of it\); this process: "
    r"([\d.]+) s since its start, CPU ([\d.]+) s \(([\d.]+) s for the message\), peak RSS (\d+) MiB"
)
TASK = re.compile(r"answered a train task of client (\d+) \(round (\d+)\) in ([\d.]+) s \(CPU ([\d.]+) s\)")
BUILT = re.compile(r"built the client of .* in ([\d.]+) s")

IMPORTS = """
import sys, time
import flwr.supernode.cli.flwr_clientapp  # what Flower's flwr-clientapp process has loaded before the app
wall, cpu = time.perf_counter(), time.process_time()
sys.path.insert(0, sys.argv[1])
import fedpeft_app  # the app: fedpeft_pl.deploy.apps, its thin ClientApp, numpy
print(time.perf_counter() - wall, time.process_time() - cpu)
"""


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def per_message(root: Path, args: argparse.Namespace, logs: dict[str, list[tuple[int, float]]]) -> dict:
    """The thin ClientApps' and the workers' log lines, by round; fedpeft's imports measured apart."""
    thin = [m.groups() for p in root.glob("supernode-*.log") for m in THIN.finditer(p.read_text())]
    tasks = [m.groups() for p in root.glob("worker-*.log") for m in TASK.finditer(p.read_text())]
    builds = [float(m.group(1)) for p in root.glob("worker-*.log") for m in BUILT.finditer(p.read_text())]
    imports = []
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", IMPORTS, str(root / "app")],
            check=True,
            capture_output=True,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        imports.append([float(x) for x in done.stdout.split()[-2:]])
    lifetimes: dict[int, list[float]] = {}
    for server_round, _, _, _, age, *_ in thin:
        lifetimes.setdefault(int(server_round), []).append(float(age))
    seconds = dict(logs["round/seconds"])
    rest = [seconds[r] - max(ages) for r, ages in lifetimes.items() if r in seconds]
    return {
        "thin_clientapp_messages": len(thin),
        "worker_train_tasks": len(tasks),
        "clientapp_process": {
            "seconds_start_to_reply_median": _median([float(t[4]) for t in thin]),
            "cpu_s_median": _median([float(t[5]) for t in thin]),
            "cpu_s_before_the_message_median": _median([float(t[5]) - float(t[6]) for t in thin]),
            "cpu_s_for_the_message_median": _median([float(t[6]) for t in thin]),
            "seconds_in_train_median": _median([float(t[2]) for t in thin]),
            "seconds_waiting_on_the_worker_median": _median([float(t[3]) for t in thin]),
            "peak_rss_mib_median": _median([float(t[7]) for t in thin]),
            "peak_rss_mib_max": max((float(t[7]) for t in thin), default=None),
        },
        "fedpeft_imports_in_a_clientapp": {
            "wall_s_median": _median([w for w, _ in imports]),
            "cpu_s_median": _median([c for _, c in imports]),
        },
        "worker": {
            "builds": len(builds),
            "build_s_median": _median(builds),
            "train_task_s_median": _median([float(t[2]) for t in tasks]),
            "train_task_cpu_s_median": _median([float(t[3]) for t in tasks]),
            "train_task_cpu_s_total": round(sum(float(t[3]) for t in tasks), 1),
        },
        "round_less_slowest_clientapp_s_median": _median(rest),
        "round_less_slowest_clientapp_s": [round(r, 2) for r in rest],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--kill-server-after", type=int, default=10, help="kill the ServerApp as this round ends")
    parser.add_argument("--seed", type=int, default=0, help="which SuperNodes are killed")
    parser.add_argument(
        "--query-batch",
        type=int,
        default=8,
        help="SuperNodes asked their partition at a time (32 at once exhausted a 24 GiB machine)",
    )
    parser.add_argument(
        "--no-faults",
        action="store_true",
        help="kill nothing (no SuperNode, worker or ServerApp): what the deployment costs a round by itself",
    )
    parser.add_argument("--workers", action="store_true", help="warm workers beside the SuperNodes, thin ClientApps")
    parser.add_argument(
        "--nodes-per-worker", type=int, default=1, help="SuperNodes sharing one worker (a worker holds about 1 GB)"
    )
    parser.add_argument(
        "--task-poll-interval",
        type=float,
        default=TASK_POLL_INTERVAL,
        help="seconds between the SuperExecs' asks for a task (LocalFederation's task_poll_interval; "
        "Flower's own default is 1)",
    )
    parser.add_argument("--timeout", type=float, default=7200, help="give up after this many seconds")
    parser.add_argument("--output", type=Path, help="also write the report here (JSON)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedpeft-soak-") as folder:
        report = soak(args, Path(folder))
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
