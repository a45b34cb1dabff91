"""Local training throughput (images per second, forward + backward + optimizer step) per method.

    python benchmarks/throughput.py                                   # tiny ViT and ViT-B/16, fp32 and bf16 autocast
    python benchmarks/throughput.py --models vit_b16 --precisions fp32
    python benchmarks/throughput.py --models tiny --compile           # also torch.compile
    python benchmarks/throughput.py --device cuda --models vit_b16    # on a GPU

Random weights (throughput does not depend on them). Each figure is the median over ``--steps``
timed steps after ``--warmup`` untimed ones, one client's local step exactly as FedPEFTModule takes
it (cross-entropy, SGD on the trainable tensors). Results go to
benchmarks/results/throughput-<device>-<models>-<precisions>[-compile].md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from workloads import METHOD_NAMES, peft_method, quickstart_backbone

from fedpeft_pl import Backbone, FedPEFTModule
from fedpeft_pl.peft import trainable_parameters

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    # the quickstart's tiny ViT on 32 px digits-sized inputs
    "tiny": (quickstart_backbone, 10, 32),
    # the paper's ViT-B/16 at 224 px, 100 classes
    "vit_b16": (lambda: Backbone("vit_base_patch16_224"), 100, 8),
}


def measure(model: str, method: str, device: str, bf16: bool, compile_: bool, steps: int, warmup: int) -> float:
    backbone, classes, batch = MODELS[model]
    torch.manual_seed(0)
    # LoRA at rank 8, the paper configs' setting, on both models
    module = FedPEFTModule(classes, backbone(), peft_method(method, lora_rank=8)).to(device).train()
    size = module.data_config["input_size"]
    images = torch.randn(batch, *size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    optimizer = torch.optim.SGD(trainable_parameters(module).values(), lr=0.01, momentum=0.9)
    forward = torch.compile(module) if compile_ else module
    seconds = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=METHOD_NAMES, choices=METHOD_NAMES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16"],
        help="bf16 means fp32 weights under bf16 autocast",
    )
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (fp32)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    variants = [
        (name, bf16, False)
        for name, bf16 in (("fp32", False), ("bf16 autocast", True))
        if name.split()[0] in args.precisions
    ]
    variants += [("fp32 + compile", False, True)] if args.compile else []
    machine = (
        (torch.cuda.get_device_name() + " (GPU)")
        if args.device == "cuda"
        else f"{os.cpu_count()} CPU cores ({platform.machine()})"
    )
    lines = [
        f"Images per second, forward + backward + SGD step, median of {args.steps} steps after {args.warmup} warm-up; "
        "batch 32 (tiny, 32 px) or 8 (ViT-B/16, 224 px).",
        "",
        f"Command: `python benchmarks/throughput.py --device {args.device} --models {' '.join(args.models)} "
        f"--precisions {' '.join(args.precisions)}{' --compile' if args.compile else ''} --steps {args.steps} "
        f"--warmup {args.warmup}`  ",
        f"Machine: {machine}, torch {torch.__version__}, timm {timm.__version__}",
        "",
        "| model | method | " + " | ".join(v[0] for v in variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for model in args.models:
        for method in args.methods:
            figures = [
                measure(model, method, args.device, bf16, compile_, args.steps, args.warmup)
                for _, bf16, compile_ in variants
            ]
            lines.append(f"| {model} | {method} | " + " | ".join(f"{f:,.1f}" for f in figures) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    (
        REPO
        / "benchmarks"
        / "results"
        / (
            f"throughput-{args.device}-{'-'.join(args.models)}-{'-'.join(args.precisions)}"
            f"{'-compile' if args.compile else ''}.md"
        )
    ).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
