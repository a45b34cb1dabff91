"""Which client runner trains a run, and why: the one place where ``trainer.client_runner`` is decided.

:class:`RunnerChoice` is the decision: what the setting means on this hardware
(:func:`choose_client_runner`), what a runner given to ``use_runner`` is called, the switch to the
vectorised runner for Head on cached features, and why a vectorised run's rounds go to the
sequential runner (:meth:`RunnerChoice.reason_not_to_vectorise`). The trainer makes it, the loop
builds the runner it names and switches it under the feature cache, the vectorised runner asks it
before each round, and the console and ``fedpeft comm`` describe it; none of them decides again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional, Protocol, Union

import torch

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.runners.optim import check_optimizer
from fedpeft_pl.runners.stacked import engine_path

__all__ = [
    "RunFacts",
    "RunnerChoice",
    "StepSettings",
    "autocast_for",
    "choose_client_runner",
    "lightning_step_customised",
]

SETTINGS = ("auto", "sequential", "vectorized")


def choose_client_runner(setting: str, device_type: str, world_size: int) -> tuple[str, str]:
    """The runner a ``trainer.client_runner`` setting means on this hardware, and why.

    ``auto`` chooses the vectorised runner on CUDA, where on one device it trained a round 2.6x to
    3.2x faster end to end (the quickstart, bf16) and 3.5x to 5.4x faster at 32 or 128 clients of
    batch 8 (ViT-B/16). Under DDP each process trains its share of the round's clients, stacked,
    on its own device: the same per-device work as one device's run of that share. In one CPU
    process its stacked path trains a round's clients faster than the sequential runner (1.2x to
    1.6x at 32 clients of batch 8, 1.1x to 1.4x at 128; 0.93x to 1.10x at 8 clients of batch 32,
    where one big batch is no faster on a CPU either); what takes its vmap path there (Full, local DP) goes to the
    sequential runner (:meth:`RunnerChoice.reason_not_to_vectorise`). Across CPU processes the
    loop still switches to it for Head on cached features (3.5x there on a CPU). See
    benchmarks/README.md, "Vectorised clients".
    """
    if setting not in SETTINGS:
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


class StepSettings(Protocol):
    """What Lightning's loop does around a local step that the engine does not: the run's callbacks, gradient
    clipping and accumulation (a :class:`~fedpeft_pl.runners.base.RunnerContext` has them, and so has a trainer)."""

    @property
    def callbacks(self) -> Sequence[Any]: ...

    @property
    def gradient_clip_val(self) -> Optional[Union[int, float]]: ...

    @property
    def accumulate_grad_batches(self) -> int: ...


class RunFacts(StepSettings, Protocol):
    """What the runner choice needs to know of a run besides its module: its device, its precision and
    whether a privacy mechanism acts on the clients' steps (a :class:`~fedpeft_pl.runners.base.RunnerContext`)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def precision(self) -> str: ...

    @property
    def clients_train_privately(self) -> bool: ...


# what Lightning's loop calls around each local step, and the engine does not
_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)


def lightning_step_customised(settings: StepSettings, module: Any) -> Optional[str]:
    """Why a run's local steps need Lightning's own loop (the sequential runner), or None.

    The engine computes each client's loss and step itself, so a ``training_step`` or per-step
    hook of a module subclass, a user callback's per-step hook, gradient clipping, gradient
    accumulation and an optimizer that is not elementwise would be skipped or wrong there.
    """
    # a FedPEFTModule exists only where its module was imported (fedpeft comm sizes a PEFTModel, without Lightning)
    client = sys.modules.get("fedpeft_pl.client")
    if client is not None and isinstance(module, client.FedPEFTModule):
        for name in ("training_step", "optimizer_step", "configure_gradient_clipping", *_BATCH_HOOKS):
            if getattr(type(module), name) is not getattr(client.FedPEFTModule, name):
                return f"{type(module).__name__} overrides {name}, which only Lightning's loop calls"
    for callback in settings.callbacks:
        if type(callback).__module__.startswith("fedpeft_pl."):
            continue  # fedpeft's own callbacks know the engine
        from lightning.pytorch.callbacks import Callback

        for name in _BATCH_HOOKS:
            if getattr(type(callback), name, None) is not getattr(Callback, name):
                return f"callback {type(callback).__name__} has {name}, which only Lightning's loop calls"
    if settings.gradient_clip_val:
        return "gradient clipping (trainer.gradient_clip_val) runs in Lightning's loop"
    if settings.accumulate_grad_batches != 1:
        return "gradient accumulation (trainer.accumulate_grad_batches) runs in Lightning's loop"
    factory = getattr(module, "optimizer_factory", None)
    if factory is not None:
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
        try:
            check_optimizer(optimizer)
        except ConfigError:
            return f"the optimizer {type(optimizer).__name__} is not elementwise"
    return None


