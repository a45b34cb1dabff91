"""The methods beyond FedPEFT next to the paper's six, on the quickstart task with per-client evaluation.

    python benchmarks/beyond.py --seeds 0                     # every row below, seed 0
    python benchmarks/beyond.py --rows ffa-lora fedsa-lora    # a few rows

Every run is ``fedpeft fit --config configs/quickstart.yaml --config <overlay>`` with each
client's partition split (seeded) into local train and local test (``data.client_test_fraction``,
0.2 for every row, so all rows train on the same samples). Reported: the server's accuracy of the
global model on the global test split, the sample-weighted mean and the worst decile of client
accuracy on the clients' local test splits (for a personalised method, each client's own model),
and the MiB sent over the run. Logs go to ``runs/beyond/<row>`` and the table to
``benchmarks/results/beyond.md``. A row whose finished run is already there is read, not run again
(``--force`` re-runs it), so rows can be added one at a time and tabulated together.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = {
    # the paper's six methods
    "head": "configs/quickstart/head.yaml",
    "bias": "configs/quickstart/bias.yaml",
    "adapter": "configs/quickstart/adapter.yaml",
    "prompt": "configs/quickstart/prompt.yaml",
    "lora": "configs/quickstart/lora.yaml",
    "full": "configs/quickstart/full.yaml",
    # beyond FedPEFT
    "ffa-lora": "configs/quickstart/beyond/ffa-lora.yaml",
    "fedsa-lora": "configs/quickstart/personal/fedsa-lora.yaml",
    "hetlora": "configs/quickstart/beyond/hetlora.yaml",
    "flora": "configs/quickstart/beyond/flora.yaml",
    "hf-dora": "configs/quickstart/beyond/hf-dora.yaml",
    "hf-ia3": "configs/quickstart/beyond/hf-ia3.yaml",
    "fedper": "configs/quickstart/personal/fedper.yaml",
    "fedrep": "configs/quickstart/personal/fedrep.yaml",
}
CLIENT_TEST_FRACTION = 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "beyond")
    parser.add_argument("--rounds", type=int, default=None, help="fewer rounds than the quickstart's 30 (a smoke run)")
    parser.add_argument("--force", action="store_true", help="re-run rows whose finished runs are there")
    args = parser.parse_args()

    from fedpeft_pl.analysis import load_run
    from fedpeft_pl.comm import MIB

    rows = []
    for row in args.rows:
        results = []
        for seed in args.seeds:
            save_dir = args.out / row
            run_dir = save_dir / row / f"seed{seed}"
            if not args.force and _finished(run_dir, args.rounds or 30):
                print(f"== {row} / seed {seed}: read from {run_dir}", flush=True)
                results.append(_figures(load_run(run_dir), MIB))
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            command = [
                sys.executable,
                "-m",
                "fedpeft_pl.cli",
                "fit",
                "--config",
                "configs/quickstart.yaml",
                "--config",
                ROWS[row],
                "--data.client_test_fraction",
                str(CLIENT_TEST_FRACTION),
                "--seed_everything",
                str(seed),
                "--trainer.seed",
                str(seed),
                "--data.seed",
                str(seed),
                "--trainer.logger.init_args.save_dir",
                str(save_dir),
                "--trainer.logger.init_args.name",
                row,
                "--trainer.logger.init_args.version",
                f"seed{seed}",
                "--trainer.enable_progress_bar",
                "false",
            ]
            if args.rounds is not None:
                command += ["--trainer.num_rounds", str(args.rounds)]
            print(f"== {row} / seed {seed}", flush=True)
            subprocess.run(command, cwd=REPO, check=True)
            results.append(_figures(load_run(run_dir), MIB))
        rows.append((row, results))

    def cells(values: list) -> str:
        shown = [v for v in values if v is not None]
        if not shown:
            return "-"
        return ", ".join(f"{v:.4f}" for v in shown) + (
            f" (mean {statistics.fmean(shown):.4f})" if len(shown) > 1 else ""
        )

    lines = [
        f"Quickstart task (digits, N=16, m=8, Dirichlet 0.5, {args.rounds or 30} rounds x 5 local epochs), each "
        "client's data split "
        f"{1 - CLIENT_TEST_FRACTION:.0%} local train / {CLIENT_TEST_FRACTION:.0%} local test; seeds {args.seeds}.",
        "",
        f"Command: `python benchmarks/beyond.py --rows {' '.join(args.rows)} --seeds {' '.join(map(str, args.seeds))}"
        + (f" --rounds {args.rounds}" if args.rounds else "")
        + "`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}",
        "",
        "| row | server acc | clients acc mean | clients acc worst decile | total MiB sent |",
        "|---|---|---|---|---|",
    ]
    for row, results in rows:
        server, mean, p10, mib = zip(*results)
        lines.append(
            f"| {row} | {cells(list(server))} | {cells(list(mean))} | {cells(list(p10))} | "
            f"{statistics.fmean(mib):,.2f} |"
        )
    table = "\n".join(lines) + "\n"
    results_dir = REPO / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "beyond.md").write_text(table)
    print(table)


def _finished(run_dir: Path, rounds: int) -> bool:
    from fedpeft_pl.analysis import load_run

    try:
        return load_run(run_dir).rounds == rounds
    except Exception:  # no run there, or one without logs yet
        return False


def _figures(run, mib: int) -> tuple:
    """Server accuracy, clients' mean and worst-decile accuracy after the last round, and MiB sent."""
    last = {tag: run.series(tag)[1][-1] for tag in ("clients/acc_mean", "clients/acc_p10") if tag in run.scalars}
    return run.final_accuracy, last.get("clients/acc_mean"), last.get("clients/acc_p10"), run.total_bytes / mib


if __name__ == "__main__":
    main()
