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

Not part of the test suite (``tests/test_flower.py`` has the short fault test). The full soak::

    python benchmarks/soak.py --nodes 32 --rounds 20 --clients-per-round 8 --kill-server-after 10

A reduced variant for a small machine::

    python benchmarks/soak.py --nodes 6 --rounds 4 --clients-per-round 3 --kill-server-after 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

from fedpeft_pl.deploy.local import LocalFederation, rounds_ended  # noqa: E402

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
    deployment = LocalFederation(root, args.nodes, state_dirs=True, name="soak")
    peaks = {"superlink": 0, "supernode": 0, "supernode_with_clientapps": 0}
    restarts: list[tuple[int, int]] = []  # (after round, partition)
    server_killed_at = None
    started = time.monotonic()
    try:
        deployment.up()
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
            for _ in range(done, rounds_ended(checkpoints)):
                done += 1
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
            time.sleep(0.5)
        wall = time.monotonic() - started
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
    simulated = scalars(simulated_dir / "prompt" / "version_0")
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
        "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
        "every_tag_each_round_once": all(once.values()),
        "tags_not_once": sorted(t for t, ok in once.items() if not ok),
        "server_acc_deployed": logs["server/acc"][-1][1],
        "server_acc_simulated": simulated["server/acc"][-1][1],
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
