"""Launch the paper's experiment grid and collect its results into one table.

Each grid point is ``fedpeft fit --config configs/<method>.yaml`` plus overlays from
``configs/experiments/`` (a client setting, a data set, optionally a DP setting), logging to
``<out>/<dataset>/<setting>[-<dp>]/<method>/``.

    python scripts/grid.py print                       # the commands, one per line (e.g. for a cluster queue)
    python scripts/grid.py run --methods prompt full   # run them here, one after another
    python scripts/grid.py collect > results.md        # one Markdown table of every finished run

Choose a subset with --methods, --settings, --datasets and --dp; add any extra ``fedpeft fit``
arguments after ``--``, e.g. ``-- --trainer.num_rounds 5``.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from pathlib import Path

from fedpeft_pl.peft import METHOD_NAMES

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"
METHODS = list(METHOD_NAMES)
SETTINGS = sorted(p.stem for p in (EXPERIMENTS / "settings").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (EXPERIMENTS / "datasets").glob("*.yaml"))
DP = ["none", *sorted(p.stem for p in (EXPERIMENTS / "dp").glob("*.yaml"))]


def grid_points(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    return list(itertools.product(args.datasets, args.settings, args.dp, args.methods))


def command(dataset: str, setting: str, dp: str, method: str, out: Path, extra: list[str]) -> list[str]:
    configs = [
        f"configs/{method}.yaml",
        f"configs/experiments/settings/{setting}.yaml",
        f"configs/experiments/datasets/{dataset}.yaml",
    ]
    if dp != "none":
        configs.append(f"configs/experiments/dp/{dp}.yaml")
    group = setting if dp == "none" else f"{setting}-{dp}"
    args = ["fedpeft", "fit"]
    for config in configs:
        args += ["--config", config]
    return [*args, "--trainer.logger.init_args.save_dir", str(out / dataset / group), *extra]


def collect(out: Path) -> str:
    from fedpeft_pl.analysis import load_run

    rows = [
        "| dataset | setting | method | rounds | final server accuracy | total MiB sent |",
        "|---|---|---|---|---|---|",
    ]
    for run_dir in sorted(out.glob("*/*/*/version_*")):
        dataset, setting, method = run_dir.relative_to(out).parts[:3]
        run = load_run(run_dir)
        accuracy = f"{run.final_accuracy:.4f}" if run.final_accuracy is not None else "-"
        rows.append(
            f"| {dataset} | {setting} | {method} | {run.rounds} | {accuracy} | {run.total_bytes / 2**20:,.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["print", "run", "collect"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--dp", nargs="+", default=["none"], choices=DP)
    parser.add_argument("--out", type=Path, default=Path("runs/grid"))
    args, extra = parser.parse_known_args()
    extra = extra[1:] if extra[:1] == ["--"] else extra
    if args.action == "collect":
        print(collect(args.out))
        return
    for point in grid_points(args):
        words = command(*point, args.out, extra)
        if args.action == "print":
            print(" ".join(words))
        else:
            print(f"== {' / '.join(point)}", flush=True)
            result = subprocess.run([sys.executable, "-m", "fedpeft_pl.cli", *words[1:]], cwd=REPO)
            if result.returncode != 0:
                print(f"   failed with exit status {result.returncode}", flush=True)


if __name__ == "__main__":
    main()
