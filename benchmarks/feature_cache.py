"""The Head feature cache on the quickstart: the same run with and without it, timed.

    python benchmarks/feature_cache.py                      # 1 repeat, sequential runner
    python benchmarks/feature_cache.py --repeats 3 --runners sequential vectorized
    python benchmarks/feature_cache.py --threads 1     # one intra-op thread per run (OMP_NUM_THREADS=1)

Each run is ``fedpeft fit --config configs/quickstart.yaml --config configs/quickstart/head.yaml``
(30 rounds x 5 local epochs, 8 of 16 clients a round) in a fresh process, with
``--trainer.feature_cache off`` (every step through the backbone) or ``auto`` (each image through
the backbone once, then the classifier on features). Runs alternate off / auto. Reported: the
fit's wall time as the run's closing line prints it (data and model set-up included, interpreter
start-up not), the process's wall time, their ratios of medians, and the largest difference between
the two runs' final global states (read from their ``last.ckpt``) and final server accuracies.
Results go to benchmarks/results/feature_cache.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGET = 20.0


def run(mode: str, runner: str, out: Path, threads: int | None) -> tuple[float, float, dict[str, torch.Tensor], float]:
    """Fit seconds, process seconds, final trainable state and final server accuracy of one run."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "fedpeft_pl.cli",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--config",
        "configs/quickstart/head.yaml",
        "--trainer.feature_cache",
        mode,
        "--trainer.client_runner",
        runner,
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.version",
        "run",
        "--trainer.enable_progress_bar",
        "false",
    ]
    started = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, env=env)
    process = time.perf_counter() - started
    match = re.search(r"done: \d+ rounds, [\d.]+ MiB sent, in ([\d.]+) s; final server accuracy ([\d.]+)", done.stderr)
    if match is None:
        raise RuntimeError(f"no closing line in the run's output:\n{done.stderr[-2000:]}")
    checkpoint = torch.load(out / "head" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return float(match.group(1)), process, checkpoint["state_dict"], float(match.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS for every run (torch's intra-op threads); default: torch's choice"
    )
    parser.add_argument(
        "--runners",
        nargs="+",
        default=["sequential"],
        choices=["sequential", "vectorized", "auto"],
        help="trainer.client_runner; auto (the default) trains cached features on the vectorised runner",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for runner in args.runners:
            times: dict[str, list[tuple[float, float]]] = {"off": [], "auto": []}
            diff, accuracies = 0.0, {}
            for repeat in range(args.repeats):
                states = {}
                for mode in ("off", "auto"):
                    fit, process, states[mode], accuracies[mode] = run(mode, runner, Path(scratch) / mode, args.threads)
                    times[mode].append((fit, process))
                    print(
                        f"{runner}, feature cache {mode}, repeat {repeat + 1}: fit {fit:.1f} s, process {process:.1f} "
                        "s, "
                        f"server accuracy {accuracies[mode]:.4f}",
                        flush=True,
                    )
                diff = max(diff, max(float((states["off"][n] - states["auto"][n]).abs().max()) for n in states["off"]))
                print(f"{runner}, repeat {repeat + 1}: largest final-state difference {diff:.1e}", flush=True)
            fit_off, fit_on = (statistics.median(t[0] for t in times[m]) for m in ("off", "auto"))
            proc_off, proc_on = (statistics.median(t[1] for t in times[m]) for m in ("off", "auto"))
            rows.append(
                f"| {runner} | {fit_off:.1f} | {fit_on:.1f} | {fit_off / fit_on:.1f}x | {proc_off:.1f} | {proc_on:.1f} "
                "| "
                f"{proc_off / proc_on:.1f}x | {diff:.1e} | {accuracies['off']:.4f} / {accuracies['auto']:.4f} |"
            )
            print(rows[-1], flush=True)
    lines = [
        "# Head feature cache on the quickstart (30 rounds x 5 local epochs, 8 of 16 clients a round)",
        "",
        f"Command: `python benchmarks/feature_cache.py --repeats {args.repeats} --runners {' '.join(args.runners)}"
        + (f" --threads {args.threads}" if args.threads else "")
        + "`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), load average at the end "
        f"{os.getloadavg()[0]:.1f}; medians of {args.repeats} alternating run(s) per side",
        "",
        "| runner | fit s, no cache | fit s, cache | fit ratio | process s, no cache | process s, cache | process "
        "ratio "
        "| max final-state diff | final server accuracy (no cache / cache) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Target: at least {TARGET:.0f}x on the fit's wall time.",
    ]
    table = "\n".join(lines) + "\n"
    name = "feature_cache.md" if not args.threads else f"feature_cache-threads{args.threads}.md"
    if "auto" in args.runners:
        name = name.replace(".md", "-auto.md")
    (REPO / "benchmarks" / "results" / name).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
