"""Accuracy against epsilon on the quickstart task: five DP mechanisms, four methods, in one process.

    python benchmarks/privacy_epsilon.py                     # the whole plan below
    python benchmarks/privacy_epsilon.py --parts sweep       # only the clip-norm sweep against adaptive clipping
    python benchmarks/privacy_epsilon.py --reuse --parts     # rewrite the table and figures from finished runs
    python benchmarks/privacy_epsilon.py --reuse --parts grid --methods lora full --grid-mechanisms central
                                                             # a slice; --reuse runs only what is missing

Every run is ``fedpeft fit --config configs/quickstart.yaml --config configs/quickstart/<method>.yaml`` with
an overlay written here: ``--rounds`` rounds of ``--local-epochs`` (the short schedule of
``configs/quickstart/dp/short-schedule.yaml`` by default), 16 clients, 8 a round (expected, under Poisson
sampling), and one mechanism whose noise is calibrated by the library from ``epsilon`` and ``--delta``:

- ``local``: :class:`fedpeft_pl.privacy.LocalDP`, DP-SGD on every client (record-level DP per client,
  per-sample clip ``--local-clip``);
- ``central``: :class:`fedpeft_pl.privacy.DPFedAvg` with a fixed clip norm ``--clip`` (client-level);
- ``central-adaptive``: DPFedAvg with ``AdaptiveClipping()`` at its defaults, from the initial clip norm
  ``--adaptive`` (the sweep also runs each of ``--sweep-adaptive``: ``START`` or ``START:LEARNING_RATE``);
- ``distributed``: :class:`fedpeft_pl.privacy.DistributedDP` (its defaults: 20 bits), clip ``--clip``;
- ``dp-ftrl``: :class:`fedpeft_pl.privacy.DPFTRL` (its defaults: a tree every N // m = 2 rounds, no
  momentum, server_lr 1), clip ``--clip``, with its own client draw (uniform, each client at most
  once a tree);

plus a non-private run per method with the same schedule (Poisson client sampling, as central DP). All use
the RDP accountant (DistributedDP has only its own RDP accounting), so "equal epsilon" means the same
accountant throughout. ``--clip sweep`` (the default) takes the fixed clip norm of the grid and the pair
from the sweep: the best of the first ``--sweep-methods``' sweep, seed 0.

The parts (``--parts``), in the order given:

- ``sweep``: the non-private reference, then central DP at ``--sweep-epsilon`` with each fixed clip norm of
  ``--sweep-clips`` and with each adaptive clipping of ``--sweep-adaptive``, on ``--sweep-methods``, seed 0;
- ``pair``: central against distributed DP at ``--pair-epsilon`` on ``--pair-methods``, seed 0;
  ``pair-seeds``: the same with the other ``--seeds``;
- ``sweep-seeds``: the sweep's best fixed clip norm and adaptive clipping from ``--adaptive`` with the
  other seeds;
- ``grid``: the non-private reference and ``--grid-mechanisms`` at every epsilon of ``--epsilons`` (in the
  order given) on every method of ``--methods``, seed 0;
- ``local``: local DP at every epsilon on ``--local-methods``, seed 0 (several times the cost of a run).

Logs go to ``<out>/<method>/<mechanism>/eps<e>-clip<c>/seed<k>``; each finished run is appended to
``<out>/results.jsonl`` (``--reuse`` reads it back and runs only what is missing; without it a run starts
afresh), and the table (benchmarks/results/privacy_epsilon.md) and figures (docs/privacy_epsilon.png,
docs/privacy_epsilon_clip.png) are rewritten after each part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MECHANISMS = ["local", "central", "central-adaptive", "distributed", "dp-ftrl"]
METHODS = ["prompt", "lora", "bias", "full"]
NON_PRIVATE = "non-private"
PARTS = ["sweep", "pair", "pair-seeds", "sweep-seeds", "grid", "local"]


def _yaml(value) -> str:
    return json.dumps(value)


def mechanism_lines(mechanism: str, epsilon: float, clip: float, args: argparse.Namespace) -> list[str]:
    """The overlay's lines under ``trainer:`` for one mechanism (none for the non-private run)."""
    common = {"epsilon": epsilon, "delta": args.delta}
    if mechanism == NON_PRIVATE:
        return ["  client_sampling: poisson"]
    if mechanism == "local":
        settings = {**common, "max_grad_norm": args.local_clip, "accountant": "rdp"}
        return [
            "  privacy:",
            "    class_path: fedpeft_pl.privacy.LocalDP",
            f"    init_args: {_yaml(settings)}",
        ]
    if mechanism == "central" or mechanism.startswith("central-adaptive"):
        settings = {**common, "clip_norm": clip, "accountant": "rdp"}
        if mechanism.startswith("central-adaptive"):
            settings["adaptive"] = {"class_path": "fedpeft_pl.privacy.AdaptiveClipping"}
            if "-lr" in mechanism:  # a learning rate other than the default 0.2
                settings["adaptive"]["init_args"] = {"learning_rate": float(mechanism.split("-lr")[1])}
        return [
            "  client_sampling: poisson",
            "  aggregation:",
            "    class_path: fedpeft_pl.privacy.DPFedAvg",
            f"    init_args: {_yaml(settings)}",
        ]
    if mechanism == "distributed":
        return [
            "  client_sampling: poisson",
            "  aggregation:",
            "    class_path: fedpeft_pl.privacy.DistributedDP",
            f"    init_args: {_yaml({**common, 'clip_norm': clip})}",
        ]
    if mechanism == "dp-ftrl":
        return [
            "  client_sampling: uniform",
            "  aggregation:",
            "    class_path: fedpeft_pl.privacy.DPFTRL",
            f"    init_args: {_yaml({**common, 'clip_norm': clip, 'accountant': 'rdp'})}",
        ]
    raise ValueError(mechanism)


