"""The simulation's own speed under FedBuff: images trained per wall second, vectorised engine against
synchronous rounds at the same concurrency, and against the sequential runner.

    python benchmarks/async_engine_speed.py                       # 3 repetitions, alternating modes
    python benchmarks/async_engine_speed.py --repeats 1 --tasks 64  # a quick look

Work: the quickstart (Prompt on the frozen tiny ViT, digits, Dirichlet(0.5), 5 local epochs, batch 32)
over a federation of 64 clients (``data.num_clients: 64``), on the clock of
configs/quickstart/clock.yaml. The modes, each a fresh trainer built from the config as ``fedpeft
fit`` builds it, in one process:

- ``sync-vectorized``: synchronous rounds of 32 clients, vectorised runner (the 32 train stacked);
- ``fedbuff-vectorized``: FedBuff with C = 32 clients in flight and a buffer of K = 8, vectorised
  runner (each update trains the clients dispatched during it stacked: 32 at the first, about 8 after);
- ``fedbuff-sequential``: the same FedBuff on the sequential runner (one client after another);
- ``sync-sequential``: synchronous rounds of 32 on the sequential runner (for reference).

Every mode trains about ``--tasks`` client tasks (synchronous: tasks / 32 rounds; FedBuff:
1 + (tasks - 32) / 8 updates). Timed: the wall seconds from each round's (server update's) start to
its end, so training and aggregation but not the evaluation, which runs once, after the last update;
counted: each trained client's samples times its local epochs (the ``on_client_end`` results).
Modes alternate within each repetition, after one warm-up fit; medians over the repetitions.
The table goes to benchmarks/results/async_engine_speed.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedpeft_pl.hooks import FederatedCallback  # noqa: E402 (the checkout's package)

CONCURRENCY, BUFFER = 32, 8


class Meter(FederatedCallback):
    """Images trained (samples x local epochs of every client result) and wall seconds inside rounds."""

    def __init__(self, local_epochs: int) -> None:
        self.local_epochs = local_epochs
        self.images = 0
        self.clients = 0
        self.seconds = 0.0
        self._started = None

    def on_round_start(self, trainer, pl_module, round) -> None:
        self._started = time.perf_counter()

    def on_round_end(self, trainer, pl_module, round) -> None:
        self.seconds += time.perf_counter() - self._started

    def on_client_end(self, trainer, pl_module, round, result) -> None:
        self.images += result.num_samples * self.local_epochs
        self.clients += 1


def arguments(mode: str, tasks: int) -> list[str]:
    schedule, runner = mode.split("-")
    common = [
        "--config",
        "configs/quickstart.yaml",
        "--config",
        "configs/quickstart/clock.yaml",
        "--data.num_clients",
        "64",
        "--trainer.client_runner",
        runner,
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.check_val_every_n_epoch",
        "1000",
    ]
    if schedule == "sync":
        return [
            *common,
            "--trainer.clients_per_round",
            str(CONCURRENCY),
            "--trainer.num_rounds",
            str(tasks // CONCURRENCY),
        ]
    updates = 1 + (tasks - CONCURRENCY) // BUFFER
    return [
        *common,
        "--config",
        "configs/quickstart/fedbuff.yaml",
        "--trainer.schedule.init_args.concurrency",
        str(CONCURRENCY),
        "--trainer.schedule.init_args.buffer_size",
        str(BUFFER),
        "--trainer.num_rounds",
        str(updates),
    ]


def fit(mode: str, tasks: int, work: Path) -> Meter:
    from fedpeft_pl.config import build_run, resolve_config

    config = work / f"{mode}.yaml"
    text = resolve_config(arguments(mode, tasks))
    config.write_text(text)
    trainer, module, datamodule, _ = build_run(config, save_config=False)
    meter = Meter(int(yaml.safe_load(text)["trainer"]["local_epochs"]))
    trainer.callbacks.append(meter)
    trainer.fit(module, datamodule=datamodule)
    return meter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=192, help="client tasks per fit (a multiple of 32)")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["sync-vectorized", "fedbuff-vectorized", "fedbuff-sequential", "sync-sequential"],
    )
    parser.add_argument("--output", default="async_engine_speed.md")
    args = parser.parse_args()
    os.chdir(REPO)

    import torch

    rates: dict[str, list[float]] = {m: [] for m in args.modes}
    counts: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fit("fedbuff-vectorized", 64, work)  # warm-up: imports, first-call costs
        for repeat in range(args.repeats):
            for mode in args.modes:
                meter = fit(mode, args.tasks, work)
                rates[mode].append(meter.images / meter.seconds)
                counts[mode] = (meter.clients, meter.images)
                print(
                    f"repeat {repeat}: {mode}: {meter.clients} client tasks, {meter.images} images in "
                    f"{meter.seconds:.1f} s: {meter.images / meter.seconds:.0f} images/s",
                    flush=True,
                )

    median = {m: statistics.median(v) for m, v in rates.items()}
    load = os.getloadavg()[0]
    lines = [
        "FedBuff's engine speed: the quickstart (Prompt, tiny ViT, digits) over 64 clients, 5 local epochs, "
        f"about {args.tasks} client tasks a fit; C = {CONCURRENCY} in flight, K = {BUFFER} a buffer; "
        f"synchronous rounds of {CONCURRENCY}.",
        "",
        f"Command: `python benchmarks/async_engine_speed.py --repeats {args.repeats} --tasks {args.tasks}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average at the end {load:.1f}; modes alternate, "
        f"medians of {args.repeats}",
        "",
        "| mode | client tasks trained | images trained | images per wall second (per repetition) | median | "
        "vs sync-vectorized |",
        "|---|---|---|---|---|---|",
    ]
    reference = median.get("sync-vectorized")
    for mode in args.modes:
        clients, images = counts[mode]
        ratio = f"{median[mode] / reference:.2f}x" if reference else "-"
        lines.append(
            f"| {mode} | {clients} | {images:,} | {', '.join(f'{r:.0f}' for r in rates[mode])} | "
            f"{median[mode]:.0f} | {ratio} |"
        )
    if reference and "fedbuff-vectorized" in median and "fedbuff-sequential" in median:
        vec, seq = median["fedbuff-vectorized"], median["fedbuff-sequential"]
        lines += [
            "",
            "Targets:",
            "",
            f"- [{'x' if vec >= 0.8 * reference else ' '}] FedBuff vectorised >= 0.8x synchronous vectorised "
            f"({vec / reference:.2f}x)",
            f"- [{'x' if vec > seq else ' '}] FedBuff vectorised faster than FedBuff sequential ({vec / seq:.2f}x)",
        ]
    table = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results" / args.output).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
