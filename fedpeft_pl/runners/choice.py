"""Which client runner trains a run, and why: ``trainer.client_runner`` on this hardware."""

from __future__ import annotations

from typing import Any, Optional

import torch

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.runners.optim import check_optimizer

__all__ = ["autocast_for", "choose_client_runner", "lightning_step_customised"]


def choose_client_runner(setting: str, device_type: str, world_size: int) -> tuple[str, str]:
    """The runner a ``trainer.client_runner`` setting means on this hardware, and why.

    ``auto`` chooses the vectorised runner on CUDA, where on one device it trained a round 2.6x to
    3.2x faster end to end (the quickstart, bf16) and 3.5x to 5.4x faster at 32 or 128 clients of
    batch 8 (ViT-B/16). Under DDP each process trains its share of the round's clients, stacked,
    on its own device: the same per-device work as one device's run of that share. In one CPU
    process its stacked path trains a round's clients faster than the sequential runner (1.2x to
    1.6x at 32 clients of batch 8, 1.1x to 1.4x at 128; 0.93x to 1.10x at 8 clients of batch 32,
    where one big batch is no faster on a CPU either); what takes its vmap path there (Full, local DP) goes to the
    sequential runner (:meth:`VectorizedRunner.reason_not_to_vectorise`). Across CPU processes the
    loop still switches to it for Head on cached features (3.5x there on a CPU). See
    benchmarks/README.md, "Vectorised clients".
    """
    if setting not in ("auto", "sequential", "vectorized"):
        raise ConfigError(f"trainer.client_runner must be 'auto', 'sequential' or 'vectorized', got {setting!r}")
    if setting != "auto":
        return setting, "set in the config"
    if device_type == "cuda" and world_size == 1:
        return "vectorized", "auto: one CUDA device"
    if device_type == "cuda":
        return "vectorized", f"auto: {world_size} CUDA processes, each trains its share of the round's clients at once"
    if device_type == "cpu" and world_size == 1:
        return "vectorized", "auto: one CPU process, where the stacked engine trains a round faster"
    return (
        "sequential",
        f"auto: {world_size} {device_type} process(es), where the vectorised runner is not measured faster, "
        "but for Head on cached features",
    )


# what Lightning's loop calls around each local step, and the engine does not
_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)


def lightning_step_customised(trainer: Any, module: Any) -> Optional[str]:
    """Why a run's local steps need Lightning's own loop (the sequential runner), or None.

    The engine computes each client's loss and step itself, so a ``training_step`` or per-step
    hook of a module subclass, a user callback's per-step hook, gradient clipping, gradient
    accumulation and an optimizer that is not elementwise would be skipped or wrong there.
    """
    from lightning.pytorch.callbacks import Callback

    from fedpeft_pl.client import FedPEFTModule

    if isinstance(module, FedPEFTModule):
        for name in ("training_step", "optimizer_step", "configure_gradient_clipping", *_BATCH_HOOKS):
            if getattr(type(module), name) is not getattr(FedPEFTModule, name):
                return f"{type(module).__name__} overrides {name}, which only Lightning's loop calls"
    for callback in trainer.callbacks:
        if type(callback).__module__.startswith("fedpeft_pl."):
            continue  # fedpeft's own callbacks know the engine
        for name in _BATCH_HOOKS:
            if getattr(type(callback), name, None) is not getattr(Callback, name):
                return f"callback {type(callback).__name__} has {name}, which only Lightning's loop calls"
    if trainer.gradient_clip_val:
        return "gradient clipping (trainer.gradient_clip_val) runs in Lightning's loop"
    if trainer.accumulate_grad_batches != 1:
        return "gradient accumulation (trainer.accumulate_grad_batches) runs in Lightning's loop"
    factory = getattr(module, "optimizer_factory", None)
    if factory is not None:
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
        try:
            check_optimizer(optimizer)
        except ConfigError:
            return f"the optimizer {type(optimizer).__name__} is not elementwise"
    return None


def autocast_for(trainer: Any) -> Any:
    """The autocast context factory for the trainer's precision; None for 32-bit, False where unsupported."""
    precision = str(trainer.precision)
    device_type = trainer.strategy.root_device.type
    if precision in ("32-true", "32"):
        return None
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    return False  # 16-mixed needs a gradient scaler, which the engine does not run; 64-bit and others
