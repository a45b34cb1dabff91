"""Sequential against vectorised local training of a round's clients, on the same work.

    python benchmarks/vectorized.py                          # all methods, (8, 32), (32, 8), (128, 8)
    python benchmarks/vectorized.py --methods head lora --configs 8x32 --repeats 5
    python benchmarks/vectorized.py --memory                 # also training's peak memory, one fresh process per side

Work: the quickstart's tiny ViT (benchmarks/workloads.py), m clients of ``steps * batch`` digits
each (drawn with a fixed seed from the training split, pre-transformed to tensors so that both
sides spend their time in the model), 1 local epoch, SGD with momentum 0.9 and weight decay 1e-4.
The sequential side is the plain PyTorch per-client loop (load the received state, a fresh
optimizer, the client's loader batches, mean cross entropy, step), what our simulation runs at
1.04x of (benchmarks/overhead.py). The vectorised side is ``fedpeft_pl.vectorized.train_clients``.
Both end in the same per-client states (checked: the largest difference is printed). Runs
alternate sequential / vectorised and the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads import peft_method, quickstart_backbone  # noqa: E402

from fedpeft_pl import FedPEFTModule, FederatedDataModule  # noqa: E402
from fedpeft_pl.client import default_optimizer  # noqa: E402
from fedpeft_pl.data import Digits  # noqa: E402
from fedpeft_pl.peft import load_trainable_state, trainable_parameters, trainable_state  # noqa: E402
from fedpeft_pl.vectorized import ClientJob, train_clients  # noqa: E402

METHODS = ["head", "bias", "adapter", "prompt", "lora", "full"]
CONFIGS = ["8x32", "32x8", "128x8"]


def build(method: str, clients: int, batch: int, steps: int):
    torch.manual_seed(0)
    module = FedPEFTModule(10, quickstart_backbone(), peft_method(method))
    dm = FederatedDataModule(Digits(), num_clients=clients, batch_size=batch)
    dm.data_config = module.data_config
    dm.setup()
    train = dm.splits.train
    images, labels = zip(*(train[i][:2] for i in range(len(train))))
    dm.splits.train = TensorDataset(torch.stack(images), torch.as_tensor(labels))
    rng = np.random.default_rng(0)
    dm.client_indices = [rng.choice(len(train), steps * batch, replace=False) for _ in range(clients)]
    jobs = [ClientJob(c, seed=1000 + c, max_batches=10**9, start=trainable_state(module)) for c in range(clients)]
    return module, dm, jobs


def sequential(module, dm, jobs):
    states = []
    module.train()
    images, labels = dm.splits.train.tensors
    for job in jobs:
        load_trainable_state(module, job.start)
        optimizer = default_optimizer(trainable_parameters(module).values())
        for batch in dm.client_batches(job.client, job.seed, 1, job.max_batches):
            loss = F.cross_entropy(module(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        states.append(trainable_state(module))
    load_trainable_state(module, jobs[0].start)
    return states


def vectorised(module, dm, jobs):
    return [o.state for o in train_clients(module, dm, jobs, 1, default_optimizer)]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_child(method: str, config: str, side: str, steps: int) -> None:
    """Peak resident memory of training alone: the high-water mark is reset after the set-up.

    The process's peak is otherwise set while the digits are loaded and transformed, which hides
    training's memory at this model size; Linux resets the peak (VmHWM) on writing 5 to
    /proc/self/clear_refs, so the growth measured is the backbone-free part: activations,
    gradients, optimizer state and the stacked per-client tensors.
    """
    clients, batch = map(int, config.split("x"))
    module, dm, jobs = build(method, clients, batch, steps)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    (sequential if side == "sequential" else vectorised)(module, dm, jobs)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024}))


def memory(method: str, config: str, side: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, config, side, "--steps", str(steps)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.child:
        memory_child(*args.child, args.steps)
        return
    print("| method | m x batch | sequential s (median) | vectorised s (median) | ratio | max state diff |"
          + (" training peak seq / vec MiB | bound m x seq MiB |" if args.memory else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if args.memory else ""))
    for config in args.configs:
        clients, batch = map(int, config.split("x"))
        for method in args.methods:
            module, dm, jobs = build(method, clients, batch, args.steps)
            vectorised(module, dm, jobs[:2])  # warm-up of both paths
            sequential(module, dm, jobs[:2])
            seq_times, vec_times, diff = [], [], 0.0
            for _ in range(args.repeats):
                t, seq_states = timed(sequential, module, dm, jobs)
                seq_times.append(t)
                t, vec_states = timed(vectorised, module, dm, jobs)
                vec_times.append(t)
                diff = max(diff, max(float((a[n] - b[n]).abs().max()) for a, b in zip(seq_states, vec_states) for n in a))
            s, v = statistics.median(seq_times), statistics.median(vec_times)
            row = f"| {method} | {clients} x {batch} | {s:.3f} | {v:.3f} | {s / v:.2f}x | {diff:.1e} |"
            if args.memory:
                ms, mv = memory(method, config, "sequential", args.steps), memory(method, config, "vectorised", args.steps)
                # the bound: m clients' worth of what one sequential client needs at its peak
                # (activations, gradients, optimizer state); the backbone is shared and not in either
                row += f" {ms['growth_mib']:.0f} / {mv['growth_mib']:.0f} | {clients * ms['growth_mib']:.0f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
