"""What a run says on the console besides its round lines: the method and what it sends, at the
start, and a closing summary with the next commands to run."""

from __future__ import annotations

import logging
import os
import shlex
import time
from typing import Any, Optional

import lightning.pytorch as pl
from typing_extensions import override

from fedpeft_pl.comm import MIB
from fedpeft_pl.federation import Federation
from fedpeft_pl.hooks import FederatedCallback

log = logging.getLogger("fedpeft_pl.console")


class RunSummary(FederatedCallback):
    """Logs the method and what each client sends before round 1, and a summary after the last round:
    final server accuracy, MiB sent, wall time, the run folder and the commands to look at it.

    Added to every :class:`~fedpeft_pl.trainer.FederatedTrainer`; its lines go to the
    ``fedpeft_pl`` logger (the ``fedpeft`` command prints them on stderr).

    Example::

        FederatedTrainer(callbacks=[RunSummary()])   # given explicitly, no second one is added
    """

    def __init__(self) -> None:
        self._started: Optional[float] = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._started = time.perf_counter()  # wall time counts the data and model set-up too

    @override
    def on_federation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, federation: Federation) -> None:
        if not trainer.is_global_zero:
            return
        params = dict(pl_module.named_parameters())
        local = frozenset(getattr(pl_module, "local_names", ()))  # a personalised method's part that stays
        trained = {n: p for n, p in params.items() if p.requires_grad}
        total = sum(p.numel() for p in params.values())
        count = sum(p.numel() for p in trained.values())
        size = sum(p.numel() * p.element_size() for n, p in trained.items() if n not in local)
        method = getattr(pl_module, "peft", type(pl_module).__name__)
        describe = getattr(trainer, "describe_client_runner", None)
        runner = "{} ({})".format(*describe(pl_module)) if describe is not None else "sequential"
        exchange = f"each sampled client receives and sends {size / 1024:,.1f} KiB of them a round (before any codec)"
        if getattr(method, "per_client_views", False):
            exchange = f"each sampled client exchanges at most {size / 1024:,.1f} KiB of them a round, at its own rank"
        log.info(
            f"method: {method!r} trains {count:,} of {total:,} parameters ({100 * count / max(total, 1):.2f}%); "
            f"{exchange} | "
            f"{federation.clients_per_round} of {federation.num_clients} clients a round, {federation.num_rounds} "
            "rounds, "
            f"{runner} client runner"
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._started is None or trainer.current_epoch == 0:
            return
        log.info("\n".join(summary_lines(trainer, time.perf_counter() - self._started)))


def summary_lines(trainer: pl.Trainer, seconds: float) -> list[str]:
    """The closing summary of a fit: results, run folder, and the commands that come next."""
    server = getattr(trainer, "aggregation", None)
    accuracy = trainer.callback_metrics.get("server/acc")
    sent = getattr(server, "cumulative_bytes", 0) / MIB
    rounds = trainer.current_epoch
    lines = [
        f"done: {rounds} rounds, {sent:.3f} MiB sent, in {seconds:.1f} s; final server accuracy "
        + (f"{float(accuracy):.4f}" if accuracy is not None else "not evaluated")
    ]
    # the first logger's folder, as trainer.log_dir finds it; trainer.log_dir itself is a collective
    # under DDP, which only rank 0 reaches here
    run_dir: Any = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
    if run_dir:
        lines.append(f"run folder: {run_dir}")
        logger_root = os.path.dirname(os.path.dirname(os.path.normpath(run_dir)))
        config = os.path.join(run_dir, "config.yaml")
        lines += [
            "next:",
            f"  tensorboard --logdir {shlex.quote(logger_root)}   # the curves",
            f"  fedpeft report {shlex.quote(logger_root)} --output report   # compare its runs: a table and figures",
            f"  fedpeft export --config {shlex.quote(config)} --ckpt_path last --output model.safetensors   # the "
            "model",
        ]
    return lines