def overlay(method: str, mechanism: str, epsilon: float, clip: float, seed: int, log: Path, args) -> str:
    lines = [
        f"seed_everything: {seed}",
        "trainer:",
        f"  num_rounds: {args.rounds}",
        f"  local_epochs: {args.local_epochs}",
        f"  seed: {seed}",
        "  enable_progress_bar: false",
        "  enable_checkpointing: false",
        "  logger:",
        "    class_path: lightning.pytorch.loggers.TensorBoardLogger",
        f"    init_args: {{save_dir: {_yaml(str(log.parent))}, name: {_yaml(log.name)}, version: 0}}",
        *mechanism_lines(mechanism, epsilon, clip, args),
        "data:",
        f"  seed: {seed}",
    ]
    return "\n".join(lines) + "\n"


def key_of(method: str, mechanism: str, epsilon: float, clip: float, seed: int) -> str:
    if mechanism == NON_PRIVATE:
        return f"{method}/{mechanism}/seed{seed}"
    clip_part = f"-clip{clip:g}" if mechanism != "local" else ""
    return f"{method}/{mechanism}/eps{epsilon:g}{clip_part}/seed{seed}"


def summary(logged: dict[str, list[float]]) -> dict[str, float]:
    """What the tables need from a run's scalars: final accuracy, epsilon spent, the clip norm where it moved."""
    out = {"acc": logged.get("server/acc", [math.nan])[-1], "rounds": len(logged.get("server/acc", []))}
    for tag, name in [
        ("privacy/epsilon", "epsilon_spent"),
        ("privacy/client_epsilon_max", "epsilon_spent"),
        ("privacy/clip_norm", "final_clip"),
    ]:
        if tag in logged:
            out[name] = logged[tag][-1]
    return out


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, dict] = {}
        self.jsonl = args.out / "results.jsonl"
        if args.reuse and self.jsonl.is_file():
            from workloads import scalars

            for line in self.jsonl.read_text().splitlines():
                row = json.loads(line)
                log_dir = args.out / row["key"] / "version_0"
                if log_dir.is_dir():  # the logs are the record: read what they say again
                    row.update(summary(scalars(log_dir)))
                self.results[row["key"]] = row
        elif self.jsonl.is_file():  # a fresh start: the runs of an earlier plan are not this one's
            self.jsonl.unlink()

    def run(self, method: str, mechanism: str, epsilon: float, clip: float, seed: int) -> dict:
        from workloads import quickstart_fit, scalars

        from fedpeft_pl.cli import main

        key = key_of(method, mechanism, epsilon, clip, seed)
        if key in self.results:
            return self.results[key]
        log = self.args.out / key  # <save_dir>/<name>/version_0
        log_dir = log / "version_0"
        shutil.rmtree(log_dir, ignore_errors=True)
        log.mkdir(parents=True, exist_ok=True)
        config = log / "overlay.yaml"
        config.write_text(overlay(method, mechanism, epsilon, clip, seed, log, self.args))
        started = time.perf_counter()
        refused = False
        try:
            main(quickstart_fit(method, config))
        except SystemExit as exit_:  # the CLI's one-line refusals exit; record the run as refused
            if exit_.code not in (0, None):
                print(f"FAILED {key}: exit {exit_.code}", flush=True)
                refused = True
        wall = time.perf_counter() - started
        row = {
            "key": key,
            "method": method,
            "mechanism": mechanism,
            "epsilon": epsilon,
            "clip": clip,
            "seed": seed,
            "seconds": wall,
            **(summary(scalars(log_dir)) if log_dir.is_dir() and not refused else {"acc": math.nan}),
        }
        self.results[key] = row
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(
            f"[{len(self.results)}] {key}: acc {row['acc']:.4f}, epsilon spent {row.get('epsilon_spent', 0):.3f} "
            f"({wall:.0f} s)",
            flush=True,
        )
        return row

    def get(self, method: str, mechanism: str, epsilon: float, clip: float, seed: int) -> dict | None:
        return self.results.get(key_of(method, mechanism, epsilon, clip, seed))

    def accs(self, method: str, mechanism: str, epsilon: float, clip: float, seeds) -> list[float]:
        rows = [self.get(method, mechanism, epsilon, clip, s) for s in seeds]
        return [r["acc"] for r in rows if r is not None and r["acc"] == r["acc"]]


