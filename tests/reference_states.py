"""Reference global states: what two rounds of the quickstart give, kept to hold refactorings to their word.

Each case is the quickstart config (``configs/quickstart.yaml``) with a method overlay and a few
overrides, run for two rounds. Its final global state (every trainable tensor) and the server's
accuracy and loss after each round were recorded from the code as it stood before the server and
client paths were redesigned; ``check`` runs the cases again and compares.

    python tests/reference_states.py record            # write tests/data/reference_states.*
    python tests/reference_states.py check             # every case; exits 1 on a difference
    python tests/reference_states.py check prompt-seq  # some cases

``tests/test_reference_states.py`` checks a few of the cases in the suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
STATES = DATA / "reference_states.safetensors"
METRICS = DATA / "reference_states.json"
TOLERANCE = 1e-6

_RUNNERS = {"seq": "sequential", "vec": "vectorized"}
_METHODS = ("prompt", "bias", "adapter", "lora", "head", "full")

CASES: dict[str, list[str]] = {
    f"{method}-{short}": [
        "--config",
        f"configs/quickstart/{method}.yaml",
        "--trainer.client_runner",
        runner,
    ]
    for method in _METHODS
    for short, runner in _RUNNERS.items()
}
CASES["lora-int8-fedadam"] = [
    "--config",
    "configs/quickstart/lora.yaml",
    "--trainer.client_runner",
    "sequential",
    "--trainer.compress_upload",
    "fedpeft_pl.compression.Int8",
    "--trainer.aggregation",
    "fedpeft_pl.strategies.FedAdam",
    "--trainer.aggregation.lr",
    "0.01",
]
CASES["bias-scaffold"] = [
    "--config",
    "configs/quickstart/bias.yaml",
    "--trainer.client_runner",
    "sequential",
    "--trainer.aggregation",
    "fedpeft_pl.strategies.Scaffold",
]


def run_case(name: str) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Two rounds of case ``name``: the final global state and each round's server metrics."""
    import lightning.pytorch as pl

    from fedpeft_pl.config import build_run, resolve_config
    from fedpeft_pl.peft import trainable_state

    class _Rounds(pl.Callback):
        def __init__(self) -> None:
            self.rounds: list[dict[str, float]] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            metrics = trainer.callback_metrics
            self.rounds.append({k: float(metrics[k]) for k in ("server/acc", "server/loss") if k in metrics})

    args = [
        "--config",
        "configs/quickstart.yaml",
        *CASES[name],
        "--trainer.num_rounds",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.yaml"
        config.write_text(resolve_config(args))
        trainer, module, datamodule, _ = build_run(config, save_config=False)
        rounds = _Rounds()
        trainer.callbacks.append(rounds)
        trainer.fit(module, datamodule=datamodule)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in trainable_state(module).items()}
    return state, rounds.rounds


def record(names: list[str]) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = load_file(STATES) if STATES.exists() else {}
    metrics: dict[str, list[dict[str, float]]] = json.loads(METRICS.read_text()) if METRICS.exists() else {}
    for name in names:
        print(f"recording {name}", flush=True)
        state, rounds = run_case(name)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}/")}
        tensors.update({f"{name}/{k}": v for k, v in state.items()})
        metrics[name] = rounds
    save_file(tensors, STATES)
    METRICS.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")


def differences(name: str) -> tuple[float, list[str]]:
    """The largest absolute difference from the recorded state of case ``name``, and what else differs."""
    recorded = {k.split("/", 1)[1]: v for k, v in load_file(STATES).items() if k.startswith(f"{name}/")}
    recorded_rounds = json.loads(METRICS.read_text())[name]
    state, rounds = run_case(name)
    problems = []
    if set(state) != set(recorded):
        problems.append(f"tensor names differ: {sorted(set(state) ^ set(recorded))}")
    largest = 0.0
    for key in set(state) & set(recorded):
        largest = max(largest, float((state[key].double() - recorded[key].double()).abs().max()))
    if largest > TOLERANCE:
        problems.append(f"state differs by up to {largest:.3g} (tolerance {TOLERANCE})")
    if len(rounds) != len(recorded_rounds):
        problems.append(f"{len(rounds)} rounds logged, {len(recorded_rounds)} recorded")
    for number, (now, then) in enumerate(zip(rounds, recorded_rounds), start=1):
        if now.keys() != then.keys() or any(abs(now[k] - then[k]) > TOLERANCE for k in now):
            problems.append(f"round {number}: metrics {now} against recorded {then}")
    return largest, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("cases", nargs="*", help=f"some of: {', '.join(CASES)} (all by default)")
    args = parser.parse_args()
    names = args.cases or list(CASES)
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"no case named {', '.join(unknown)}; the cases: {', '.join(CASES)}")
    if args.action == "record":
        record(names)
        return
    failed = False
    for name in names:
        largest, problems = differences(name)
        print(f"{name}: max |difference| {largest:.3g}" + ("" if not problems else " | " + "; ".join(problems)))
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
