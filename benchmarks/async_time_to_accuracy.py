"""Time to accuracy on a simulated clock: synchronous FedAvg, synchronous with over-selection and a
deadline, FedBuff and FedAsync on the quickstart task with heavy-tailed client speeds.

    python benchmarks/async_time_to_accuracy.py --seeds 0 1 2
    python benchmarks/async_time_to_accuracy.py --seeds 0 1 2 --modes sync fedbuff-lr2 --reuse   # add a row

Every mode runs ``fedpeft fit --config configs/quickstart.yaml --config configs/quickstart/clock.yaml``
(lognormal client speeds with sigma 1, 1 MB/s up, 5 MB/s down, 0.1 s latency) plus its schedule
overlay, with the data, sampling and initialisation seeds set to the same value. For each seed the
target is the synchronous run's final server accuracy; each mode's time to accuracy is the simulated
time (``time/simulated_seconds``) of the first server update whose evaluation (``server/acc``)
reaches it. Logs go to ``<out>/<mode>/seed<k>``; the table to
benchmarks/results/async_time_to_accuracy.md.

``--reuse`` reads a mode's logs again where its folder already holds a finished run instead of
re-running it (the same command would reproduce them).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["--config", "configs/quickstart.yaml", "--config", "configs/quickstart/clock.yaml"]
FEDAVG_SERVER_LR = (
    "{{class_path: fedpeft_pl.strategies.FedAvg, init_args: {{server_optimizer: "
    "{{class_path: fedpeft_pl.strategies.ServerSGD, init_args: {{lr: {lr}}}}}}}}}"
)

# mode -> (label, extra arguments, tuned?)
MODES: dict[str, tuple[str, list[str], bool]] = {
    "sync": ("synchronous FedAvg, 30 rounds of 8", [], False),
    "deadline": (
        "synchronous, over-selection 0.3 (11 sampled, first 8 kept), 30 s deadline",
        ["--config", "configs/quickstart/deadline.yaml"],
        False,
    ),
    "fedbuff": (
        "FedBuff, C=8, K=4, 1/sqrt(1+s), 60 updates",
        ["--config", "configs/quickstart/fedbuff.yaml"],
        False,
    ),
    "fedasync": (
        "FedAsync, C=8, mixing 0.6, 240 updates (evaluated every 4th)",
        ["--config", "configs/quickstart/fedasync.yaml", "--trainer.check_val_every_n_epoch", "4"],
        False,
    ),
    # tuned rows: the same FedBuff with a server learning rate on the buffered update
    "fedbuff-lr2": (
        "FedBuff as above, server SGD lr 2 (tuned)",
        [
            "--config",
            "configs/quickstart/fedbuff.yaml",
            "--trainer.aggregation",
            FEDAVG_SERVER_LR.format(lr=2.0),
        ],
        True,
    ),
    "fedbuff-k2": (
        "FedBuff, C=8, K=2, 120 updates (tuned)",
        [
            "--config",
            "configs/quickstart/fedbuff.yaml",
            "--trainer.schedule.init_args.buffer_size",
            "2",
            "--trainer.num_rounds",
            "120",
            "--trainer.check_val_every_n_epoch",
            "2",
        ],
        True,
    ),
    "fedbuff-c16": (
        "FedBuff, C=16, K=8, 30 updates (tuned)",
        [
            "--config",
            "configs/quickstart/fedbuff.yaml",
            "--trainer.schedule.init_args.concurrency",
            "16",
            "--trainer.schedule.init_args.buffer_size",
            "8",
            "--trainer.num_rounds",
            "30",
        ],
        True,
    ),
}


def run(mode: str, seed: int, out: Path, method: str = "prompt") -> float:
    log_dir = out / mode / f"seed{seed}"
    shutil.rmtree(log_dir, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "fedpeft_pl.cli",
        "fit",
        *with_method(method),
        *MODES[mode][1],
        "--seed_everything",
        str(seed),
        "--trainer.seed",
        str(seed),
        "--data.seed",
        str(seed),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        mode,
        "--trainer.logger.init_args.version",
        f"seed{seed}",
        "--trainer.enable_progress_bar",
        "false",
    ]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - started


def with_method(method: str) -> list[str]:
    """The quickstart and its clock, with a method's overlay between them (Prompt is the quickstart's own)."""
    return BASE if method == "prompt" else [*BASE[:2], "--config", f"configs/quickstart/{method}.yaml", *BASE[2:]]


def finished(path: Path) -> bool:
    if not path.is_dir():
        return False
    from fedpeft_pl.analysis import load_run

    run = load_run(path)
    return bool(run.series("time/simulated_seconds")[1]) and run.final_accuracy is not None


def curve(path: Path) -> dict[str, object]:
    """A run's accuracy against simulated seconds (pairs at the updates that were evaluated)."""
    from fedpeft_pl.analysis import load_run

    run = load_run(path)
    seconds = dict(run.scalars["time/simulated_seconds"])
    accuracy = run.scalars["server/acc"]
    _, cumulative = run.series("comm/cumulative_bytes")
    late = sum(v for _, v in run.scalars.get("comm/bytes_late", []))
    staleness = [v for _, v in run.scalars.get("async/staleness_mean", [])]
    return {
        "points": [(seconds[step], value) for step, value in accuracy if step in seconds],
        "final": accuracy[-1][1],
        "best": max(v for _, v in accuracy),
        "duration": max(seconds.values()),
        "updates": len(seconds),
        "bytes": cumulative[-1],
        "late_bytes": late,
        "staleness": statistics.fmean(staleness) if staleness else None,
    }