def best_fixed(runner: Runner, method: str, args: argparse.Namespace) -> float | None:
    """The sweep's fixed clip norm with the best seed-0 accuracy."""
    done = [(runner.get(method, "central", args.sweep_epsilon, c, 0), c) for c in args.sweep_clips]
    done = [(r["acc"], c) for r, c in done if r is not None and r["acc"] == r["acc"]]
    return max(done)[1] if done else None


def _adaptive_run(text: str, epsilon: float) -> tuple[str, float, float, int]:
    name, start = adaptive(text)
    return name, epsilon, start, 0


def plan(args: argparse.Namespace):
    """The runs, part by part, in the order they run; ``"grid-clip"`` stands for the clip norm of the grid and the
    pair, known once the sweep has run (:func:`grid_clip`)."""
    other_seeds = [s for s in args.seeds if s != 0]
    for part in args.parts:
        if part == "sweep":
            for method in args.sweep_methods:
                yield part, (method, NON_PRIVATE, 0.0, 0.0, 0)
                for text in args.sweep_adaptive:
                    yield part, (method, *_adaptive_run(text, args.sweep_epsilon))
                for clip in args.sweep_clips:
                    yield part, (method, "central", args.sweep_epsilon, clip, 0)
        elif part in ("pair", "pair-seeds"):
            for seed in [0] if part == "pair" else other_seeds:
                for method in args.pair_methods:
                    if part == "pair":  # the reference, seed 0 only
                        yield part, (method, NON_PRIVATE, 0.0, 0.0, seed)
                    for mechanism in ("central", "distributed"):
                        yield part, (method, mechanism, args.pair_epsilon, "grid-clip", seed)
        elif part == "sweep-seeds":
            for seed in other_seeds:
                for method in args.sweep_methods:
                    name, start = adaptive(args.adaptive)
                    yield part, (method, name, args.sweep_epsilon, start, seed)
                    yield part, (method, "central", args.sweep_epsilon, "best", seed)
        elif part == "grid":
            for method in args.methods:
                yield part, (method, NON_PRIVATE, 0.0, 0.0, 0)
            for epsilon in args.run_order:
                for method in args.methods:
                    for mechanism in args.grid_mechanisms:
                        if mechanism == "central-adaptive":
                            yield part, (method, mechanism, epsilon, adaptive(args.adaptive)[1], 0)
                        else:
                            yield part, (method, mechanism, epsilon, "grid-clip", 0)
        elif part == "local":
            for epsilon in args.run_order:
                for method in args.local_methods or args.methods:
                    yield part, (method, "local", epsilon, 0.0, 0)


