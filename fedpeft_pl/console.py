"""What a run says on the console besides its round lines: the method and what it sends, at the
start, and a closing summary with the next commands to run."""

from __future__ import annotations

import logging
import os
import shlex
import time
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from typing_extensions import override

from fedpeft_pl.clock import format_seconds
from fedpeft_pl.comm import MIB
from fedpeft_pl.federation import Federation
from fedpeft_pl.hooks import FederatedCallback
from fedpeft_pl.schedules import Schedule

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
        server = getattr(getattr(trainer, "aggregation", None), "server", None)
        schedule = getattr(server, "schedule", None) or Schedule()
        shape = schedule.describe(federation.num_clients, federation.clients_per_round, federation.num_rounds)
        log.info(
            f"method: {method!r} trains {count:,} of {total:,} parameters ({100 * count / max(total, 1):.2f}%); "
            f"{exchange} | {shape}, {runner} client runner"
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._started is None or trainer.current_epoch == 0:
            return
        log.info("\n".join(summary_lines(trainer, time.perf_counter() - self._started)))


def summary_lines(trainer: pl.Trainer, seconds: float) -> list[str]:
    """The closing summary of a fit: results, run folder, and the commands that come next, as fit the run's
    loggers: TensorBoard's viewer for a TensorBoard logger, ``fedpeft report`` for the loggers it reads (TensorBoard,
    CSVLogger), and where the logs are for any other logger."""
    server = getattr(trainer, "aggregation", None)
    accuracy = trainer.callback_metrics.get("server/acc")
    sent = getattr(server, "cumulative_bytes", 0) / MIB
    rounds = trainer.current_epoch
    lines = [
        f"done: {rounds} rounds, {sent:.3f} MiB sent, in {seconds:.1f} s; final server accuracy "
        + (f"{float(accuracy):.4f}" if accuracy is not None else "not evaluated")
    ]
    state = getattr(server, "server", None)
    if state is not None and state.clock is not None:
        simulated = state.simulated_seconds
        shown = format_seconds(simulated)
        exact = "" if shown == f"{simulated:.1f} s" else f" ({simulated:.1f} s)"
        lines.append(f"simulated time: {shown}{exact} on {state.clock!r}")
    if not trainer.loggers:
        return lines
    # the first logger's folder, as trainer.log_dir finds it; trainer.log_dir itself is a collective
    # under DDP, which only rank 0 reaches here
    first = trainer.loggers[0]
    run_dir: Any = getattr(first, "log_dir", None)
    if run_dir:
        lines.append(f"run folder: {run_dir}")
    commands = []
    reported = False
    for logger in trainer.loggers:
        if isinstance(logger, (TensorBoardLogger, CSVLogger)):
            # <save_dir>, above <name>/version_<n>: this run and the runs beside it (other methods, versions)
            root = shlex.quote(logger.save_dir)
            if isinstance(logger, TensorBoardLogger):
                commands.append(f"  tensorboard --logdir {root}   # the curves")
            if not reported:  # one report: a second logger of the same run logs the same figures
                commands.append(f"  fedpeft report {root} --output report   # compare its runs: a table and figures")
                reported = True
        else:
            lines.append(f"logs: {where_logged(logger)}")
    # where LightningCLI wrote the run's configuration: trainer.log_dir
    config_dir = run_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
    config = os.path.join(config_dir or trainer.default_root_dir, "config.yaml")
    checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "")
    if os.path.isfile(config) and checkpoint:
        # 'last' finds the newest last.ckpt under a TensorBoard or CSV logger's folder; any other logger's
        # checkpoint is named by its path
        ckpt = "last" if isinstance(first, (TensorBoardLogger, CSVLogger)) else shlex.quote(checkpoint)
        commands.append(
            f"  fedpeft export --config {shlex.quote(config)} --ckpt_path {ckpt} --output model.safetensors   # the "
            "model"
        )
    if commands:
        lines += ["next:", *commands]
    return lines


def where_logged(logger: Logger) -> str:
    """A logger that ``fedpeft report`` does not read, and where its logs are: its class, name, version and
    folder, as far as it has them (an MLflow or Weights & Biases server's logs have no local folder)."""
    parts = [
        f"{key} {value}"
        for key, value in (("name", logger.name), ("version", logger.version))
        if value not in (None, "")
    ]
    folder = getattr(logger, "log_dir", None) or logger.save_dir
    return type(logger).__name__ + (f" ({', '.join(parts)})" if parts else "") + (f" in {folder}" if folder else "")
