"""Can ``torch.compile`` speed up the vectorised engine's stacked step? A probe, not a feature.

    OMP_NUM_THREADS=1 python benchmarks/compile_probe.py --method lora --scope step
    OMP_NUM_THREADS=1 python benchmarks/compile_probe.py --method bias --scope model

The same work as ``benchmarks/vectorized.py`` (the quickstart's tiny ViT, m clients x B samples,
2 local steps, one thread). The engine's ``stacked_forward`` is swapped for a compiled one:

- ``--scope step``: the whole stacked forward, installing each module's stacked forward included;
- ``--scope model``: the model alone, the stacked forwards installed around it, as they are now.

It reports the first call (compilation included), then medians of 3 alternating eager and compiled
rounds of the same clients, and the largest difference of their per-client states. With
``TORCH_LOGS=graph_breaks,recompiles`` torch says why a compiled call fell back or compiled again.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vectorized as bench

import fedpeft_pl.runners.vectorized as engine
from fedpeft_pl.runners.stacked import installed


def compiled_forward(scope: str):
    eager = engine.stacked_forward
    cache: dict[int, object] = {}  # one compiled function per model, across rounds

    def make(model, forwards):
        if scope == "step":
            if id(model) not in cache:
                cache[id(model)] = torch.compile(eager(model, forwards), dynamic=False)
            return cache[id(model)]
        if id(model) not in cache:
            cache[id(model)] = torch.compile(model, dynamic=False)
        compiled = cache[id(model)]

        def forward(params, images):
            with installed(model, forwards, params):
                logits = compiled(images.flatten(0, 1))
            return logits.unflatten(0, (images.shape[0], images.shape[1]))

        return forward

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--config", default="32x8")
    parser.add_argument("--scope", choices=["step", "model"], default="step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clients, batch = (int(x) for x in args.config.split("x"))
    module, dm, jobs = bench.build(args.method, clients, batch, 2)
    eager, compiled = engine.stacked_forward, compiled_forward(args.scope)

    def run(use_compiled: bool):
        engine.stacked_forward = compiled if use_compiled else eager
        try:
            start = time.perf_counter()
            states = bench.vectorised(module, dm, jobs)
            return time.perf_counter() - start, states
        finally:
            engine.stacked_forward = eager

    _, reference = run(False)
    first_compiled, _ = run(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for side in (False, True):
            seconds, states = run(side)
            times[side].append(seconds)
    diff = max((a[n] - b[n]).abs().max().item() for a, b in zip(reference, states) for n in a)
    e, c = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"| {args.method} | {args.config} | {args.scope} | {first_compiled:.1f} | {e:.3f} | {c:.3f} | {e / c:.2f}x "
        f"| {diff:.1e} |"
    )


if __name__ == "__main__":
    main()