def time_to(points: list[tuple[float, float]], target: float) -> float:
    return next((t for t, a in points if a >= target - 1e-9), math.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["sync", "deadline", "fedbuff", "fedasync"], choices=list(MODES))
    parser.add_argument(
        "--method",
        default="prompt",
        choices=["head", "bias", "adapter", "prompt", "lora", "full"],
        help="the PEFT method (configs/quickstart/<method>.yaml); prompt is the quickstart's own",
    )
    parser.add_argument("--out", type=Path, default=None, help="runs/async_time_to_accuracy[_<method>] by default")
    parser.add_argument("--reuse", action="store_true", help="read finished runs' logs instead of re-running them")
    parser.add_argument(
        "--results", type=Path, default=None, help="benchmarks/results/async_time_to_accuracy[_<method>].md"
    )
    args = parser.parse_args()
    suffix = "" if args.method == "prompt" else f"_{args.method}"
    args.out = args.out or REPO / "runs" / f"async_time_to_accuracy{suffix}"
    args.results = args.results or REPO / "benchmarks" / "results" / f"async_time_to_accuracy{suffix}.md"
    modes = ["sync"] + [m for m in args.modes if m != "sync"]

    wall: dict[tuple[str, int], float] = {}
    for seed in args.seeds:
        for mode in modes:
            path = args.out / mode / f"seed{seed}"
            if args.reuse and finished(path):
                continue
            print(f"== {mode}, seed {seed}", flush=True)
            wall[(mode, seed)] = run(mode, seed, args.out, args.method)

    from fedpeft_pl.comm import MIB

    curves = {(m, s): curve(args.out / m / f"seed{s}") for m in modes for s in args.seeds}
    target = {s: curves[("sync", s)]["final"] for s in args.seeds}
    sync_time = {s: time_to(curves[("sync", s)]["points"], target[s]) for s in args.seeds}

    def fmt_time(t: float) -> str:
        return "never" if math.isinf(t) else f"{t:,.0f}"

    def median(values: list[float]) -> float:
        return statistics.median(values)  # inf sorts last, so a median over 3 is finite if 2 reached

    seeds = " ".join(map(str, args.seeds))
    lines = [
        f"Quickstart task ({args.method}, digits over 16 clients, Dirichlet(0.5), 5 local epochs) on the clock of "
        "configs/quickstart/clock.yaml: client speeds lognormal (median 50 samples/s, sigma 1), 1 MB/s up, "
        "5 MB/s down, 0.1 s latency. Target per seed: the synchronous run's final server accuracy.",
        "",
        f"Command: `python benchmarks/async_time_to_accuracy.py --method {args.method} --seeds {seeds} "
        f"--modes {' '.join(modes)}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}, "
        f"{_versions()}; simulated times do not depend on the machine",
        "",
        "| mode | target (sync final acc) per seed | simulated s to target per seed | median s | "
        "x faster than sync (median) | simulated s to target - 1 point, per seed | median | "
        "final acc per seed | best acc per seed | simulated s of the whole run "
        "(median) | server updates | MiB sent (both directions, median) | of which late (discarded), MiB | "
        "mean staleness |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for mode in modes:
        c = [curves[(mode, s)] for s in args.seeds]
        times = [time_to(curves[(mode, s)]["points"], target[s]) for s in args.seeds]
        near = [time_to(curves[(mode, s)]["points"], target[s] - 0.01) for s in args.seeds]
        med = median(times)
        speedup = median([sync_time[s] / t if t else math.inf for s, t in zip(args.seeds, times)])
        summary[mode] = (med, speedup)
        staleness = [x["staleness"] for x in c if x["staleness"] is not None]
        finals = ", ".join(f"{x['final']:.4f}" for x in c)
        mean_staleness = f"{statistics.fmean(staleness):.2f}" if staleness else "-"
        bests = ", ".join(f"{x['best']:.4f}" for x in c)
        lines.append(
            f"| {MODES[mode][0]} | {', '.join(f'{target[s]:.4f}' for s in args.seeds)} | "
            f"{', '.join(fmt_time(t) for t in times)} | {fmt_time(med)} | "
            f"{'-' if math.isinf(med) else f'{speedup:.2f}x'} | "
            f"{', '.join(fmt_time(t) for t in near)} | {fmt_time(median(near))} | "
            f"{finals} | {bests} | "
            f"{statistics.median(x['duration'] for x in c):,.0f} | {c[0]['updates']} | "
            f"{statistics.median(x['bytes'] for x in c) / MIB:,.1f} | "
            f"{statistics.median(x['late_bytes'] for x in c) / MIB:,.1f} | "
            f"{mean_staleness} |"
        )
    walls = ", ".join(f"{m} seed {s}: {w:.0f}" for (m, s), w in wall.items())
    lines += ["", f"Wall seconds per run (this machine, shared with other work): {walls or 'runs read back (--reuse)'}"]
    if "fedbuff" in summary:
        _, speedup = summary["fedbuff"]
        lines += [
            "",
            "Target: FedBuff reaches the synchronous run's final accuracy in at most half its simulated time "
            f"(median speed-up >= 2x): [{'x' if speedup >= 2 else ' '}] ({speedup:.2f}x)",
        ]
    table = "\n".join(lines) + "\n"
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(table)
    print(table)


def _versions() -> str:
    import lightning
    import torch

    return f"torch {torch.__version__}, lightning {lightning.__version__}"


if __name__ == "__main__":
    main()
