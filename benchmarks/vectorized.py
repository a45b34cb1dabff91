"""Sequential against vectorised local training of a round's clients, on the same work.

    python benchmarks/vectorized.py                          # all methods, (1, 256), (8, 32), (32, 8), (128, 8)
    python benchmarks/vectorized.py --path vmap              # the engine's vmap path for every method
    python benchmarks/vectorized.py --methods head lora --configs 8x32 --repeats 5
    python benchmarks/vectorized.py --memory                 # also training's peak memory, one fresh process per side
    python benchmarks/vectorized.py --methods lora --configs 8x32 --repeats 1 --profile   # where each side's time goes
    python benchmarks/vectorized.py --device cuda --model vit-b16 --precision bf16 --max-parallel 32 --memory
                                                             # the GPU rows: ViT-B/16 shapes at 224 px, bf16 autocast

Work: the quickstart's tiny ViT (benchmarks/workloads.py), m clients of ``steps * batch`` digits
each (drawn with a fixed seed from the training split, pre-transformed to tensors so that both
sides spend their time in the model), 1 local epoch, SGD with momentum 0.9 and weight decay 1e-4.
The sequential side is the plain PyTorch per-client loop (load the received state, a fresh
optimizer, the client's loader batches, mean cross entropy, step), what our simulation runs at
1.04x of (benchmarks/overhead.py). The vectorised side is ``fedpeft_pl.runners.vectorized.train_clients``.
Both end in the same per-client states (checked: the largest difference is printed). The
reference is one client with a batch of ``m * B`` ("centralised": the same images, the same number
of steps, as one centralised training job would see them) through the same plain loop; at
``1 x 256`` it is the sequential side itself, the plain model. Runs alternate sequential /
vectorised / centralised and the ratios of medians are reported: the vectorised engine against
the sequential loop, and the engine's throughput as a fraction of the centralised reference's.
``--path`` chooses the engine's path (``stacked``, where the method has a stacked form, or
``vmap``). ``torch.compile`` of the stacked step: ``benchmarks/compile_probe.py`` (not offered; benchmarks/README.md).

On a GPU (``--device cuda``) the images sit on the device for both sides, times are taken after a
device synchronisation, and ``--memory`` reports CUDA's peak allocation above what was allocated
before: one sequential client against the vectorised round, the bound being m times the former.
``--model vit-b16`` builds ViT-B/16 at 224 px with random weights (no download; the arithmetic is
the same as for pre-trained weights), ``--precision bf16`` runs both sides' forward in bf16 autocast,
and ``--max-parallel`` trains the vectorised side's clients in chunks of that many.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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

from workloads import peft_method, quickstart_backbone

from fedpeft_pl import Backbone, FederatedDataModule, FedPEFTModule
from fedpeft_pl.client import default_optimizer
from fedpeft_pl.data import Digits
from fedpeft_pl.peft import load_trainable_state, trainable_parameters, trainable_state
from fedpeft_pl.runners.vectorized import ClientJob, train_clients

METHODS = ["head", "bias", "adapter", "prompt", "lora", "full"]
CONFIGS = ["1x256", "8x32", "32x8", "128x8"]


def backbone(model: str) -> Backbone:
    if model == "vit-b16":
        return Backbone("vit_base_patch16_224")  # ViT-B/16 at 224 px, random weights
    return quickstart_backbone()


@functools.lru_cache(maxsize=2)
def transformed_digits(model: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split pre-transformed to the model's input size, once per process."""
    module = FedPEFTModule(10, backbone(model), peft_method("head"))
    dm = FederatedDataModule(Digits(), num_clients=8, batch_size=32)
    dm.data_config = module.data_config
    dm.setup()
    train = dm.splits.train
    images, labels = zip(*(train[i][:2] for i in range(len(train))))
    return torch.stack(images).to(device), torch.as_tensor(labels).to(device)


def build(method: str, clients: int, batch: int, steps: int, model: str = "tiny", device: str = "cpu"):
    torch.manual_seed(0)
    module = FedPEFTModule(10, backbone(model), peft_method(method)).to(device)
    dm = FederatedDataModule(Digits(), num_clients=clients, batch_size=batch)
    dm.data_config = module.data_config
    dm.setup()
    images, labels = transformed_digits(model, device)
    dm.splits.train = TensorDataset(images, labels)
    rng = np.random.default_rng(0)
    # the centralised reference of 128 x 8 wants 2 x 1024 images of the 1,437 digits: some drawn twice
    repeat = steps * batch > len(images)
    dm.client_indices = [rng.choice(len(images), steps * batch, replace=repeat) for _ in range(clients)]
    jobs = [ClientJob(c, seed=1000 + c, max_batches=10**9, start=trainable_state(module)) for c in range(clients)]
    return module, dm, jobs


def autocast_of(precision: str, device: str):
    if precision == "bf16":
        return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return None


