"""``fedpeft report RUN_DIR... [--output DIR]``: compare finished runs from their logs.

Reads what a run's TensorBoard logger or Lightning's ``CSVLogger`` wrote (:mod:`fedpeft_pl.analysis`).

Writes ``DIR/report.md`` (the comparison table of :func:`fedpeft_pl.analysis.summarize`) and,
where matplotlib is installed (``pip install 'fedpeft-pl[analysis]'``), two figures,
``DIR/accuracy_vs_mib.png`` and ``DIR/accuracy_vs_round.png``. A run that logged fewer rounds than
its ``config.yaml`` asks for (stopped, crashed, still running) is skipped with a note.

Example::

    fedpeft report runs/quickstart --output report
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

import yaml

from fedpeft_pl.analysis import Run, format_table, load_runs, summarize
from fedpeft_pl.errors import ConfigError

log = logging.getLogger(__name__)


def planned_rounds(run: Run) -> Optional[int]:
    """The rounds the run's ``config.yaml`` asked for, or None without one."""
    config = run.path / "config.yaml"
    if not config.is_file():
        return None
    trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
    rounds = trainer.get("num_rounds")
    return int(rounds) if isinstance(rounds, int) else None


def unfinished_reason(run: Run) -> Optional[str]:
    """Why ``run`` is not a finished run, or None if it is."""
    planned = planned_rounds(run)
    if run.rounds == 0:
        return "no round logged"
    if planned is not None and run.rounds < planned:
        return f"{run.rounds} of {planned} rounds"
    return None


FIGURES = ("accuracy_vs_mib.png", "accuracy_vs_round.png")
NO_MATPLOTLIB = "figures not drawn: they need matplotlib (pip install 'fedpeft-pl[analysis]')"


def write_report(run_dirs: list[str], output: str = "report") -> tuple[Path, list[Path]]:
    """Write the table of the finished runs under ``run_dirs`` to ``output``, and their figures where matplotlib
    is installed; return the table's path and the figures' paths (none without matplotlib)."""
    try:
        runs = load_runs(*run_dirs)
    except FileNotFoundError as err:
        raise ConfigError(f"{err}; give run folders that fedpeft fit wrote, e.g. runs/quickstart") from None
    finished = []
    for run in runs:
        reason = unfinished_reason(run)
        if reason is None:
            finished.append(run)
        else:
            log.warning(f"skipped {run.path}: it never finished ({reason})")
    if not finished:
        raise ConfigError(
            f"no finished run under {', '.join(run_dirs)}; a run counts once it has logged all its rounds"
        )
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "report.md"
    table.write_text(f"# fedpeft report\n\nRuns: {', '.join(run_dirs)}\n\n{format_table(summarize(finished))}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table needs none of it; the figures are the analysis extra's
        log.warning(NO_MATPLOTLIB)
        return table, []
    figures = []
    for name, xlabel, series in zip(
        FIGURES,
        ("cumulative communication, both directions (MiB)", "round"),
        (Run.accuracy_vs_megabytes, lambda run: run.series("server/acc")),
    ):
        figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
        for run in finished:
            x, accuracy = series(run)
            axis.plot(x, accuracy, marker=".", label=run.name)
        if name == "accuracy_vs_mib.png":
            axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("server test accuracy")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
        figure.savefig(folder / name, dpi=120)
        plt.close(figure)
        figures.append(folder / name)
    return table, figures


def report_command(argv: list[str]) -> None:
    """``fedpeft report``'s command line."""
    parser = argparse.ArgumentParser(
        prog="fedpeft report",
        description="Compare finished runs: a Markdown table (report.md) and accuracy-vs-MiB and accuracy-vs-round "
        "figures (PNG) from their TensorBoard logs or CSVLogger metrics.csv. Runs that never finished are skipped. "
        "The figures need matplotlib: pip install 'fedpeft-pl[analysis]'.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder or a folder of runs, e.g. runs/quickstart"
    )
    parser.add_argument(
        "--output", default="report", metavar="DIR", help="where to write report.md and the figures (default: report)"
    )
    parser.error = lambda message: (_ for _ in ()).throw(ConfigError(f"report: {message}; see fedpeft report --help"))  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    table, figures = write_report(args.run_dirs, args.output)
    print("wrote " + ", ".join(str(path) for path in (table, *figures)))
