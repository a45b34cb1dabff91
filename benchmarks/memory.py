"""Peak memory as the number of clients grows, with a strategy that keeps per-client state.

    python benchmarks/memory.py                     # N = 10, 100, 1000
    python benchmarks/memory.py --clients 10 100

Each N runs in a fresh process: the quickstart's tiny ViT with Prompt federates scikit-learn's
digits (IID) over N clients, every client takes part in each of 2 rounds (m = N), 1 local epoch,
with 8-bit uploads and error feedback, so every client keeps a float32 residual of the trainable
size between rounds. The target: peak RSS(N) <= RSS(10) + (N - 10) * per-client state + 10% of RSS(10).
Results go to benchmarks/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def child(clients: int) -> None:
    import logging

    import torch
    from workloads import quickstart_backbone

    from fedpeft_pl import FederatedDataModule, FederatedTrainer, FedPEFTModule
    from fedpeft_pl.compression import Int8
    from fedpeft_pl.data import Digits
    from fedpeft_pl.peft import Prompt, trainable_parameters

    logging.getLogger("fedpeft_pl").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    module = FedPEFTModule(10, quickstart_backbone(), Prompt(num_tokens=10, deep=True))
    datamodule = FederatedDataModule(Digits(), num_clients=clients, batch_size=32)
    codec = Int8(error_feedback=True)
    trainer = FederatedTrainer(
        num_rounds=2,
        clients_per_round=clients,
        local_epochs=1,
        compress_upload=codec,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    state_bytes = sum(p.numel() * 4 for p in trainable_parameters(module).values())
    kept = sum(sum(t.numel() * t.element_size() for t in r.values()) for r in codec._residuals.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(
        json.dumps(
            {
                "clients": clients,
                "peak_rss": peak,
                "state_bytes": state_bytes,
                "kept_bytes": kept,
                "clients_with_state": len(codec._residuals),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results = []
    for clients in args.clients:
        printed = subprocess.run(
            [sys.executable, __file__, "--child", str(clients)], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout
        results.append(json.loads(printed.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    base = results[0]
    lines = [
        "Tiny ViT + Prompt on digits (IID), every client in each of 2 rounds, 8-bit uploads with error feedback "
        "(a float32 residual per client); each N in a fresh process.",
        "",
        f"Command: `python benchmarks/memory.py --clients {' '.join(map(str, args.clients))}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}",
        "",
        f"| N | clients keeping state | state kept (MiB) | peak RSS (MiB) | growth over N={base['clients']} (MiB) "
        "| bound (MiB) | within bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        growth = r["peak_rss"] - base["peak_rss"]
        bound = (r["clients"] - base["clients"]) * r["state_bytes"] + 0.1 * base["peak_rss"]
        lines.append(
            f"| {r['clients']} | {r['clients_with_state']} | {r['kept_bytes'] / MIB:.2f} | {r['peak_rss'] / MIB:.1f} | "
            f"{growth / MIB:.1f} | {bound / MIB:.1f} | {'yes' if growth <= bound else 'NO'} |"
        )
    table = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results" / "memory.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
