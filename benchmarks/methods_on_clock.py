"""The six methods on the quickstart task under the virtual clock: accuracy against simulated hours.

    python benchmarks/methods_on_clock.py                # seed 0, the six methods
    python benchmarks/methods_on_clock.py --reuse        # read finished runs back instead of re-running them

Each method runs ``fedpeft fit --config configs/quickstart.yaml --config configs/quickstart/<method>.yaml
--config configs/quickstart/clock.yaml`` (synchronous rounds, 30 of 8 clients; client speeds lognormal
with median 50 samples/s and sigma 1, 1 MB/s up, 5 MB/s down, 0.1 s latency). Every method sees the
same clients with the same speeds (the clock's draws depend on the seed, not the method); what differs
is the bytes each client moves and the accuracy each round reaches. Logs go to ``<out>/<method>/seed<k>``;
the table to benchmarks/results/methods_on_clock.md and the figure to docs/methods_on_clock.png.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["head", "bias", "adapter", "prompt", "lora", "full"]
THRESHOLDS = (0.80, 0.90, 0.95)


def run(method: str, seed: int, out: Path) -> float:
    log_dir = out / method / f"seed{seed}"
    shutil.rmtree(log_dir, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "fedpeft_pl.cli",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--config",
        f"configs/quickstart/{method}.yaml",
        "--config",
        "configs/quickstart/clock.yaml",
        "--seed_everything",
        str(seed),
        "--trainer.seed",
        str(seed),
        "--data.seed",
        str(seed),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        method,
        "--trainer.logger.init_args.version",
        f"seed{seed}",
        "--trainer.enable_progress_bar",
        "false",
    ]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "methods_on_clock")
    parser.add_argument("--reuse", action="store_true", help="read finished runs' logs instead of re-running them")
    args = parser.parse_args()

    from fedpeft_pl.analysis import load_run
    from fedpeft_pl.comm import MIB

    wall = {}
    for method in args.methods:
        path = args.out / method / f"seed{args.seed}"
        if args.reuse and path.is_dir() and "time/simulated_seconds" in load_run(path).scalars:
            continue
        print(f"== {method}, seed {args.seed}", flush=True)
        wall[method] = run(method, args.seed, args.out)

    curves = {}
    rows = []
    for method in args.methods:
        run_ = load_run(args.out / method / f"seed{args.seed}", name=method)
        seconds = dict(run_.scalars["time/simulated_seconds"])
        rounds = dict(run_.scalars["time/round_seconds"])
        points = [(seconds[step], value) for step, value in run_.scalars["server/acc"] if step in seconds]
        curves[method] = points
        _, up = run_.series("comm/bytes_up")
        reach = [next((t for t, a in points if a >= th), math.inf) for th in THRESHOLDS]
        rows.append(
            {
                "method": method,
                "reach": reach,
                "total_s": max(seconds.values()),
                "median_round_s": sorted(rounds.values())[len(rounds) // 2],
                "final": run_.final_accuracy,
                "upload_per_client_MiB": up[-1] / MIB / 8,
                "total_MiB": run_.total_bytes / MIB,
            }
        )

    def hours(t: float) -> str:
        return "never" if math.isinf(t) else f"{t / 3600:.3f}"

    lines = [
        "Quickstart task (digits over 16 clients, Dirichlet(0.5), 30 synchronous rounds of 8 clients, 5 local "
        f"epochs), seed {args.seed}, on the clock of configs/quickstart/clock.yaml: client speeds lognormal "
        "(median 50 samples/s, sigma 1), 1 MB/s up, 5 MB/s down, 0.1 s latency.",
        "",
        f"Command: `python benchmarks/methods_on_clock.py --seed {args.seed}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}; "
        "simulated times do not depend on the machine",
        "",
        "| method | simulated h to 80 % | to 90 % | to 95 % | simulated h, whole run | median round s | "
        "final acc | upload per client per round, MiB | total MiB (both directions) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {' | '.join(hours(t) for t in row['reach'])} | {row['total_s'] / 3600:.3f} | "
            f"{row['median_round_s']:.1f} | {row['final']:.4f} | {row['upload_per_client_MiB']:.3f} | "
            f"{row['total_MiB']:,.1f} |"
        )
    if wall:
        lines += ["", "Wall seconds per run (shared machine): " + ", ".join(f"{m} {w:.0f}" for m, w in wall.items())]
    table = "\n".join(lines) + "\n"
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "methods_on_clock.md").write_text(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for method, points in curves.items():
        axis.plot([t / 3600 for t, _ in points], [a for _, a in points], marker=".", label=method)
    axis.axhline(0.8, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xlabel("simulated hours (lognormal client speeds, sigma 1; 1 MB/s up, 5 MB/s down)")
    axis.set_ylabel("server test accuracy")
    axis.set_ylim(0.5, 1.0)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small")
    axis.set_title(f"Quickstart, six methods on one clock, seed {args.seed}")
    figure.savefig(REPO / "docs" / "methods_on_clock.png", dpi=120)


if __name__ == "__main__":
    main()
