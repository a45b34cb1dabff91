"""Run the quickstart task with all six methods, same seeds, and compare accuracy and bytes.

    python benchmarks/quickstart_comparison.py                 # seed 0, about 15 minutes on 2 CPU cores
    python benchmarks/quickstart_comparison.py --seeds 0 1 2   # several seeds

Each method runs ``fedpeft fit --config configs/quickstart.yaml --config configs/quickstart/<method>.yaml``
with the data, sampling and initialisation seeds set to the same value. Logs go to
``<out>/<method>/seed<k>``; the table goes to benchmarks/results/quickstart_comparison.md and the
figure (first seed) to docs/quickstart_comparison.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedpeft_pl.peft import METHOD_NAMES

REPO = Path(__file__).resolve().parents[1]
METHODS = list(METHOD_NAMES)
TARGET_ACCURACY = 0.85
TARGET_GAP_TO_FULL = 0.05
TARGET_BYTE_RATIO = 30.0
TARGET_SECONDS = 300.0


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
        "--seed_everything",
        str(seed),
        "--trainer.seed",
        str(seed),
        "--data.seed",
        str(seed),
        "--trainer.logger.init_args.save_dir",
        str(out),
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quickstart")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = parser.parse_args()

    from fedpeft_pl.analysis import load_run, plot_accuracy
    from fedpeft_pl.comm import MIB

    seconds: dict[tuple[str, int], float] = {}
    for seed in args.seeds:
        for method in args.methods:
            print(f"== {method}, seed {seed}", flush=True)
            seconds[(method, seed)] = run(method, seed, args.out)

    runs = {(m, s): load_run(args.out / m / f"seed{s}", name=m) for m in args.methods for s in args.seeds}
    rows = []
    for method in args.methods:
        first = runs[(method, args.seeds[0])]
        _, upload = first.series("comm/bytes_up")
        rows.append(
            {
                "method": method,
                "accuracy": [runs[(method, s)].final_accuracy for s in args.seeds],
                "upload_MiB_per_round": upload[-1] / MIB,
                "total_MiB": first.total_bytes / MIB,
                "seconds": [seconds[(method, s)] for s in args.seeds],
            }
        )

    full = next((r for r in rows if r["method"] == "full"), None)
    for row in rows:
        row["x_fewer_bytes"] = full["total_MiB"] / row["total_MiB"] if full else float("nan")
    lines = [
        f"Quickstart task, {len(args.seeds)} seed(s) {args.seeds}: digits over N=16 clients, m=8 a round, "
        "Dirichlet(0.5), 30 rounds x 5 local epochs, frozen MNIST-pre-trained tiny ViT.",
        "",
        f"Command: `python benchmarks/quickstart_comparison.py --seeds {' '.join(map(str, args.seeds))}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}, "
        f"{_versions()}",
        "",
        "| method | final server accuracy (per seed) | mean | points below Full | upload MiB/round | total MiB (both "
        "directions) | x fewer bytes than Full | wall seconds per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for row in rows:
        mean = statistics.fmean(row["accuracy"])
        gap = (statistics.fmean(full["accuracy"]) - mean) * 100 if full else float("nan")  # points below Full
        lines.append(
            f"| {row['method']} | {', '.join(f'{a:.4f}' for a in row['accuracy'])} | {mean:.4f} | {gap:.1f} | "
            f"{row['upload_MiB_per_round']:.3f} | {row['total_MiB']:,.1f} | "
            f"{row['x_fewer_bytes']:,.1f} | {', '.join(f'{s:.0f}' for s in row['seconds'])} |"
        )
        if row["method"] != "full" and full:
            checks.append(
                (f"{row['method']}: accuracy >= {TARGET_ACCURACY:.0%}", min(row["accuracy"]) >= TARGET_ACCURACY)
            )
            checks.append(
                (
                    f"{row['method']}: within {TARGET_GAP_TO_FULL * 100:.0f} points of Full",
                    gap <= TARGET_GAP_TO_FULL * 100,
                )
            )
            checks.append(
                (
                    f"{row['method']}: >= {TARGET_BYTE_RATIO:.0f}x fewer bytes than Full",
                    row["x_fewer_bytes"] >= TARGET_BYTE_RATIO,
                )
            )
    checks.append(
        (
            f"prompt (the quickstart) run <= {TARGET_SECONDS:.0f} s",
            all(s <= TARGET_SECONDS for s in next(r for r in rows if r["method"] == "prompt")["seconds"])
            if "prompt" in args.methods
            else False,
        )
    )
    lines += ["", "Targets:", ""] + [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks]
    table = "\n".join(lines) + "\n"
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "quickstart_comparison.md").write_text(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    figure = plot_accuracy(
        [runs[(m, args.seeds[0])] for m in args.methods], title=f"Quickstart: digits, 16 clients, seed {args.seeds[0]}"
    )
    figure.savefig(REPO / "docs" / "quickstart_comparison.png", dpi=120)


def _versions() -> str:
    import lightning
    import timm
    import torch

    return f"torch {torch.__version__}, lightning {lightning.__version__}, timm {timm.__version__}"


if __name__ == "__main__":
    main()
