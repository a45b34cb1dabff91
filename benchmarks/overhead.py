"""Simulation overhead of fedpeft against the limit: a plain PyTorch loop doing the same work.

    python benchmarks/overhead.py                      # all six methods, 5 repeats each
    python benchmarks/overhead.py --methods prompt --repeats 7

For each method, the same tiny ViT (the quickstart's architecture) federates scikit-learn's digits
over N=16 clients, m=8 a round, R rounds of E local epochs, batch 32, without evaluation. The
plain loop trains the same model on the same samples in the same order with the same batch size:
it samples clients with ``sample_clients``, takes each client's batches from the same
``client_dataloader`` with the same seed, runs forward, backward and SGD, and averages the states.
Both start from a built module and data module and include data set-up. The two alternate, the
reported figure is the median over repeats of each, and the final global states of the two are
compared (they must agree: otherwise the loops would not be doing the same work). The Head
feature cache is off here (``--feature_cache off``): with it fedpeft does less work than the plain
loop (the backbone runs once per image), which benchmarks/feature_cache.py measures.
Results go to benchmarks/results/overhead.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import lightning
import timm
import torch
import torch.nn.functional as F
from workloads import METHOD_NAMES, peft_method, quickstart_backbone

from fedpeft_pl import FederatedDataModule, FederatedTrainer, FedPEFTModule
from fedpeft_pl.data import Digits
from fedpeft_pl.federation import sample_clients
from fedpeft_pl.peft import load_trainable_state, trainable_parameters, trainable_state
from fedpeft_pl.seeds import client_seed, training_seed
from fedpeft_pl.strategies import ClientUpdate, weighted_average

REPO = Path(__file__).resolve().parents[1]


def build(method: str, clients: int) -> tuple[FedPEFTModule, FederatedDataModule]:
    torch.manual_seed(0)
    module = FedPEFTModule(
        10, quickstart_backbone(), peft_method(method), optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)
    )
    return module, FederatedDataModule(Digits(), num_clients=clients, batch_size=32, seed=0)


def run_fedpeft(method: str, args: argparse.Namespace) -> tuple[float, dict]:
    module, datamodule = build(method, args.clients)
    trainer = FederatedTrainer(
        num_rounds=args.rounds,
        clients_per_round=args.per_round,
        local_epochs=args.local_epochs,
        seed=0,
        feature_cache=args.feature_cache,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - started, trainable_state(module)


def run_plain(method: str, args: argparse.Namespace) -> tuple[float, dict]:
    module, datamodule = build(method, args.clients)
    started = time.perf_counter()
    module.configure_model()
    datamodule.data_config = module.data_config
    datamodule.setup("fit")
    module.train()
    global_state = trainable_state(module)
    for server_round in range(1, args.rounds + 1):
        updates = []
        for client in sample_clients(0, server_round, args.clients, args.per_round):
            load_trainable_state(module, global_state)
            optimizer = torch.optim.SGD(trainable_parameters(module).values(), lr=0.01, momentum=0.9)
            loader = datamodule.client_dataloader(client, client_seed(0, server_round, client))
            with torch.random.fork_rng():
                torch.manual_seed(training_seed(0, server_round, client))
                for _ in range(args.local_epochs):
                    for images, labels in loader:
                        loss = F.cross_entropy(module(images), labels)
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
            updates.append(ClientUpdate(client, datamodule.client_num_samples(client), trainable_state(module)))
        global_state = weighted_average(updates)
    load_trainable_state(module, global_state)
    return time.perf_counter() - started, global_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHOD_NAMES, choices=METHOD_NAMES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per_round", type=int, default=8)
    parser.add_argument("--local_epochs", type=int, default=2)
    parser.add_argument(
        "--feature_cache",
        choices=["off", "auto"],
        default="off",
        help="the Head feature cache; off compares the same work (default)",
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("fedpeft_pl").setLevel(logging.ERROR)

    rows = []
    for method in args.methods:
        run_fedpeft(method, args)  # warm-up: imports, allocator, the digits file
        ours, plain = [], []
        for _ in range(args.repeats):
            seconds, ours_state = run_fedpeft(method, args)
            ours.append(seconds)
            seconds, plain_state = run_plain(method, args)
            plain.append(seconds)
        agree = all(torch.allclose(ours_state[k], plain_state[k], rtol=1e-4, atol=1e-6) for k in ours_state)
        ratio = statistics.median(ours) / statistics.median(plain)
        # the spread of the ratio of each alternating pair: how far one run pair can stray on this machine
        pairs = sorted(a / b for a, b in zip(ours, plain))
        spread = f"{pairs[0]:.3f}-{pairs[-1]:.3f}"
        rows.append((method, statistics.median(ours), statistics.median(plain), ratio, spread, agree))
        print(
            f"{method}: fedpeft {statistics.median(ours):.2f} s, plain {statistics.median(plain):.2f} s, "
            f"ratio {ratio:.3f} (pairs {spread}), same final state: {agree}",
            flush=True,
        )

    lines = [
        f"Tiny ViT (quickstart architecture), digits, N={args.clients}, m={args.per_round}, {args.rounds} rounds x "
        f"{args.local_epochs} local epochs, batch 32, no evaluation, feature cache {args.feature_cache}; "
        f"median of {args.repeats} alternating runs each.",
        "",
        f"Command: `python benchmarks/overhead.py --methods {' '.join(args.methods)} --repeats {args.repeats}"
        + (f" --feature_cache {args.feature_cache}" if args.feature_cache != "off" else "")
        + "`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"lightning {lightning.__version__}, timm {timm.__version__}",
        "",
        "| method | fedpeft median s | plain PyTorch median s | ratio | ratio of each run pair, min-max | same final "
        "global state |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {a:.2f} | {b:.2f} | {r:.3f} | {sp} | {'yes' if ok else 'NO'} |" for m, a, b, r, sp, ok in rows]
    table = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results" / "overhead.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
