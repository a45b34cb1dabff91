"""Attacks against defences on the quickstart task: the final server accuracy of each pair, in one process.

    python benchmarks/attack_defence.py                 # Head, 15 rounds, every attack x every defence
    python benchmarks/attack_defence.py --method prompt --rounds 10 --attacks none alie --defences fedavg median
    python benchmarks/attack_defence.py --reuse          # read finished runs back instead of re-running them

Each pair is ``fedpeft fit --config configs/quickstart.yaml --config configs/quickstart/<method>.yaml`` with
``trainer.attack`` and ``trainer.aggregation`` set as below: 16 clients, 8 a round, 4 of them malicious
(``fraction: 0.25``, the same 4 in every pair: drawn from the seed), so a round holds two on average.
The runs share one Python process (the imports are paid once). Logs go to ``<out>/<attack>/<defence>``;
the table to benchmarks/results/attack_defence[-<method>].md.

Reported per pair: the final server accuracy; for the backdoor its success rate (triggered test images of
the other classes put in the target class); the mean share of the aggregate that went to malicious clients
(``attack/malicious_weight``, where the rule weighs whole updates); for selecting rules, the mean true and
false positive rates of their rejections.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FRACTION = 0.25
ATTACKS = {
    "none": None,
    "sign-flip": ("SignFlip", {"scale": 4.0}),
    "label-flip": ("LabelFlip", {}),
    "quantity-x100": ("QuantityInflation", {"factor": 100.0}),
    "backdoor-boost4": ("Backdoor", {"target": 0, "patch": 3, "poison_fraction": 0.5, "boost": 4.0}),
    "alie": ("ALIE", {}),
    "ipm-0.1": ("IPM", {"epsilon": 0.1}),
    "min-max": ("MinMax", {}),
}
DEFENCES = {
    "fedavg": "fedpeft_pl.strategies.WeightedMean",
    "median": "fedpeft_pl.strategies.Median",
    "trimmed-0.25": ("fedpeft_pl.strategies.TrimmedMean", {"beta": 0.25}),
    "multikrum-f2": ("fedpeft_pl.strategies.MultiKrum", {"f": 2}),
    "geomed": "fedpeft_pl.strategies.GeometricMedian",
    "cclip-1": ("fedpeft_pl.strategies.CenteredClipping", {"tau": 1.0}),
    "normbound-1": ("fedpeft_pl.strategies.NormBound", {"bound": 1.0}),
    "counts-uniform": ("fedpeft_pl.strategies.SampleCounts", {"uniform": True}),
}


def _yaml(value) -> str:
    import json

    return json.dumps(value)


def overlay(attack: str, defence: str, rounds: int, out: Path, method: str) -> str:
    spec = DEFENCES[defence]
    path, args = (spec, {}) if isinstance(spec, str) else spec
    lines = [
        "trainer:",
        f"  num_rounds: {rounds}",
        "  enable_progress_bar: false",
        "  enable_checkpointing: false",
        "  logger:",
        "    class_path: lightning.pytorch.loggers.TensorBoardLogger",
        f"    init_args: {{save_dir: {_yaml(str(out / attack))}, name: {defence}, version: 0}}",
        "  aggregation:",
        "    class_path: fedpeft_pl.strategies.FedAvg",
        f"    init_args: {{aggregator: {{class_path: {path}, init_args: {_yaml(args)}}}}}",
    ]
    if ATTACKS[attack] is not None:
        name, kwargs = ATTACKS[attack]
        lines += [
            "  attack:",
            f"    class_path: fedpeft_pl.attacks.{name}",
            f"    init_args: {_yaml({**kwargs, 'fraction': FRACTION})}",
        ]
    return "\n".join(lines) + "\n"


def scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run(attack: str, defence: str, rounds: int, out: Path, method: str, reuse: bool) -> tuple[dict, float]:
    from fedpeft_pl.cli import main

    log_dir = out / attack / defence / "version_0"
    if reuse and log_dir.is_dir():
        return scalars(log_dir), float("nan")
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.parent.mkdir(parents=True, exist_ok=True)
    config = out / attack / f"{defence}.yaml"
    config.write_text(overlay(attack, defence, rounds, out, method))
    started = time.perf_counter()
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--config",
            str(REPO / "configs" / "quickstart" / f"{method}.yaml"),
            "--config",
            str(config),
        ]
    )
    return scalars(log_dir), time.perf_counter() - started


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="head")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS))
    parser.add_argument("--defences", nargs="*", default=list(DEFENCES))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "attack_defence")
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args()
    out = args.out / args.method
    results: dict[tuple[str, str], dict] = {}
    seconds = []
    total = len(args.attacks) * len(args.defences)
    for attack in args.attacks:
        for defence in args.defences:
            logged, wall = run(attack, defence, args.rounds, out, args.method, args.reuse)
            results[attack, defence] = logged
            seconds.append(wall)
            acc = logged.get("server/acc", [float("nan")])[-1]
            print(f"[{len(results)}/{total}] {attack} x {defence}: server acc {acc:.4f} ({wall:.0f} s)", flush=True)

    lines = [
        f"Attacks x defences on the quickstart task with {args.method}: 16 clients, 8 a round, {args.rounds} rounds, "
        f"{int(FRACTION * 16)} malicious clients (fraction {FRACTION}, the same ones in every pair), seed 0.",
        "",
        f"Command: `python benchmarks/attack_defence.py --method {args.method} --rounds {args.rounds}`  ",
        f"Machine: {platform.machine()}, Python {platform.python_version()}; median seconds per run: "
        f"{sorted(seconds)[len(seconds) // 2]:.0f}",
        "",
        "Final server accuracy (backdoor: accuracy / attack success rate):",
        "",
        "| attack \\ defence | " + " | ".join(args.defences) + " |",
        "|---" * (len(args.defences) + 1) + "|",
    ]
    for attack in args.attacks:
        cells = []
        for defence in args.defences:
            logged = results[attack, defence]
            acc = logged.get("server/acc", [float("nan")])[-1]
            cell = f"{acc:.3f}"
            if "attack/success_rate" in logged:
                cell += f" / {logged['attack/success_rate'][-1]:.3f}"
            cells.append(cell)
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean share of the aggregate given to malicious clients (`attack/malicious_weight`; - where the rule "
        "works per coordinate), and for Multi-Krum the mean true / false positive rates of its rejections:",
        "",
        "| attack \\ defence | " + " | ".join(args.defences) + " |",
        "|---" * (len(args.defences) + 1) + "|",
    ]
    for attack in args.attacks:
        if attack == "none":
            continue
        cells = []
        for defence in args.defences:
            logged = results[attack, defence]
            weight = logged.get("attack/malicious_weight")
            cell = f"{_mean(weight):.3f}" if weight else "-"
            if "attack/tpr" in logged:
                cell += f" (TPR {_mean(logged['attack/tpr']):.2f}, FPR {_mean(logged.get('attack/fpr', [])):.2f})"
            cells.append(cell)
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    suffix = "" if args.method == "head" else f"-{args.method}"
    target = REPO / "benchmarks" / "results" / f"attack_defence{suffix}.md"
    target.write_text("\n".join(lines) + "\n")
    print(f"wrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
