"""The same federated workload on fedpeft and on Flower's simulation engine, side by side.

    pip install "flwr[simulation]" psutil      # Flower is not a dependency of fedpeft
    python benchmarks/vs_flower.py --repeats 3

Workload: the quickstart's tiny ViT (shipped weights) with Prompt, scikit-learn's digits split IID
over N=64 clients, m=8 a round, 3 rounds, 1 local epoch, batch 32, SGD; the server evaluates the
global model on the test split after every round; only the trainable tensors travel. fedpeft runs
it with FederatedTrainer. Flower runs it with ``flwr.simulation.run_simulation`` (Ray backend) and
a straightforward Lightning ClientApp in the style of Flower's Lightning quickstart: each train
message builds the LightningModule, loads the received tensors, and fits a fresh ``pl.Trainer``
for one epoch on the node's partition (the data set is cached per worker process). Each engine
runs in its own process; wall time is from process start to exit, peak memory is the largest sum
of RSS over the process and all its children (Ray's workers included), sampled every 0.1 s. The
engines alternate; medians over repeats. Results go to benchmarks/results/vs_flower.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUM_CLIENTS, PER_ROUND, ROUNDS, BATCH = 64, 8, 3, 32
WEIGHTS = str(REPO / "fedpeft_pl" / "assets" / "vit_pico_mnist.safetensors")


def build_module():
    import torch
    from workloads import quickstart_backbone

    from fedpeft_pl import FedPEFTModule
    from fedpeft_pl.peft import Prompt

    module = FedPEFTModule(
        10,
        quickstart_backbone(WEIGHTS),
        Prompt(num_tokens=10, deep=True),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
    )
    module.configure_model()
    return module


def run_fedpeft() -> None:
    from fedpeft_pl import FederatedDataModule, FederatedTrainer
    from fedpeft_pl.data import IID, Digits

    trainer = FederatedTrainer(
        num_rounds=ROUNDS,
        clients_per_round=PER_ROUND,
        local_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    datamodule = FederatedDataModule(Digits(), num_clients=NUM_CLIENTS, partition=IID(), batch_size=BATCH)
    trainer.fit(build_module(), datamodule=datamodule)
    print(f"fedpeft final server acc {float(trainer.callback_metrics['server/acc']):.4f}")


_DATA = None


def _data():
    """Digits split among the clients exactly as FederatedDataModule does; cached per process."""
    global _DATA
    if _DATA is None:
        import numpy as np

        from fedpeft_pl.backbone import data_config
        from fedpeft_pl.data import IID, Digits
        from fedpeft_pl.data.datasets import image_transform

        config = data_config(build_module().model)
        splits = Digits().load(image_transform(config), 0)
        _DATA = splits, IID()(splits.train_targets, NUM_CLIENTS, np.random.default_rng(0))
    return _DATA


def run_flower() -> None:
    import lightning.pytorch as pl
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from torch.utils.data import DataLoader, Subset

    from fedpeft_pl.peft import load_trainable_state, trainable_state

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        model = build_module()
        load_trainable_state(model, msg.content["arrays"].to_torch_state_dict())
        splits, indices = _data()
        part = indices[int(context.node_config["partition-id"])]
        loader = DataLoader(Subset(splits.train, part.tolist()), batch_size=BATCH, shuffle=True)
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, loader)
        content = RecordDict(
            {"arrays": ArrayRecord(trainable_state(model)), "metrics": MetricRecord({"num-examples": len(part)})}
        )
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        model = build_module()
        splits, _ = _data()
        evaluator = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:  # fedpeft does not evaluate the initial state either
                return None
            load_trainable_state(model, arrays.to_torch_state_dict())
            evaluator.validate(model, DataLoader(splits.test, batch_size=BATCH), verbose=False)
            return MetricRecord({"accuracy": float(evaluator.callback_metrics["server/acc"])})

        strategy = FedAvg(
            fraction_train=PER_ROUND / NUM_CLIENTS, fraction_evaluate=0.0, min_available_nodes=NUM_CLIENTS
        )
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(trainable_state(model)), num_rounds=ROUNDS, evaluate_fn=evaluate
        )
        print(f"flower final server acc {result.evaluate_metrics_serverapp[ROUNDS]['accuracy']:.4f}")

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


def measure(engine: str) -> tuple[float, float, str]:
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--engine", engine],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{output[-3000:]}")
    accuracy = next((line for line in output.splitlines() if "final server acc" in line), "")
    return seconds, peak, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["fedpeft", "flower"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.engine:
        import logging

        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))  # Ray gives each of its workers one thread
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        logging.getLogger("fedpeft_pl").setLevel(logging.ERROR)
        run_fedpeft() if args.engine == "fedpeft" else run_flower()
        return
    import flwr

    results: dict[str, list] = {"fedpeft": [], "flower": []}
    for _ in range(args.repeats):
        for engine in results:
            results[engine].append(measure(engine))
            print(engine, results[engine][-1], flush=True)
    median = {e: statistics.median(r[0] for r in runs) for e, runs in results.items()}
    peak = {e: statistics.median(r[1] for r in runs) / 2**20 for e, runs in results.items()}
    import lightning
    import torch

    lines = [
        f"Tiny ViT + Prompt, digits IID over N={NUM_CLIENTS}, m={PER_ROUND}, {ROUNDS} rounds x 1 local epoch, "
        f"batch {BATCH}, server evaluation every round; median of {args.repeats} alternating runs each.",
        "",
        f"Command: `python benchmarks/vs_flower.py --repeats {args.repeats}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"lightning {lightning.__version__}, flwr {flwr.__version__}",
        "",
        "| engine | wall s per run | median wall s | peak memory, process tree (MiB) | last run |",
        "|---|---|---|---|---|",
    ]
    for engine, runs in results.items():
        lines.append(
            f"| {engine} | {', '.join(f'{r[0]:.1f}' for r in runs)} | {median[engine]:.1f} | "
            f"{peak[engine]:,.0f} | {runs[-1][2]} |"
        )
    lines += [
        "",
        f"Flower / fedpeft wall time: {median['flower'] / median['fedpeft']:.2f}x; "
        f"peak memory: {peak['flower'] / peak['fedpeft']:.2f}x",
    ]
    table = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results" / "vs_flower.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