def adaptive(text: str) -> tuple[str, float]:
    """``START`` or ``START:LEARNING_RATE`` as the mechanism's name and its initial clip norm."""
    start, _, rate = text.partition(":")
    return ("central-adaptive" + (f"-lr{float(rate):g}" if rate else ""), float(start))


def describe_adaptive(text: str) -> str:
    start, _, rate = text.partition(":")
    return f"from S={float(start):g}" + (f", learning rate {float(rate):g}" if rate else "")


def clip_of(runner: Runner, mechanism: str, args: argparse.Namespace) -> float | None:
    """The clip norm a grid run of ``mechanism`` used (its key): none for local DP, the start for adaptive clipping."""
    if mechanism in ("local", NON_PRIVATE):
        return 0.0
    if mechanism == "central-adaptive":
        return adaptive(args.adaptive)[1]
    try:
        return grid_clip(runner, args)
    except SystemExit:
        return None


def grid_clip(runner: Runner, args: argparse.Namespace) -> float:
    """The fixed clip norm of the grid and the pair: ``--clip``, or with ``--clip sweep`` the best of the first
    sweep method's sweep (seed 0)."""
    if args.clip != "sweep":
        return float(args.clip)
    best = best_fixed(runner, args.sweep_methods[0], args)
    if best is None:
        raise SystemExit("--clip sweep needs the sweep of the first --sweep-methods to have run (--parts sweep first)")
    return best


def _cell(row: dict | None) -> str:
    """A grid cell: accuracy (epsilon spent); ``refused`` for a run the library refused before training."""
    if row is None:
        return "-"
    if row["acc"] != row["acc"] and not row.get("rounds"):
        return "refused"
    return f"{row['acc']:.3f} ({row.get('epsilon_spent', math.nan):.2f})"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else math.nan


def commands(args: argparse.Namespace, command: str) -> list[str]:
    """The invocations that ran runs into ``--out`` (``<out>/commands.txt``), or this one."""
    path = args.out / "commands.txt"
    lines = list(dict.fromkeys(path.read_text().splitlines())) if path.is_file() else []
    return lines or [command]


