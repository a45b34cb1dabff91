"""Start-up: the time from the command to round 1, and the import of the ``fedpeft`` command.

Each measurement is a fresh process. ``fit`` runs ``python -m fedpeft_pl.cli fit --config <config>``
and stops it when the method line appears (printed right before round 1 starts); ``import`` runs
``python -c "import fedpeft_pl.cli"``. Both report wall time and the process's CPU time (user +
system, read from ``/proc``: on a machine shared with other work the CPU time is the steadier
figure). Several checkouts are measured side by side, interleaved, so that they share the machine's
state; the table gives medians.

    python benchmarks/startup.py --repeats 5                                   # this checkout
    python benchmarks/startup.py --repeats 5 --checkout ../before --checkout .   # before and after
    python benchmarks/startup.py --config benchmarks/configs/vit_b16.yaml --fit-args --trainer.accelerator cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process (Linux: /proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _environment(checkout: Path) -> dict[str, str]:
    # the checkout's own package first, whatever the environment has installed
    return dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1")


def to_round_one(checkout: Path, configs: list[str], fit_args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds from the start of ``fedpeft fit`` to its method line (round 1 starts next)."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "fedpeft_pl.cli", "fit"]
        for config in configs:
            command += ["--config", str((REPO / config).resolve())]
        command += ["--trainer.logger.init_args.save_dir", folder, "--trainer.enable_progress_bar", "false"]
        started = time.perf_counter()
        process = subprocess.Popen(
            command + fit_args, cwd=checkout, env=_environment(checkout), stderr=subprocess.PIPE, text=True
        )
        assert process.stderr is not None
        try:
            for line in process.stderr:
                if line.startswith("method:"):
                    return time.perf_counter() - started, _cpu_seconds(process.pid)
            raise RuntimeError(f"{checkout}: the run ended before round 1 (exit {process.wait()})")
        finally:
            process.kill()
            process.wait()


def import_time(checkout: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``import fedpeft_pl.cli`` in a fresh process."""
    code = "import os, time, fedpeft_pl.cli; t = os.times(); print(t.user + t.system)"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=checkout, env=_environment(checkout), capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return time.perf_counter() - started, float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", type=Path, help="a checkout to measure (default: this one)")
    parser.add_argument("--config", action="append", help="config files of the fit (default: the quickstart)")
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="further arguments of the fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", nargs="+", choices=["import", "fit"], default=["import", "fit"])
    args = parser.parse_args()
    checkouts = [c.resolve() for c in (args.checkout or [REPO])]
    configs = args.config or ["configs/quickstart.yaml"]
    results: dict[tuple[Path, str], list[tuple[float, float]]] = {}
    for repeat in range(args.repeats):
        for checkout in checkouts:  # interleaved: every checkout meets the same machine
            for what in args.measure:
                wall, cpu = (
                    import_time(checkout) if what == "import" else to_round_one(checkout, configs, args.fit_args)
                )
                results.setdefault((checkout, what), []).append((wall, cpu))
                print(
                    f"repeat {repeat + 1} {checkout.name} {what}: {wall:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr
                )
    print(f"configs: {' '.join(configs)} {' '.join(args.fit_args)}; {args.repeats} runs each, medians\n")
    print("| checkout | import: wall s | import: CPU s | command to round 1: wall s | command to round 1: CPU s |")
    print("|---|---|---|---|---|")
    for checkout in checkouts:
        row = [checkout.name]
        for what in ("import", "fit"):
            runs = results.get((checkout, what), [(float("nan"), float("nan"))])
            row += [f"{statistics.median(w for w, _ in runs):.2f}", f"{statistics.median(c for _, c in runs):.2f}"]
        print("| " + " | ".join(row) + " |")
    if len(checkouts) == 2:
        first, last = checkouts
        for what in args.measure:
            for index, unit in ((0, "wall"), (1, "CPU")):
                before = statistics.median(r[index] for r in results[(first, what)])
                after = statistics.median(r[index] for r in results[(last, what)])
                print(f"\n{what} {unit}: {last.name} takes {after / before:.0%} of {first.name}'s", end="")
        print()


if __name__ == "__main__":
    main()
