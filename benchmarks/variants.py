"""Run variants of the quickstart task (overlay configs) for several methods and seeds, and tabulate them.

    python benchmarks/variants.py compression --seeds 0 2 3 --methods prompt bias \\
        --variant none= --variant int8=configs/experiments/compression/int8-upload.yaml

Each variant is ``name=overlay.yaml[,overlay2.yaml]`` (empty for the plain quickstart). Every run is
``fedpeft fit --config configs/quickstart.yaml --config configs/quickstart/<method>.yaml [overlays]``
with the same seeds for data, sampling and initialisation; logs go to ``runs/<name>/<variant>``
and the table to ``benchmarks/results/<name>.md``.
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

REPO = Path(__file__).resolve().parents[1]
METHODS = ["head", "bias", "adapter", "prompt", "lora", "full"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--variant", action="append", required=True, help="name=overlay.yaml[,...]")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs")
    args = parser.parse_args()

    from fedpeft_pl.analysis import load_run
    from fedpeft_pl.comm import MIB

    variants = [(v.split("=", 1)[0], [c for c in v.split("=", 1)[1].split(",") if c]) for v in args.variant]
    rows = []
    for variant, overlays in variants:
        for method in args.methods:
            accuracy, seconds, run = [], [], None
            for seed in args.seeds:
                save_dir = args.out / args.name / variant
                shutil.rmtree(save_dir / method / f"seed{seed}", ignore_errors=True)
                command = [
                    sys.executable,
                    "-m",
                    "fedpeft_pl.cli",
                    "fit",
                    "--config",
                    "configs/quickstart.yaml",
                    "--config",
                    f"configs/quickstart/{method}.yaml",
                ]
                for overlay in overlays:
                    command += ["--config", overlay]
                command += [
                    "--seed_everything",
                    str(seed),
                    "--trainer.seed",
                    str(seed),
                    "--data.seed",
                    str(seed),
                    "--trainer.logger.init_args.save_dir",
                    str(save_dir),
                    "--trainer.logger.init_args.version",
                    f"seed{seed}",
                    "--trainer.enable_progress_bar",
                    "false",
                ]
                print(f"== {variant} / {method} / seed {seed}", flush=True)
                started = time.perf_counter()
                subprocess.run(command, cwd=REPO, check=True)
                seconds.append(time.perf_counter() - started)
                run = load_run(save_dir / method / f"seed{seed}")
                accuracy.append(run.final_accuracy)
            _, upload = run.series("comm/bytes_up")
            _, download = run.series("comm/bytes_down")
            rows.append(
                (variant, method, accuracy, upload[-1] / MIB, download[-1] / MIB, run.total_bytes / MIB, seconds, run)
            )

    lines = [
        f"Quickstart task (digits, N=16, m=8, Dirichlet 0.5; 30 rounds x 5 local epochs unless an overlay says "
        f"otherwise), seeds {args.seeds}.",
        "",
        f"Command: `python benchmarks/variants.py {args.name} {' '.join('--variant ' + v for v in args.variant)} "
        f"--methods {' '.join(args.methods)} --seeds {' '.join(map(str, args.seeds))}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}",
        "",
        "| variant | method | accuracy per seed | mean | upload MiB/round | download MiB/round | total MiB | wall s "
        "per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, method, accuracy, up, down, total, seconds, _ in rows:
        lines.append(
            f"| {variant} | {method} | {', '.join(f'{a:.4f}' for a in accuracy)} | {statistics.fmean(accuracy):.4f} | "
            f"{up:.4f} | {down:.4f} | {total:,.2f} | {', '.join(f'{s:.0f}' for s in seconds)} |"
        )
    extra = [row[-1].scalars for row in rows if any(k.startswith("privacy/") for k in row[-1].scalars)]
    if extra:
        lines += ["", "Privacy spent by the end of the run (last seed):", ""]
        for variant, method, *_, run in rows:
            spent = {k: v[-1][1] for k, v in run.scalars.items() if k.startswith("privacy/")}
            if spent:
                lines.append(f"- {variant} / {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(spent.items())))
    table = "\n".join(lines) + "\n"
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
