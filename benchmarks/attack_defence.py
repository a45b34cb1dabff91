"""Attacks against defences on the quickstart task: the final clean accuracy of each pair, in one process.

    python benchmarks/attack_defence.py                          # LoRA, 20 clients, 20 % malicious, seed 0
    python benchmarks/attack_defence.py --seeds 0 1 2            # the issue's three seeds
    python benchmarks/attack_defence.py --fraction 0.1 --attacks none alie sign-flip-x10   # the 10 % slice
    python benchmarks/attack_defence.py --method prompt --attacks none alie                # the Prompt slice
    python benchmarks/attack_defence.py --attacks none --alpha 0.1                         # each defence's cost
    python benchmarks/attack_defence.py --reuse                  # read finished runs back
    python benchmarks/attack_defence.py --seeds 0 1 2 --attacks backdoor-replace --keep-rows   # one row anew
    python benchmarks/attack_defence.py --seeds 0 1 2 --attacks backdoor-replace --defences fedavg \
        normbound-0.25 normbound-0.5 normbound-1 normbound-2 --table normbound   # the bound's sweep

Each pair is ``fedpeft fit --config configs/quickstart.yaml --config configs/quickstart/<method>.yaml`` on
``--clients`` clients (Dirichlet ``--alpha``), every client every round (so a round holds the
``--fraction`` of malicious clients exactly: 4 of 20 at 20 %, which Bulyan's ``n >= 4f + 3`` just
tolerates), ``--rounds`` short rounds of ``--local-epochs``, with ``trainer.attack`` and
``trainer.aggregation`` set as below. The malicious clients are the same in every pair of a seed (drawn
from it). The runs share one Python process (the imports are paid once) and train on the vectorised
engine. Logs go to ``<out>/<method>/a<alpha>-f<fraction>/seed<k>/<attack>/<defence>``; the table to
benchmarks/results/attack_defence-<method>-a<alpha>-f<fraction>.md (``-<table>`` before ``.md`` with
``--table``). With ``--keep-rows`` the rows of that file's attacks not run now stay as they are (with the
command that made them), so one attack can be run again without the rest of the grid.

Reported per pair: the final clean server accuracy (mean and spread over the seeds); for the backdoor its
success rate (triggered test images of the other classes put in the target class); the mean share of the
aggregate that went to malicious clients (``attack/malicious_weight``, where the rule weighs whole
updates); for selecting rules, the mean true and false positive rates of their rejections.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ATTACKS = {
    "none": None,
    "sign-flip-x10": ("SignFlip", {"scale": 10.0}),
    "alie": ("ALIE", {}),
    "ipm-0.1": ("IPM", {"epsilon": 0.1}),
    # model replacement: the malicious clients together boost by the clients a round (Bagdasaryan et al.:
    # gamma = n / eta, eta = 1), each by n over their number, in the last round only (the paper's one-round
    # replacement; boosted every round the malicious data's step overshoots back and forth); the trigger
    # covers one whole token of the ViT (its patch size, 8 pixels)
    "backdoor-replace": (
        "Backdoor",
        {"target": 0, "patch": 8, "poison_fraction": 0.5, "boost": "clients", "boost_rounds": "last"},
    ),
    # the probes of the backdoor (benchmarks/README.md): a 3x3 trigger (the grid's first backdoor) or a whole token,
    # boosted every round, or not at all
    "backdoor-3x3-every-round": ("Backdoor", {"target": 0, "patch": 3, "poison_fraction": 0.5, "boost": "clients"}),
    "backdoor-8x8-every-round": ("Backdoor", {"target": 0, "patch": 8, "poison_fraction": 0.5, "boost": "clients"}),
    "backdoor-8x8-no-boost": ("Backdoor", {"target": 0, "patch": 8, "poison_fraction": 0.5}),
    # the first backdoor with one change each (a white trigger, 4x4, no boost, every sample poisoned), and 8x8 at
    # half the boost
    "backdoor-3x3-white": (
        "Backdoor",
        {"target": 0, "patch": 3, "value": 1.0, "poison_fraction": 0.5, "boost": "clients"},
    ),
    "backdoor-4x4-every-round": ("Backdoor", {"target": 0, "patch": 4, "poison_fraction": 0.5, "boost": "clients"}),
    "backdoor-3x3-no-boost": ("Backdoor", {"target": 0, "patch": 3, "poison_fraction": 0.5}),
    "backdoor-3x3-all-poisoned": ("Backdoor", {"target": 0, "patch": 3, "poison_fraction": 1.0, "boost": "clients"}),
    "backdoor-8x8-boost-2.5": ("Backdoor", {"target": 0, "patch": 8, "poison_fraction": 0.5, "boost": 2.5}),
    "quantity-x1000": ("QuantityInflation", {"factor": 1000.0}),
    "min-max": ("MinMax", {}),
    "label-flip": ("LabelFlip", {}),
}
MAIN_ATTACKS = ["none", "sign-flip-x10", "alie", "ipm-0.1", "backdoor-replace", "quantity-x1000"]
DEFENCES = {
    "fedavg": "fedpeft_pl.strategies.WeightedMean",
    "count-cap": ("fedpeft_pl.strategies.SampleCounts", {"max_samples": 200}),
    "median": "fedpeft_pl.strategies.Median",
    "trimmed-0.2": ("fedpeft_pl.strategies.TrimmedMean", {"beta": 0.2}),
    "multikrum": ("fedpeft_pl.strategies.MultiKrum", {"f": "malicious"}),
    "bulyan": ("fedpeft_pl.strategies.Bulyan", {"f": "malicious"}),
    "geomed": "fedpeft_pl.strategies.GeometricMedian",
    "cclip-0.5": ("fedpeft_pl.strategies.CenteredClipping", {"tau": 0.5}),
    "normbound-0.5": ("fedpeft_pl.strategies.NormBound", {"bound": 0.5}),
}
# norm bounding's bound, swept against the backdoor (not in the default grid)
SWEEP = {f"normbound-{b:g}": ("fedpeft_pl.strategies.NormBound", {"bound": b}) for b in (0.1, 0.25, 1.0, 2.0, 4.0)}


def _yaml(value) -> str:
    import json

    return json.dumps(value)


def overlay(attack: str, defence: str, out: Path, seed: int, args: argparse.Namespace) -> str:
    spec = {**DEFENCES, **SWEEP}[defence]
    path, kwargs = (spec, {}) if isinstance(spec, str) else spec
    malicious = int(args.fraction * args.clients)
    kwargs = {k: (max(malicious, 1) if v == "malicious" else v) for k, v in kwargs.items()}
    lines = [
        f"seed_everything: {seed}",
        "trainer:",
        f"  num_rounds: {args.rounds}",
        f"  clients_per_round: {args.clients}",
        f"  local_epochs: {args.local_epochs}",
        f"  seed: {seed}",
        "  client_runner: vectorized",
        "  enable_progress_bar: false",
        "  enable_checkpointing: false",
        "  logger:",
        "    class_path: lightning.pytorch.loggers.TensorBoardLogger",
        f"    init_args: {{save_dir: {_yaml(str(out / attack))}, name: {defence}, version: 0}}",
        "  aggregation:",
        "    class_path: fedpeft_pl.strategies.FedAvg",
        f"    init_args: {{aggregator: {{class_path: {path}, init_args: {_yaml(kwargs)}}}}}",
        "data:",
        f"  num_clients: {args.clients}",
        f"  seed: {seed}",
        "  partition:",
        "    class_path: fedpeft_pl.data.Dirichlet",
        f"    init_args: {{alpha: {args.alpha}, min_samples: 10}}",
    ]
    if ATTACKS[attack] is not None:
        name, settings = ATTACKS[attack]
        settings = {k: (args.clients / max(malicious, 1) if v == "clients" else v) for k, v in settings.items()}
        settings = {k: ([args.rounds] if v == "last" else v) for k, v in settings.items()}
        lines += [
            "  attack:",
            f"    class_path: fedpeft_pl.attacks.{name}",
            f"    init_args: {_yaml({**settings, 'fraction': args.fraction})}",
        ]
        lines = lines[:2] + lines[-3:] + lines[2:-3]  # the attack under trainer:
    return "\n".join(lines) + "\n"


def run(attack: str, defence: str, out: Path, seed: int, args: argparse.Namespace) -> tuple[dict, float]:
    from workloads import quickstart_fit, scalars

    from fedpeft_pl.cli import main

    log_dir = out / attack / defence / "version_0"
    if args.reuse and log_dir.is_dir():
        return scalars(log_dir), float("nan")
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.parent.mkdir(parents=True, exist_ok=True)
    config = out / attack / f"{defence}.yaml"
    config.write_text(overlay(attack, defence, out, seed, args))
    started = time.perf_counter()
    main(quickstart_fit(args.method, config))
    return scalars(log_dir), time.perf_counter() - started


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _spread(values: list[float]) -> str:
    import statistics

    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--attacks", nargs="*", default=MAIN_ATTACKS, choices=list(ATTACKS))
    parser.add_argument("--defences", nargs="*", default=list(DEFENCES), choices=[*DEFENCES, *SWEEP])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "attack_defence")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--keep-rows", action="store_true", help="keep the results file's rows of other attacks")
    parser.add_argument("--table", default="", help="a name for the results file, after the setting")
    args = parser.parse_args()
    setting = f"a{args.alpha:g}-f{args.fraction:g}"
    results: dict[tuple[str, str], list[dict]] = {}
    seconds = []
    total = len(args.attacks) * len(args.defences) * len(args.seeds)
    done = 0
    for seed in args.seeds:
        out = args.out / args.method / setting / f"seed{seed}"
        for attack in args.attacks:
            for defence in args.defences:
                logged, wall = run(attack, defence, out, seed, args)
                results.setdefault((attack, defence), []).append(logged)
                seconds.append(wall)
                done += 1
                acc = logged.get("server/acc", [float("nan")])[-1]
                print(f"[{done}/{total}] seed {seed} {attack} x {defence}: acc {acc:.4f} ({wall:.0f} s)", flush=True)

    command = (
        f"python benchmarks/attack_defence.py --method {args.method} --clients {args.clients} --fraction "
        f"{args.fraction:g} --alpha {args.alpha:g} --rounds {args.rounds} --local-epochs {args.local_epochs} "
        f"--seeds {' '.join(map(str, args.seeds))} --attacks {' '.join(args.attacks)}"
        + (f" --defences {' '.join(args.defences)}" if args.defences != list(DEFENCES) else "")
        + (f" --table {args.table}" if args.table else "")
        + (" --keep-rows" if args.keep_rows else "")
    )
    target = (
        REPO
        / "benchmarks"
        / "results"
        / f"attack_defence-{args.method}-{setting}{'-' * bool(args.table)}{args.table}.md"
    )
    header = "| attack \\ defence | " + " | ".join(args.defences) + " |"
    kept = kept_rows(target, header, args.attacks) if args.keep_rows else Kept()
    accuracy_rows = dict(kept.accuracy)
    weight_rows = dict(kept.weight)
    for attack in args.attacks:
        cells = []
        for defence in args.defences:
            runs = results[attack, defence]
            cell = _spread([r.get("server/acc", [float("nan")])[-1] for r in runs])
            if all("attack/success_rate" in r for r in runs):
                cell += " / " + _spread([r["attack/success_rate"][-1] for r in runs])
            cells.append(cell)
        accuracy_rows[attack] = f"| {attack} | " + " | ".join(cells) + " |"
        if attack == "none":
            continue
        cells = []
        for defence in args.defences:
            runs = results[attack, defence]
            weight = [v for r in runs for v in r.get("attack/malicious_weight", [])]
            cell = f"{_mean(weight):.3f}" if weight else "-"
            tpr = [v for r in runs for v in r.get("attack/tpr", [])]
            if tpr:
                fpr = [v for r in runs for v in r.get("attack/fpr", [])]
                cell += f" (TPR {_mean(tpr):.2f}, FPR {_mean(fpr):.2f})"
            cells.append(cell)
        weight_rows[attack] = f"| {attack} | " + " | ".join(cells) + " |"
    attacks = [*kept.order, *(a for a in args.attacks if a not in kept.order)]
    lines = [
        f"Attacks x defences on the quickstart task with {args.method}: {args.clients} clients (Dirichlet "
        f"{args.alpha:g}), all of them every round, {int(args.fraction * args.clients)} malicious "
        f"(fraction {args.fraction:g}), {args.rounds} rounds of {args.local_epochs} local epoch(s), seeds "
        f"{args.seeds}.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, Python {platform.python_version()}; "
        + (
            f"median seconds per run: {statistics.median(timed):.0f}"
            if (timed := [s for s in seconds if s == s])
            else "runs read back from their logs (--reuse), not timed here"
        ),
        "",
    ]
    kept_attacks = [a for a in kept.order if a not in args.attacks]
    if kept_attacks:
        lines[-1:-1] = [
            f"Rows kept from the file as it was (--keep-rows): {', '.join(kept_attacks)}; they came from:  ",
            *(f"{line}  " for line in kept.provenance),
        ]
    lines += [
        "Final clean server accuracy (mean ± standard deviation over the seeds; backdoor: accuracy / attack success):",
        "",
        header,
        "|---" * (len(args.defences) + 1) + "|",
        *(accuracy_rows[a] for a in attacks),
        "",
        "Mean share of the aggregate given to malicious clients (`attack/malicious_weight`; - where the rule "
        "works per coordinate), and for the selecting rules the mean true / false positive rates of their "
        "rejections:",
        "",
        header,
        "|---" * (len(args.defences) + 1) + "|",
        *(weight_rows[a] for a in attacks if a in weight_rows),
    ]
    target.write_text("\n".join(lines) + "\n")
    print(f"wrote {target.relative_to(REPO)}")
    if len(attacks) > 1 and len(args.defences) > 1 and not args.table:
        means = {row: _row_means(accuracy_rows[row]) for row in attacks}
        figure = figure_of(means, attacks, args, setting)
        print(f"wrote {figure.relative_to(REPO)}")


class Kept:
    """The rows of an earlier results file: each table's row by attack, in its order, and the lines that say what
    made them."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.accuracy: dict[str, str] = {}
        self.weight: dict[str, str] = {}
        self.provenance: list[str] = []


