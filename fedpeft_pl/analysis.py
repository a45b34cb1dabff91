"""Read the logs of federated runs and plot accuracy against communication.

A run is a folder that a TensorBoard logger wrote event files into, or that Lightning's
``CSVLogger`` wrote its ``metrics.csv`` into; both hold the same tags with the same steps.

Used by ``notebooks/accuracy_vs_communication.ipynb`` and the benchmark scripts::

    runs = load_runs("runs/quickstart")
    fig = plot_accuracy(runs)          # accuracy vs cumulative MB (like the paper's Figure 3) and vs round
    print(format_table(summarize(runs)))

Plotting needs matplotlib (``pip install fedpeft-pl[analysis]``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedpeft_pl.comm import MIB

PathLike = Union[str, Path]


@dataclass
class Run:
    """One run's scalars, read from its log directory."""

    name: str
    path: Path
    method: str
    scalars: dict[str, list[tuple[int, float]]]

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        points = self.scalars.get(tag, [])
        return [s for s, _ in points], [v for _, v in points]

    @property
    def rounds(self) -> int:
        return len(self.scalars.get("comm/cumulative_bytes", []))

    @property
    def final_accuracy(self) -> Optional[float]:
        _, accuracy = self.series("server/acc")
        return accuracy[-1] if accuracy else None

    @property
    def total_bytes(self) -> int:
        _, cumulative = self.series("comm/cumulative_bytes")
        return int(cumulative[-1]) if cumulative else 0

    def accuracy_vs_megabytes(self) -> tuple[list[float], list[float]]:
        """Server accuracy at each evaluated round against MiB sent so far (both directions)."""
        steps, accuracy = self.series("server/acc_vs_cumulative_bytes")
        return [s / MIB for s in steps], accuracy


EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's
CSV_METRICS = "metrics.csv"  # Lightning's CSVLogger's


def find_runs(root: PathLike) -> list[Path]:
    """Every directory under ``root`` (itself included) that holds TensorBoard event files or a CSVLogger's
    ``metrics.csv``."""
    root = Path(root)
    directories = {p.parent for pattern in (EVENT_FILES, CSV_METRICS) for p in root.rglob(pattern)}
    return sorted(directories)


def load_run(path: PathLike, name: Optional[str] = None) -> Run:
    """The run logged in ``path``: its TensorBoard event files, or else its CSVLogger's ``metrics.csv``."""
    path = Path(path)
    csv_only = (path / CSV_METRICS).is_file() and not any(path.glob(EVENT_FILES))
    scalars = _csv_scalars(path / CSV_METRICS) if csv_only else _tensorboard_scalars(path)
    method = _method_of(path)
    return Run(name=name or _default_name(path, method), path=path, method=method, scalars=scalars)


def load_runs(*roots: PathLike) -> list[Run]:
    """Load every run found under each of ``roots`` (directories or single runs)."""
    runs = [load_run(path) for root in roots for path in find_runs(root)]
    if not runs:
        raise FileNotFoundError(
            f"no TensorBoard event files or CSVLogger {CSV_METRICS} under {', '.join(map(str, roots))}"
        )
    return runs


def _tensorboard_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    # a resumed run may log a round again; the later value wins, as in TensorBoard
    return {tag: sorted({e.step: e.value for e in events.Scalars(tag)}.items()) for tag in events.Tags()["scalars"]}


def _csv_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    # One row per log_metrics call: its step, and a value in the column of each tag it logged (the
    # others empty). Read by hand: the csv module is all it takes, where pandas would be a dependency.
    points: dict[str, dict[int, float]] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            step = row.pop("step", None)
            if not step:
                continue
            for tag, value in row.items():
                try:
                    points.setdefault(tag, {})[int(float(step))] = float(value)
                except (TypeError, ValueError):  # empty: another call's tag; text: not a scalar
                    continue
    return {tag: sorted(values.items()) for tag, values in points.items() if values}


def _method_of(path: Path) -> str:
    config = path / "config.yaml"
    if not config.exists():
        return "?"
    peft: Any = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("peft")
    class_path = peft.get("class_path", "?") if isinstance(peft, dict) else str(peft)
    return class_path.rsplit(".", 1)[-1]


def _default_name(path: Path, method: str) -> str:
    # logs are laid out as <save_dir>/<name>/version_<n>
    parts = path.parts[-2:] if path.name.startswith("version_") else path.parts[-1:]
    label = "/".join(parts)
    return label if method == "?" or method.lower() in label.lower() else f"{label} ({method})"


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run: method, rounds, final accuracy, bytes per round and in total; with a virtual clock
    (``trainer.clock``), the run's simulated hours too."""
    rows = []
    for run in runs:
        _, up = run.series("comm/bytes_up")
        rows.append(
            {
                "run": run.name,
                "method": run.method,
                "rounds": run.rounds,
                "final_acc": run.final_accuracy,
                "upload_MiB_per_round": (up[-1] / MIB) if up else None,
                "total_MiB": run.total_bytes / MIB,
            }
        )
    full = [r["total_MiB"] for r in rows if r["method"] == "Full" and r["total_MiB"]]
    for row in rows:
        row["x_fewer_bytes_than_Full"] = (full[0] / row["total_MiB"]) if full and row["total_MiB"] else None
    if any("time/simulated_seconds" in run.scalars for run in runs):  # runs with a virtual clock
        for row, run in zip(rows, runs):
            _, seconds = run.series("time/simulated_seconds")
            row["simulated_hours"] = seconds[-1] / 3600 if seconds else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`summarize`'s rows."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:,.1f}"
    return str(value)


def plot_accuracy(runs: list[Run], log_bytes: bool = True, title: Optional[str] = None) -> Any:
    """Two panels: server accuracy against cumulative MiB sent, and against the round."""
    import matplotlib.pyplot as plt

    figure, (by_bytes, by_round) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for run in runs:
        megabytes, accuracy = run.accuracy_vs_megabytes()
        (line,) = by_bytes.plot(megabytes, accuracy, marker=".", label=run.name)
        rounds, accuracy = run.series("server/acc")
        by_round.plot(rounds, accuracy, marker=".", color=line.get_color(), label=run.name)
    by_bytes.set_xlabel("cumulative communication, both directions (MiB)")
    if log_bytes:
        by_bytes.set_xscale("log")
    by_round.set_xlabel("round")
    for axis in (by_bytes, by_round):
        axis.set_ylabel("server test accuracy")
        axis.grid(True, alpha=0.3)
    by_round.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return figure
