"""What Flower's polling costs a deployed round: the SuperExec's task poll and the ServerApp's reply pulls.

A :class:`~fedpeft_pl.deploy.local.LocalFederation` of ``--nodes`` SuperNodes on 127.0.0.1, each with a
warm worker (so a ClientApp is thin and its process costs about 0.4 s, not the 7 s of a full one), runs the
quickstart for ``--rounds`` rounds of every node, once per setting:

- the SuperExecs' task poll (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; Flower: 1 s, ``LocalFederation``: 0.2 s),
  set when the federation starts, and
- the ServerApp's pull interval (run config ``pull-interval``; Flower's own grid: 3 s, fedpeft's: 0.1 s).

It reports each run's median ``round/seconds`` (the ServerApp's own clock, from sending a round's
messages to aggregating its replies), the wall time of ``flwr run --stream`` and the CPU seconds the
federation's processes (SuperLink, SuperNodes, SuperExecs, workers, apps) spent while it ran, and the CPU
the idle federation spends in ``--idle`` seconds (the SuperExecs' and SuperNodes' polling alone)::

    python benchmarks/flower_polling.py --nodes 3 --rounds 5

``--idle-only`` reads only the idle federation's CPU, for each task poll (no app, no run)::

    python benchmarks/flower_polling.py --nodes 32 --idle 60 --idle-only
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

from workloads import live_processes, scalars  # noqa: E402

from fedpeft_pl.deploy.local import LocalFederation  # noqa: E402

WEIGHTS = REPO / "fedpeft_pl" / "assets" / "vit_pico_mnist.safetensors"


def _cpu(federation: LocalFederation) -> float:
    """User + system CPU seconds of every process the federation started and their descendants, alive now."""
    total = 0.0
    for process in live_processes(started.pid for started in federation.processes):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle federation to read the CPU of")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--idle-only", action="store_true", help="only the idle federation's CPU, each task poll (no workers, no run)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="flower-polling-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    app = root / "app"
    fit = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--data.num_clients", str(args.nodes)]
    fit += ["--trainer.num_rounds", str(args.rounds), "--trainer.clients_per_round", str(args.nodes)]
    fit += ["--trainer.local_epochs", "1", "--trainer.enable_progress_bar", "false"]
    fit += ["--model.backbone.weights_file", str(WEIGHTS), "--trainer.logger.init_args.save_dir", str(root / "runs")]
    if not args.idle_only:
        subprocess.run(
            [sys.executable, "-m", "fedpeft_pl.cli", "flower-app", str(app), *fit], check=True, env=env, cwd=REPO
        )
    results = []
    for task_poll in (None, 0.2):  # Flower's 1 s, LocalFederation's default
        federation = LocalFederation(
            root / f"federation-{task_poll}", args.nodes, name="polling", env={"PYTHONPATH": str(REPO)},
            worker_config=None if args.idle_only else app / "fedpeft.yaml", task_poll_interval=task_poll,
        )  # fmt: skip
        with federation:
            time.sleep(3 + 0.5 * args.nodes)  # the SuperExecs start after the SuperNodes connect (each imports Flower)
            before, started = _cpu(federation), time.monotonic()
            time.sleep(args.idle)
            idle = (_cpu(federation) - before) / (time.monotonic() - started)
            if args.idle_only:
                results.append({"task_poll_s": task_poll if task_poll is not None else 1.0, "idle_cpu_s_per_s": idle})
                print(json.dumps(results[-1]), flush=True)
                continue
            for pull in (3.0, 0.1):  # Flower's grid, fedpeft's PollingGrid default
                before, started = _cpu(federation), time.monotonic()
                done = federation.run(app, "--run-config", f"pull-interval={pull}", timeout=900)
                wall = time.monotonic() - started
                cpu = _cpu(federation) - before
                if done.returncode:
                    raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:] + federation.logs())
                # the newest run folder: each run of the app logs to a version of its own
                newest = max((root / "runs" / "prompt").glob("version_*"), key=lambda p: p.stat().st_mtime)
                seconds = scalars(newest)["round/seconds"]
                result = {
                    "task_poll_s": task_poll if task_poll is not None else 1.0,
                    "pull_interval_s": pull,
                    "round_seconds": seconds,
                    "median_round_s": statistics.median(seconds),
                    "flwr_run_wall_s": wall,
                    "federation_cpu_s": cpu,
                    "idle_cpu_s_per_s": idle,
                }
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.idle_only:
        if args.output:
            args.output.write_text(json.dumps({"nodes": args.nodes, "idle_s": args.idle, "runs": results}, indent=2))
        return
    print(
        "\n| SuperExec task poll | ServerApp pull interval | median round s | flwr run wall s | CPU s | idle CPU s/s |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['task_poll_s']:g} s | {r['pull_interval_s']:g} s | {r['median_round_s']:.2f} | "
            f"{r['flwr_run_wall_s']:.1f} | {r['federation_cpu_s']:.1f} | {r['idle_cpu_s_per_s']:.3f} |"
        )
    if args.output:
        args.output.write_text(json.dumps({"nodes": args.nodes, "rounds": args.rounds, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