Autocast = Optional[Callable[[], Any]]


def autocast_for(precision: str, device_type: str) -> Union[Autocast, bool]:
    """The autocast context factory for a run's precision on ``device_type``; None for 32-bit, False where the
    engine cannot train at that precision."""
    if precision in ("32-true", "32"):
        return None
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    return False  # 16-mixed needs a gradient scaler, which the engine does not run; 64-bit and others


@dataclass(frozen=True)
class RunnerChoice:
    """Which runner trains a run's clients, and why: ``trainer.client_runner`` decided once.

    Args:
        setting: the setting as given: ``auto``, ``sequential`` or ``vectorized``, or the name of a
            runner given to ``use_runner``.
        runner: the runner it means here: ``sequential``, ``vectorized`` or a given runner's name.
        reason: why, as the console says it.
        max_parallel_clients: with the vectorised runner, at most this many clients at once.

    Example::

        choice = RunnerChoice.configured("auto", "cpu", world_size=1)
        assert choice.runner == "vectorized"
    """

    setting: str
    runner: str
    reason: str
    max_parallel_clients: Optional[int] = None

    @classmethod
    def configured(
        cls, setting: str, device_type: str, world_size: int, max_parallel_clients: Optional[int] = None
    ) -> RunnerChoice:
        """What the trainer's ``client_runner`` and ``max_parallel_clients`` mean on this hardware."""
        if setting == "sequential" and max_parallel_clients is not None:
            raise ConfigError(
                "trainer.max_parallel_clients applies to the vectorised runner; set trainer.client_runner: vectorized"
            )
        if max_parallel_clients is not None and max_parallel_clients < 1:
            raise ConfigError(f"trainer.max_parallel_clients must be >= 1, got {max_parallel_clients}")
        runner, reason = choose_client_runner(setting, device_type, world_size)
        return cls(setting, runner, reason, max_parallel_clients)

    @classmethod
    def given(cls, runner: object) -> RunnerChoice:
        """A runner handed to ``trainer.use_runner`` (e.g. a Flower runner): named after its class."""
        name = type(runner).__name__.removesuffix("Runner").lower() or "custom"
        return cls(name, name, "given to use_runner")

    def with_cached_features(self) -> Optional[RunnerChoice]:
        """Where ``auto`` chose the sequential runner: the vectorised one for Head on cached features, whose clients'
        steps are one matrix product each (3.5x the sequential runner's speed on the quickstart,
        benchmarks/README.md); None where the choice stands."""
        if self.setting == "auto" and self.runner == "sequential":
            return replace(self, runner="vectorized", reason="auto: Head on cached features")
        return None

    def engine_path(self, run: RunFacts, module: Any) -> tuple[str, str]:
        """How the engine trains ``module``'s clients (``stacked``, ``vmap`` or ``batched head``), and why."""
        # a privacy mechanism that acts on the clients' steps (local DP) takes the engine's vmap path
        private = getattr(module, "privacy", None) is not None or run.clients_train_privately
        return engine_path(module, private=private, features=bool(getattr(module, "takes_features", False)))

    def reason_not_to_vectorise(self, run: RunFacts, module: Any) -> Optional[str]:
        """Why the vectorised runner hands ``module``'s rounds to the sequential runner, or None."""
        if getattr(module, "local_first_epochs", 0):
            return "FedRep's two-phase schedule trains on the sequential runner"
        if getattr(getattr(module, "peft", None), "per_client_views", False):
            return "heterogeneous LoRA ranks and FLoRA's stacking train on the sequential runner"
        if autocast_for(run.precision, run.device.type) is False:
            return f"precision {run.precision!r} trains on the sequential runner"
        if self.setting == "auto" and run.device.type == "cpu":
            path, why = self.engine_path(run, module)
            if path == "vmap":  # end to end on the quickstart Full ran at 0.80x there (benchmarks/README.md)
                return f"auto: on CPUs only the stacked path is measured faster, and {why}"
        return lightning_step_customised(run, module)

    def describe(self, run: RunFacts, module: Any, vectorising: bool) -> tuple[str, str]:
        """Which runner trains ``module``'s clients and why, e.g. ``("sequential", "auto: ...")``; with the
        vectorised runner (``vectorising``), a run it hands to the sequential one says so, and otherwise which
        path of the engine trains and why."""
        if vectorising:
            reason = self.reason_not_to_vectorise(run, module)
            if reason is not None:
                return "sequential", reason
            path, why = self.engine_path(run, module)
            return self.runner, f"{self.reason}; {path} path: {why}"
        return self.runner, self.reason