def kept_rows(target: Path, header: str, running: list[str]) -> Kept:
    """The rows of ``target`` for the attacks not in ``running``; its tables must have the columns of ``header``."""
    kept = Kept()
    if not target.exists():
        return kept
    text = target.read_text().splitlines()
    tables = [i for i, line in enumerate(text) if line.startswith("| attack")]
    if any(text[i] != header for i in tables):
        raise SystemExit(f"{target.relative_to(REPO)} has other defences than these; run its whole grid instead")
    for index, rows in zip(tables, (kept.accuracy, kept.weight)):
        for line in text[index + 2 :]:
            if not line.startswith("| "):
                break
            attack = line.split(" | ")[0][2:]
            if attack not in running:
                rows[attack] = line
            if rows is kept.accuracy:
                kept.order.append(attack)
    # each command with its machine line, the file's own and those of rows it kept; those that made a kept row stay
    lines = [line.removesuffix("  ").removeprefix("- ") for line in text if line.startswith(("Command: ", "- Com"))]
    machines = [line.removesuffix("  ").removeprefix("- ") for line in text if line.startswith(("Machine: ", "- Mac"))]
    for command, machine in zip(lines, machines):
        made = command.split(" --attacks ")[1].split(" --")[0].rstrip("`").split()
        if any(attack not in running for attack in made):
            kept.provenance += [f"- {command}", f"- {machine}"]
    return kept


