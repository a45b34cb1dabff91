"""Start-up: the time from the command to round 1, and the commands that answer without training.

Each measurement is a fresh process. ``fit`` runs ``python -m fedpeft_pl.cli fit --config <config>``
and stops it when the method line appears (printed right before round 1 starts); ``help`` runs
``python -m fedpeft_pl.cli --help``, ``comm`` runs ``python -m fedpeft_pl.cli comm --config <config>``
to its end, ``import`` runs ``python -c "import fedpeft_pl.cli"`` and ``lightning`` ``python -c "import
lightning.pytorch"``. Each reports wall time and the
process's CPU time (user + system, read from ``/proc`` for ``fit`` and from the finished process's
resource usage for the others: on a machine shared with other work the CPU time is the steadier
figure). Several checkouts are measured side by side, interleaved, so that they share the machine's
state; the table gives medians.

    python benchmarks/startup.py --repeats 5                                   # this checkout
    python benchmarks/startup.py --repeats 5 --checkout ../before --checkout .   # before and after
    python benchmarks/startup.py --measure help comm fit --checkout ../before --checkout .
    python benchmarks/startup.py --config benchmarks/configs/vit_b16.yaml --fit-args --trainer.accelerator cpu
    python benchmarks/startup.py --measure comm fit --python .venv/bin/python --python ../plain/bin/python
    python benchmarks/startup.py --paired --checkout ../before --python ../old/bin/python \
        --checkout . --python ../new/bin/python

With several ``--python`` (environments: e.g. one with every extra installed, one with ``pip install -e .``
alone) each checkout is measured in each environment, interleaved too; with ``--paired`` the i-th checkout only in the
i-th environment (the code before in the install it had, against the code now in today's).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# what each measure times, as its table row names it
MEASURES = {
    "help": "--help",
    "comm": "comm",
    "import": "import fedpeft_pl.cli",
    "lightning": "import lightning.pytorch",
    "fit": "fit: command to round 1",
}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process (Linux: /proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _environment(checkout: Path) -> dict[str, str]:
    # the checkout's own package first, whatever the environment has installed
    return dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1")


def to_round_one(checkout: Path, configs: list[str], fit_args: list[str], python: str) -> tuple[float, float]:
    """Wall and CPU seconds from the start of ``fedpeft fit`` to its method line (round 1 starts next)."""
    with tempfile.TemporaryDirectory() as folder:
        command = [python, "-m", "fedpeft_pl.cli", "fit"]
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


def import_time(checkout: Path, python: str) -> tuple[float, float]:
    """Wall and CPU seconds of ``import fedpeft_pl.cli`` in a fresh process."""
    return command_time(checkout, ["-c", "import fedpeft_pl.cli"], python)


def command_time(checkout: Path, args: list[str], python: str) -> tuple[float, float]:
    """Wall and CPU seconds of ``python *args`` in a fresh process, run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([python, *args], cwd=checkout, env=_environment(checkout), capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", type=Path, help="a checkout to measure (default: this one)")
    parser.add_argument("--config", action="append", help="config files of the fit (default: the quickstart)")
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="further arguments of the fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python", action="append", help="a Python environment to measure in (default: this one)")
    parser.add_argument(
        "--measure", nargs="+", choices=list(MEASURES), default=["import", "fit"], help="what to time, in this order"
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="the i-th checkout in the i-th environment only (e.g. the code before in the install it had, and the "
        "code now in today's install), not every checkout in every environment",
    )
    args = parser.parse_args()
    pythons = args.python or [sys.executable]
    chosen = [c.resolve() for c in (args.checkout or [REPO])]
    if args.paired and len(chosen) != len(pythons):
        parser.error(f"--paired needs as many --python as --checkout, got {len(pythons)} and {len(chosen)}")
    pairs = list(zip(chosen, pythons)) if args.paired else [(c, python) for c in chosen for python in pythons]
    checkouts = [(c, python, c.name + (f" ({python})" if len(pythons) > 1 else "")) for c, python in pairs]
    configs = args.config or ["configs/quickstart.yaml"]
    config_args = [a for config in configs for a in ("--config", str((REPO / config).resolve()))]
    results: dict[tuple[Path, str], list[tuple[float, float]]] = {}
    for repeat in range(args.repeats):
        for checkout, python, name in checkouts:  # interleaved: every checkout meets the same machine
            for what in args.measure:
                if what == "import":
                    wall, cpu = import_time(checkout, python)
                elif what == "lightning":  # what every command that builds a config imports first
                    wall, cpu = command_time(checkout, ["-c", "import lightning.pytorch"], python)
                elif what == "fit":
                    wall, cpu = to_round_one(checkout, configs, args.fit_args, python)
                else:  # help, comm: the command, run to its end
                    command = ["--help"] if what == "help" else ["comm", *config_args]
                    wall, cpu = command_time(checkout, ["-m", "fedpeft_pl.cli", *command], python)
                results.setdefault((name, what), []).append((wall, cpu))
                print(f"repeat {repeat + 1} {name} {what}: {wall:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr)
    print(f"configs: {' '.join(configs)} {' '.join(args.fit_args)}; {args.repeats} runs each, medians\n")
    print("| measure | checkout | wall s | CPU s |")
    print("|---|---|---|---|")
    for what in args.measure:
        for _, _, name in checkouts:
            runs = results[(name, what)]
            wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
            print(f"| {MEASURES[what]} | {name} | {wall:.2f} | {cpu:.2f} |")
    if len(checkouts) == 2:
        first, last = (name for _, _, name in checkouts)
        for what in args.measure:
            for index, unit in ((0, "wall"), (1, "CPU")):
                before = statistics.median(r[index] for r in results[(first, what)])
                after = statistics.median(r[index] for r in results[(last, what)])
                print(f"\n{what} {unit}: {last} takes {after / before:.0%} of {first}'s", end="")
        print()


if __name__ == "__main__":
    main()