def sequential(module, dm, jobs, autocast=None):
    states = []
    module.train()
    images, labels = dm.splits.train.tensors
    for job in jobs:
        load_trainable_state(module, job.start)
        optimizer = default_optimizer(trainable_parameters(module).values())
        for batch in dm.client_batches(job.client, job.seed, 1, job.max_batches):
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = module(images[batch])
            loss = F.cross_entropy(logits.float(), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        states.append(trainable_state(module))
    load_trainable_state(module, jobs[0].start)
    return states


def vectorised(module, dm, jobs, autocast=None, max_parallel=None, path="stacked"):
    outcomes = train_clients(
        module,
        dm,
        jobs,
        1,
        default_optimizer,
        autocast=autocast,
        max_parallel_clients=max_parallel,
        stacked=path == "stacked",
    )
    return [o.state for o in outcomes]


def synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    synchronise()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronise()
    return time.perf_counter() - start, out


def cuda_growth_mib(fn, *args, **kwargs) -> float:
    """CUDA's peak allocation during ``fn`` above what was allocated before it."""
    synchronise()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(*args, **kwargs)
    synchronise()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_child(method: str, config: str, side: str, steps: int, path: str = "stacked") -> None:
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
    if side == "sequential":
        sequential(module, dm, jobs)
    else:
        vectorised(module, dm, jobs, path=path)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024}))


def memory(method: str, config: str, side: str, steps: int, path: str = "stacked") -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, config, side, "--steps", str(steps), "--path", path],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["tiny", "vit-b16"], default="tiny")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--max-parallel", type=int, default=None, help="vectorised clients at once (chunks)")
    parser.add_argument("--skip", nargs="*", default=[], help="method@config pairs to leave out, e.g. full@128x8")
    parser.add_argument(
        "--max-diff",
        type=float,
        default=None,
        help="exit with status 1 if any state difference exceeds this (a check, e.g. 1e-2 in bf16)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print each side's operators by self time (torch.profiler)"
    )
    parser.add_argument("--path", choices=["stacked", "vmap"], default="stacked", help="the engine's path")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (1 keeps a shared, loaded machine's figures steady)"
    )
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
    if args.child:
        memory_child(*args.child, args.steps, args.path)
        return
    gpu = torch.device(args.device).type == "cuda"
    if gpu:
        print(
            f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, model {args.model}, precision "
            f"{args.precision}, "
            f"max parallel {args.max_parallel}",
            flush=True,
        )
    autocast = autocast_of(args.precision, args.device)
    memory_columns = (
        " training peak seq (1 client) / vec MiB | bound m x seq MiB |"
        if gpu
        else " training peak seq / vec MiB | bound m x seq MiB |"
    )
    print(f"# engine path: {args.path}", flush=True)
    print(
        "| method | m x batch | sequential s (median) | vectorised s (median) | centralised 1 x m*B s (median) "
        "| vectorised vs sequential | vectorised / centralised throughput | max state diff |"
        + (memory_columns if args.memory else "")
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.memory else ""), flush=True)
    failures: list[str] = []
    for config in args.configs:
        clients, batch = map(int, config.split("x"))
        for method in args.methods:
            if f"{method}@{config}" in args.skip:
                continue
            module, dm, jobs = build(method, clients, batch, args.steps, args.model, args.device)
            seq = functools.partial(sequential, autocast=autocast)
            vec = functools.partial(vectorised, autocast=autocast, max_parallel=args.max_parallel, path=args.path)
            # the centralised reference: one client with all m * B images of a step in one batch
            central = build(method, 1, clients * batch, args.steps, args.model, args.device) if clients > 1 else None
            vec(module, dm, jobs[:2])  # warm-up of every side
            seq(module, dm, jobs[:2])
            if central is not None:
                seq(*central)
            seq_times, vec_times, central_times, diff = [], [], [], 0.0
            for _ in range(args.repeats):
                t, seq_states = timed(seq, module, dm, jobs)
                seq_times.append(t)
                t, vec_states = timed(vec, module, dm, jobs)
                vec_times.append(t)
                if central is not None:
                    central_times.append(timed(seq, *central)[0])
                diff = max(
                    diff, max(float((a[n] - b[n]).abs().max()) for a, b in zip(seq_states, vec_states) for n in a)
                )
                del seq_states, vec_states
            s, v = statistics.median(seq_times), statistics.median(vec_times)
            c = statistics.median(central_times) if central_times else s
            row = (
                f"| {method} | {clients} x {batch} | {s:.3f} | {v:.3f} | {c:.3f} | {s / v:.2f}x | {c / v:.2f} "
                f"| {diff:.1e} |"
            )
            if args.memory and gpu:
                one, all_ = cuda_growth_mib(seq, module, dm, jobs[:1]), cuda_growth_mib(vec, module, dm, jobs)
                row += f" {one:.0f} / {all_:.0f} | {clients * one:.0f} |"
            elif args.memory:
                ms, mv = (
                    memory(method, config, "sequential", args.steps),
                    memory(method, config, "vectorised", args.steps, args.path),
                )
                # the bound: m clients' worth of what one sequential client needs at its peak
                # (activations, gradients, optimizer state); the backbone is shared and not in either
                row += f" {ms['growth_mib']:.0f} / {mv['growth_mib']:.0f} | {clients * ms['growth_mib']:.0f} |"
            print(row, flush=True)
            if args.max_diff is not None and not diff <= args.max_diff:
                failures.append(f"{method} at {config}: states differ by {diff:.1e} > {args.max_diff:.0e}")
            if args.profile:
                for side, fn in (("sequential", seq), ("vectorised", vec)):
                    with torch.profiler.profile() as prof:
                        fn(module, dm, jobs)
                    print(
                        f"\n{side}, {method}, {config}:\n"
                        + prof.key_averages().table(
                            sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40
                        ),
                        flush=True,
                    )
            del module, dm, jobs, central
            if gpu:
                torch.cuda.empty_cache()
    if failures:
        sys.exit("the two sides disagree: " + "; ".join(failures))


if __name__ == "__main__":
    main()