def _row_means(row: str) -> list[tuple[float, float]]:
    """The mean accuracy and mean attack success (nan where none) of each cell of a table row."""
    means = []
    for cell in row.strip("| ").split(" | ")[1:]:
        parts = [part.split(" ± ")[0] for part in cell.split(" / ")]
        means.append((float(parts[0]), float(parts[1]) if len(parts) > 1 else float("nan")))
    return means


def figure_of(
    means: dict[str, list[tuple[float, float]]], attacks: list[str], args: argparse.Namespace, setting: str
) -> Path:
    """A heat map of the mean final clean accuracy, attacks by defences; the backdoor's cells also give its success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    accuracy = np.array([[acc for acc, _ in means[a]] for a in attacks])
    figure, axes = plt.subplots(figsize=(1.1 * len(args.defences) + 2.5, 0.6 * len(attacks) + 1.8))
    image = axes.imshow(accuracy, cmap="RdYlGn", vmin=0.0, vmax=max(0.9, float(np.nanmax(accuracy))))
    for i, attack in enumerate(attacks):
        for j, (acc, success) in enumerate(means[attack]):
            text = f"{acc:.2f}"
            if success == success:
                text += f"\nASR {success:.2f}"
            axes.text(j, i, text, ha="center", va="center", fontsize=7)
    axes.set_xticks(range(len(args.defences)), args.defences, rotation=35, ha="right", fontsize=8)
    axes.set_yticks(range(len(attacks)), attacks, fontsize=8)
    axes.set_title(
        f"{args.method}: final clean accuracy, {int(args.fraction * 100)} % malicious, Dirichlet {args.alpha:g}, "
        f"{len(args.seeds)} seed(s)",
        fontsize=9,
    )
    figure.colorbar(image, ax=axes, fraction=0.03)
    figure.tight_layout()
    target = REPO / "docs" / f"attack_defence-{args.method}-{setting}.png"
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


if __name__ == "__main__":
    main()
