"""What the benchmark scripts build: the quickstart's tiny ViT and the six PEFT methods.

One definition, so every benchmark measures the same architecture and method settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

from fedpeft_pl import Backbone
from fedpeft_pl.peft import METHOD_NAMES, Adapter, Bias, Full, Head, LoRA, PEFTMethod, Prompt

__all__ = ["METHOD_NAMES", "live_processes", "peft_method", "quickstart_backbone", "quickstart_fit", "scalars"]

REPO = Path(__file__).resolve().parents[1]


def quickstart_fit(method: str, *overlays: Union[str, Path]) -> list[str]:
    """The arguments of ``fedpeft fit`` for the quickstart with ``method``'s overlay and then ``overlays``."""
    configs = [REPO / "configs" / "quickstart.yaml", REPO / "configs" / "quickstart" / f"{method}.yaml", *overlays]
    return ["fit", *(arg for config in configs for arg in ("--config", str(config)))]


def quickstart_backbone(weights_file: Optional[str] = None) -> Backbone:
    """The quickstart's 4-block ViT on 32 px inputs (embedding 128, patch 8); random weights unless a file is given."""
    return Backbone(
        "vit_tiny_patch16_224",
        weights_file=weights_file,
        img_size=32,
        kwargs={"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4},
    )


def peft_method(name: str, lora_rank: int = 4) -> PEFTMethod:
    """A fresh PEFT method by name: adapters of reduction 8, 10 deep prompt tokens, LoRA with alpha 8."""
    return {
        "head": Head,
        "bias": Bias,
        "adapter": lambda: Adapter(reduction_factor=8),
        "prompt": lambda: Prompt(num_tokens=10, deep=True),
        "lora": lambda: LoRA(rank=lora_rank, alpha=8.0),
        "full": Full,
    }[name]()


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar a run's TensorBoard logger wrote into ``log_dir``, by tag, in the order it was logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def live_processes(pids: Iterable[int]) -> list[Any]:
    """The live processes (``psutil.Process``) of the trees rooted at ``pids``, each once: what a deployment's
    started processes (a SuperLink, SuperNodes, workers) and their descendants are now."""
    import psutil

    found: dict[int, Any] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                found[process.pid] = process
        except psutil.NoSuchProcess:
            continue
    return list(found.values())