def write_results(runner: Runner, args: argparse.Namespace, command: str) -> Path:
    r = runner
    clip = clip_of(r, "central", args)
    clip_text = "not known yet" if clip is None else f"{clip:g}"
    if args.clip == "sweep" and clip is not None:
        clip_text += f" (the best of the {args.sweep_methods[0]} sweep below)"
    timed = [row["seconds"] for row in r.results.values() if row.get("seconds")]
    by_mechanism: dict[str, list[float]] = {}
    for row in r.results.values():
        by_mechanism.setdefault(row["mechanism"], []).append(row["seconds"])
    lines = [
        f"Accuracy against epsilon on the quickstart task (digits, 16 clients, 8 a round, Dirichlet 0.5): "
        f"{args.rounds} rounds of {args.local_epochs} local epochs, delta {args.delta:g} for every mechanism (below "
        f"1/16), RDP accounting, noise calibrated by each mechanism from its target epsilon. Fixed clip norm "
        f"{clip_text} for central, distributed and DP-FTRL; adaptive clipping {describe_adaptive(args.adaptive)}; "
        f"local DP clips each "
        f"sample's gradient to {args.local_clip:g}. Local DP's epsilon is per record of each client, the others' "
        f"per client: the same number is a much weaker promise for local DP.",
        "",
        "Commands, in the order they ran (`--reuse` runs only what is missing):",
        "",
        *[f"    {line}" for line in commands(args, command)],
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, {os.cpu_count()} CPU cores; "
        "median seconds per run: "
        + ", ".join(f"{m} {statistics.median(v):.0f}" for m, v in by_mechanism.items() if v)
        + ("" if timed else " (runs read back, not timed)"),
        "",
        "![accuracy against epsilon](../../docs/privacy_epsilon.png)",
        "",
        "## Final server accuracy, seed 0",
        "",
        "Epsilon spent at the end of the run (`privacy/epsilon`; local DP: the largest client's) in brackets.",
        "",
    ]
    mechanisms = [m for m in MECHANISMS if any(row["mechanism"] == m for row in r.results.values())]
    header = "| method | non-private | epsilon | " + " | ".join(mechanisms) + " |"
    lines += [header, "|---" * (len(mechanisms) + 3) + "|"]
    for method in args.methods:
        reference = r.get(method, NON_PRIVATE, 0.0, 0.0, 0)
        for epsilon in args.epsilons:
            cells = []
            for mechanism in mechanisms:
                row = r.get(method, mechanism, epsilon, clip_of(r, mechanism, args), 0)
                cells.append(_cell(row))
            if all(c == "-" for c in cells):
                continue
            ref = f"{reference['acc']:.3f}" if reference else "-"
            lines.append(f"| {method} | {ref} | {epsilon:g} | " + " | ".join(cells) + " |")

    lines += [
        "",
        f"## Central against distributed DP at epsilon {args.pair_epsilon:g}, clip {clip_text}, seeds {args.seeds}",
        "",
        "| method | non-private | central | distributed | distributed - central |",
        "|---|---|---|---|---|",
    ]
    for method in args.pair_methods:
        central = r.accs(method, "central", args.pair_epsilon, clip, args.seeds)
        distributed = r.accs(method, "distributed", args.pair_epsilon, clip, args.seeds)
        reference = r.accs(method, NON_PRIVATE, 0.0, 0.0, args.seeds)
        paired = [
            (d["acc"] - c["acc"])
            for s in args.seeds
            if (c := r.get(method, "central", args.pair_epsilon, clip, s))
            and (d := r.get(method, "distributed", args.pair_epsilon, clip, s))
        ]
        lines.append(
            f"| {method} | {_spread(reference)} | {_spread(central)} | {_spread(distributed)} | "
            f"{_spread(paired)} (n={len(paired)}) |"
        )

    lines += [
        "",
        f"## Adaptive clipping against a sweep of fixed clip norms: central DP at epsilon {args.sweep_epsilon:g}",
        "",
        "Adaptive clipping (target quantile 0.5, count noise the larger of m / 20 and z / (2 sqrt(0.1)), learning "
        "rate 0.2 unless given) from each initial clip norm, final clip norm in brackets. Seed 0 for the sweep; the "
        "best fixed norm and adaptive "
        f"clipping {describe_adaptive(args.adaptive)} also over seeds {args.seeds} where run (the last columns).",
        "",
        "| method | "
        + " | ".join(f"S={c:g}" for c in args.sweep_clips)
        + "".join(f" | adaptive {describe_adaptive(t)}" for t in args.sweep_adaptive)
        + f" | best fixed, seeds | adaptive {describe_adaptive(args.adaptive)}, seeds | adaptive - best fixed |",
        "|---" * (len(args.sweep_clips) + len(args.sweep_adaptive) + 4) + "|",
    ]
    name, start = adaptive(args.adaptive)
    for method in args.sweep_methods:
        cells = []
        for clip in args.sweep_clips:
            row = r.get(method, "central", args.sweep_epsilon, clip, 0)
            cells.append("-" if row is None else f"{row['acc']:.3f}")
        for text in args.sweep_adaptive:
            row = r.get(method, *_adaptive_run(text, args.sweep_epsilon)[:3], 0)
            cells.append("-" if row is None else f"{row['acc']:.3f} ({row.get('final_clip', math.nan):.3f})")
        best = best_fixed(r, method, args)
        if best is None:
            cells += ["-", "-", "-"]
        else:
            fixed = r.accs(method, "central", args.sweep_epsilon, best, args.seeds)
            adapt = r.accs(method, name, args.sweep_epsilon, start, args.seeds)
            paired = [
                (a["acc"] - f["acc"])
                for s in args.seeds
                if (f := r.get(method, "central", args.sweep_epsilon, best, s))
                and (a := r.get(method, name, args.sweep_epsilon, start, s))
            ]
            cells += [f"S={best:g}: {_spread(fixed)}", _spread(adapt), f"{_spread(paired)} (n={len(paired)})"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")

    lines += ["", "## Every run", "", "| run | rounds | accuracy | epsilon spent | final clip | seconds |"]
    lines += ["|---|---|---|---|---|---|"]
    for key in sorted(r.results):
        row = r.results[key]
        lines.append(
            f"| {key} | {row.get('rounds', '?')} | {row['acc']:.4f} | {row.get('epsilon_spent', math.nan):.3f} | "
            f"{row.get('final_clip', math.nan):.3f} | {row.get('seconds', math.nan):.0f} |"
        )
    target = REPO / "benchmarks" / "results" / f"privacy_epsilon{args.suffix}.md"
    target.write_text("\n".join(lines) + "\n")
    return target


def figures(runner: Runner, args: argparse.Namespace) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = runner
    written = []
    methods = [
        m
        for m in args.methods
        if any(row["method"] == m and row["epsilon"] in args.epsilons for row in r.results.values())
    ]
    if methods:
        size = (3.2 * len(methods) + 0.5, 3.4)
        figure, axes = plt.subplots(1, len(methods), figsize=size, sharey=True, squeeze=False)
        for ax, method in zip(axes[0], methods):
            for mechanism in MECHANISMS:
                clip = clip_of(r, mechanism, args)
                points = [(e, r.get(method, mechanism, e, clip, 0)) for e in args.epsilons]
                points = [(e, row["acc"]) for e, row in points if row is not None]
                if points:
                    color = f"C{MECHANISMS.index(mechanism)}"  # one colour per mechanism in every panel
                    ax.plot(*zip(*points), marker="o", color=color, label=mechanism)
            reference = r.get(method, NON_PRIVATE, 0.0, 0.0, 0)
            if reference is not None:
                ax.axhline(reference["acc"], color="black", linestyle="--", linewidth=1, label="non-private")
            ax.set_xscale("log", base=2)
            ax.set_xticks(args.epsilons, [f"{e:g}" for e in args.epsilons])
            ax.set_title(method)
            ax.set_xlabel(f"epsilon (delta {args.delta:g})")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("final server accuracy")
        handles = {}  # every mechanism that has a point in some panel, in one legend
        for ax in axes[0]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        axes[0][-1].legend(list(handles.values()), list(handles), fontsize=7, loc="lower right")
        figure.suptitle(
            f"quickstart task, {args.rounds} rounds x {args.local_epochs} local epochs, 8 of 16 clients a round, "
            "seed 0",
            fontsize=9,
        )
        figure.tight_layout()
        target = REPO / "docs" / f"privacy_epsilon{args.suffix}.png"
        figure.savefig(target, dpi=110)
        plt.close(figure)
        written.append(target)
    sweep = [m for m in args.sweep_methods if r.get(m, "central", args.sweep_epsilon, args.sweep_clips[0], 0)]
    if sweep:
        figure, ax = plt.subplots(figsize=(5, 3.4))
        for index, method in enumerate(sweep):
            color = f"C{index}"
            points = [(c, r.get(method, "central", args.sweep_epsilon, c, 0)) for c in args.sweep_clips]
            points = [(c, row["acc"]) for c, row in points if row is not None]
            if points:
                ax.plot(*zip(*points), marker="o", color=color, label=f"{method}: fixed clip norm")
            for text, style in zip(args.sweep_adaptive, ["--", ":", "-.", (0, (5, 1))]):
                row = r.get(method, *_adaptive_run(text, args.sweep_epsilon)[:3], 0)
                if row is not None:
                    label = f"{method}: adaptive {describe_adaptive(text)}"
                    ax.axhline(row["acc"], color=color, linestyle=style, linewidth=1, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("clip norm S")
        ax.set_ylabel("final server accuracy")
        ax.set_title(f"central DP at epsilon {args.sweep_epsilon:g}, seed 0", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figure.tight_layout()
        target = REPO / "docs" / f"privacy_epsilon_clip{args.suffix}.png"
        figure.savefig(target, dpi=110)
        plt.close(figure)
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="*", default=["sweep", "pair", "grid", "pair-seeds", "sweep-seeds", "local"], choices=PARTS
    )
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[4.0, 16.0, 64.0])
    parser.add_argument("--delta", type=float, default=1e-3)
    parser.add_argument(
        "--clip", default="sweep", help="the fixed clip norm of the grid and the pair; 'sweep': the first sweep's best"
    )
    parser.add_argument("--adaptive", default="0.1", help="adaptive clipping's initial clip norm in the grid and seeds")
    parser.add_argument(
        "--sweep-adaptive", nargs="*", default=["1", "0.1", "1:1"], help="adaptive clippings beside the sweep"
    )
    parser.add_argument("--local-clip", type=float, default=1.0)
    parser.add_argument(
        "--grid-mechanisms",
        nargs="*",
        default=["central", "distributed", "dp-ftrl", "central-adaptive"],
        choices=MECHANISMS[1:],
        help="the server mechanisms of the grid (local DP is its own part)",
    )
    parser.add_argument("--local-methods", nargs="*", choices=METHODS, help="local DP's methods; --methods by default")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--pair-epsilon", type=float, default=16.0)
    parser.add_argument("--pair-methods", nargs="*", default=["lora"], choices=METHODS)
    parser.add_argument("--sweep-epsilon", type=float, default=16.0)
    parser.add_argument("--sweep-methods", nargs="*", default=["lora", "prompt"], choices=METHODS)
    parser.add_argument("--sweep-clips", type=float, nargs="*", default=[0.03, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "privacy_epsilon")
    parser.add_argument("--suffix", default="", help="appended to the results and figure names")
    parser.add_argument("--reuse", action="store_true", help="read back runs in <out>/results.jsonl, run the rest")
    args = parser.parse_args()
    args.run_order = list(args.epsilons)  # the grid runs its epsilons in the order given; tables and figures sort them
    args.epsilons = sorted(args.epsilons)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/privacy_epsilon.py " + " ".join(sys.argv[1:])
    runner = Runner(args)
    if not args.reuse:
        (args.out / "commands.txt").unlink(missing_ok=True)
    if any(True for _ in plan(args)):
        with (args.out / "commands.txt").open("a") as handle:
            handle.write(command + "\n")
    current = None
    for part, (method, mechanism, epsilon, clip, seed) in plan(args):
        if part != current:
            if current is not None:
                report(runner, args, command)
            current = part
            print(f"== {part}", flush=True)
        if clip == "best":
            clip = best_fixed(runner, method, args)
            if clip is None:
                continue
        elif clip == "grid-clip":
            clip = grid_clip(runner, args)
        runner.run(method, mechanism, epsilon, clip, seed)
    report(runner, args, command)


def report(runner: Runner, args: argparse.Namespace, command: str) -> None:
    """The table and the figures of the runs so far; a failure to draw them does not stop the runs."""
    import traceback

    try:
        print(f"wrote {write_results(runner, args, command).relative_to(REPO)}", flush=True)
        for path in figures(runner, args):
            print(f"wrote {path.relative_to(REPO)}", flush=True)
    except Exception:  # a report is redone with --reuse; the runs are what costs
        traceback.print_exc()


if __name__ == "__main__":
    main()
