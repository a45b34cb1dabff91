"""The two client runners end to end: the quickstart's fit, sequential against vectorised.

    python benchmarks/runners.py                                   # six methods, 10 rounds, 1 repeat
    python benchmarks/runners.py --methods lora --rounds 30 --repeats 3
    python benchmarks/runners.py --accelerator gpu --precision bf16-mixed --output runners_gpu.md
    python benchmarks/runners.py --methods lora --rounds 3 --accelerator gpu --precision bf16-mixed \
        --config benchmarks/configs/vit_b16.yaml --output runners_vit_b16.md   # ViT-B/16 end to end

Each run is ``fedpeft fit --config configs/quickstart.yaml --config configs/quickstart/<method>.yaml``
(8 of 16 clients a round, 5 local epochs, evaluation every round) in a fresh process, with
``--trainer.client_runner sequential`` or ``vectorized`` and the Head feature cache off (it is
measured in benchmarks/feature_cache.py). Unlike benchmarks/vectorized.py, which times the two
training engines alone, this times everything a user waits for: data and model set-up, Lightning's
evaluation, checkpoints and logging. Runs alternate sequential / vectorised. Reported: the fit's
wall time as the run's closing line prints it, the ratio of medians, the largest difference
between the two runs' final global states (from their ``last.ckpt``) and both final server
accuracies, and the median time of a round after the first (``round/seconds`` in the run's logs;
the first round includes warm-up). ``--config`` adds an overlay after the method's (e.g. the
ViT-B/16 case, ``benchmarks/configs/vit_b16.yaml``). Results go to benchmarks/results/runners.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedpeft_pl.analysis import load_run  # noqa: E402 (the checkout's package, not an installed one)

METHODS = ["head", "bias", "adapter", "prompt", "lora", "full"]


def run(
    method: str,
    runner: str,
    rounds: int,
    out: Path,
    accelerator: str = "cpu",
    precision: str = "32-true",
    overlays: tuple[str, ...] = (),
) -> tuple[float, dict[str, torch.Tensor], float, float]:
    """Fit seconds, final trainable state, final server accuracy and median seconds of a round after the first."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "fedpeft_pl.cli",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--config",
        f"configs/quickstart/{method}.yaml",
        *(arg for overlay in overlays for arg in ("--config", overlay)),
        "--trainer.client_runner",
        runner,
        "--trainer.feature_cache",
        "off",
        "--trainer.num_rounds",
        str(rounds),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        method,
        "--trainer.logger.init_args.version",
        "run",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        accelerator,
        "--trainer.precision",
        precision,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {runner} run of {method} failed:\n{done.stderr[-3000:]}")
    match = re.search(r"done: \d+ rounds, [\d.,]+ MiB sent, in ([\d.]+) s; final server accuracy ([\d.]+)", done.stderr)
    if match is None:
        raise RuntimeError(f"no closing line in the run's output:\n{done.stderr[-2000:]}")
    checkpoint = torch.load(out / method / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    _, seconds = load_run(out / method / "run").series("round/seconds")
    per_round = statistics.median(seconds[1:] or seconds) if seconds else float("nan")
    return float(match.group(1)), checkpoint["state_dict"], float(match.group(2)), per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu", help="Lightning's accelerator, e.g. gpu")
    parser.add_argument("--precision", default="32-true", help="Lightning's precision, e.g. bf16-mixed")
    parser.add_argument("--output", default="runners.md", help="file name under benchmarks/results/")
    parser.add_argument("--config", action="append", default=[], help="a further overlay, after the method's")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            times: dict[str, list[float]] = {"sequential": [], "vectorized": []}
            rounds: dict[str, list[float]] = {"sequential": [], "vectorized": []}
            accuracy: dict[str, float] = {}
            diff = 0.0
            for repeat in range(args.repeats):
                states = {}
                for runner in times:
                    seconds, states[runner], accuracy[runner], per_round = run(
                        method,
                        runner,
                        args.rounds,
                        Path(scratch) / runner,
                        args.accelerator,
                        args.precision,
                        tuple(args.config),
                    )
                    times[runner].append(seconds)
                    rounds[runner].append(per_round)
                    print(
                        f"{method}, {runner}, repeat {repeat + 1}: fit {seconds:.1f} s, "
                        f"server accuracy {accuracy[runner]:.4f}",
                        flush=True,
                    )
                first, second = states["sequential"], states["vectorized"]
                diff = max(diff, max(float((first[n].float() - second[n].float()).abs().max()) for n in first))
            sequential, vectorized = (statistics.median(times[r]) for r in ("sequential", "vectorized"))
            round_seq, round_vec = (statistics.median(rounds[r]) for r in ("sequential", "vectorized"))
            rows.append(
                f"| {method} | {sequential:.1f} | {vectorized:.1f} | {sequential / vectorized:.2f}x | {diff:.1e} | "
                f"{accuracy['sequential']:.4f} / {accuracy['vectorized']:.4f} | {round_seq:.2f} / {round_vec:.2f} |"
            )
            print(rows[-1], flush=True)
    gpu = f", {torch.cuda.get_device_name()}" if args.accelerator in ("gpu", "cuda") else ""
    lines = [
        f"# Client runners end to end on the quickstart ({args.rounds} rounds x 5 local epochs, 8 of 16 clients a "
        "round, "
        "evaluation every round, feature cache off)",
        "",
        f"Command: `python benchmarks/runners.py --methods {' '.join(args.methods)} --rounds {args.rounds} "
        f"--repeats {args.repeats} --accelerator {args.accelerator} --precision {args.precision}"
        f"{''.join(' --config ' + c for c in args.config)}"
        f"{'' if args.output == 'runners.md' else ' --output ' + Path(args.output).name}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}){gpu}, torch {torch.__version__}, load average at "
        "the end "
        f"{os.getloadavg()[0]:.1f}; medians of {args.repeats} alternating run(s) per side",
        "",
        "| method | sequential fit s | vectorised fit s | speed-up | max final-state diff | final server accuracy "
        "(sequential / vectorised) | round s after the first (sequential / vectorised) |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    table = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results" / args.output).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
