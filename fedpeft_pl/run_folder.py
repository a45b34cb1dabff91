"""The run folder: checkpoints named by round, checkpoint files checked before anything is written,
and no folder left behind by a run that fails before its first round ends.

Example::

    checkpoint = check_checkpoint_file("runs/quickstart/prompt/version_0/checkpoints/last.ckpt")
    check_resume(module, checkpoint)   # ConfigError if this module cannot continue that run
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft import trainable_parameters

log = logging.getLogger(__name__)

SAVED_AT = "fedpeft_saved_at"  # the checkpoint key of the time it was written (time.time())


class RoundCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with files named by round (``round=30.ckpt``) plus ``last.ckpt``.

    A round is one Lightning epoch, so the round number is the epoch's plus one; ``{round}`` may
    be used in ``filename`` like any logged metric.

    Args:
        filename: the file name pattern; ``{round}`` by default.
        **kwargs: any other ``ModelCheckpoint`` argument.

    Example::

        FederatedTrainer(callbacks=[RoundCheckpoint(every_n_epochs=10)])   # round=10.ckpt, round=20.ckpt, ...
    """

    def __init__(self, filename: str = "{round}", **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("save_on_train_epoch_end", True)
        super().__init__(filename=filename, **kwargs)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> Any:
        # when the checkpoint was written: a resume drops what the loggers got after it
        # (forget_rounds_logged_after), whatever becomes of the file's own time (a copy, a move)
        checkpoint[SAVED_AT] = time.time()
        return super().on_save_checkpoint(trainer, pl_module, checkpoint)

    @override
    def format_checkpoint_name(
        self, metrics: dict[str, Any], filename: Optional[str] = None, ver: Optional[int] = None, **kwargs: Any
    ) -> str:
        if "epoch" in metrics and "round" not in metrics:
            metrics = {**metrics, "round": int(metrics["epoch"]) + 1}
        return super().format_checkpoint_name(metrics, filename, ver, **kwargs)


def check_checkpoint_file(path: str) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded tensors-only; a ConfigError if it is no fedpeft checkpoint.

    Never loads with ``weights_only=False``: a checkpoint may come from anywhere, and unpickling
    arbitrary objects runs arbitrary code.
    """
    if os.path.isdir(path):
        raise ConfigError(
            f"ckpt_path {path!r} is a directory; give a .ckpt file in it, e.g. {os.path.join(path, 'last.ckpt')!r}, "
            "or 'last' for this configuration's newest"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"ckpt_path {path!r} does not exist; give a checkpoint file, or 'last' for this run's newest")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # random bytes, a truncated file and foreign pickles raise many types
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        if "weights_only" in reason.lower().replace(" ", "_"):
            # torch's text goes on to advise loading with weights_only=False: unsafe for a file of unknown origin
            reason = "it holds objects other than tensors and plain data"
        raise ConfigError(
            f"ckpt_path {path!r} is not a readable checkpoint ({type(err).__name__}: {reason}); it may be truncated "
            "or not a checkpoint at all; give a .ckpt file that fedpeft fit wrote (<run folder>/checkpoints/last.ckpt)"
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("backbone"), dict)
        or "state_dict" not in checkpoint
    ):
        raise ConfigError(
            f"ckpt_path {path!r} is not a fedpeft checkpoint (it names no backbone; a plain state dict or another "
            "program's file?); give a .ckpt file that fedpeft fit wrote, or load plain weights with "
            "model.backbone.weights_file"
        )
    return checkpoint


def check_resume(model: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse, before anything is written, a checkpoint that ``model`` cannot continue from."""
    if hasattr(model, "on_load_checkpoint"):
        model.on_load_checkpoint(checkpoint)  # fedpeft's own checks: backbone fingerprint, missing tensors
    trainable = {k: v.shape for k, v in trainable_parameters(model).items()}
    saved = checkpoint["state_dict"]
    extra = sorted(saved.keys() - trainable.keys())
    wrong = sorted(k for k in saved.keys() & trainable.keys() if tuple(saved[k].shape) != tuple(trainable[k]))
    if extra or wrong:
        example = extra[0] if extra else f"{wrong[0]} {tuple(saved[wrong[0]].shape)} vs {tuple(trainable[wrong[0]])}"
        raise ConfigError(
            f"the checkpoint's trainable tensors do not match this model's {getattr(model, 'peft', '')!r} "
            f"({len(extra)} unknown, {len(wrong)} of another shape, e.g. {example}); resume with the configuration "
            "that wrote it"
        )


def check_server_resume(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Refuse, before anything is written, a checkpoint whose server side this run cannot continue:
    another strategy or codec (each callback's ``check_resume``), or local DP switched on or off."""
    saved = checkpoint.get("callbacks", {})
    for callback in trainer.callbacks:
        key = getattr(callback, "state_key", None)
        if hasattr(callback, "check_resume") and key in saved:
            callback.check_resume(saved[key])
    privacy = getattr(trainer, "privacy", None)
    is_private = privacy is not None
    was_private = any(str(key).startswith("LocalDP") for key in saved) or (is_private and privacy.state_key in saved)
    if was_private != is_private:
        written, now = ("with", "without") if was_private else ("without", "with")
        raise ConfigError(
            f"the checkpoint was written {written} local DP (trainer.privacy), this run is {now} it; "
            "resume with the configuration that wrote it (its run folder's config.yaml)"
        )


@contextlib.contextmanager
def removed_if_failed_early(trainer: pl.Trainer) -> Iterator[None]:
    """Remove the log folders this fit creates if it fails before its first round ends.

    A failed start would otherwise leave an empty ``version_N`` that TensorBoard and
    :mod:`fedpeft_pl.analysis` list among the runs. Folders that existed before (a resumed
    run's) are never touched.
    """
    new = [Path(d) for d in {getattr(lg, "log_dir", None) for lg in trainer.loggers} if d and not os.path.exists(d)]
    try:
        yield
    except BaseException:
        if trainer.current_epoch == 0 and trainer.is_global_zero:
            for folder in new:
                shutil.rmtree(folder, ignore_errors=True)
        raise


def tensorboard_like(logger: TensorBoardLogger, version: Any, **kwargs: Any) -> TensorBoardLogger:
    """A TensorBoard logger with ``logger``'s settings (folder, name, prefix, hp metric, graph, writer options)
    that writes into ``version``. Lightning has no public way to read the last three; they are read, never
    written."""
    return TensorBoardLogger(
        save_dir=logger.save_dir,
        name=logger.name,
        version=version,
        log_graph=getattr(logger, "_log_graph", False),
        default_hp_metric=getattr(logger, "_default_hp_metric", True),
        prefix=getattr(logger, "_prefix", ""),
        sub_dir=logger.sub_dir,
        **{**getattr(logger, "_kwargs", {}), **kwargs},
    )


def forget_rounds_logged_after(
    trainer: pl.Trainer, checkpoint: dict[str, Any], saved_at: float
) -> Optional[TensorBoardLogger]:
    """Before a resumed run logs into its old TensorBoard folder: drop the rounds logged there after ``checkpoint``.

    A run that died after logging a round but before writing that round's checkpoint (Lightning
    saves after the loggers have the round) has that round in its log already; the resumed run
    trains it again and would log it a second time. Here the logger is replaced by one whose
    SummaryWriter starts with ``purge_step`` at the first round after the checkpoint, which tells
    TensorBoard's reader (and :mod:`fedpeft_pl.analysis`, which reads with it) to drop every event
    the folder holds from that step on, whatever its tag. Events whose step is not a round (the
    accuracy stepped by cumulative bytes, a callback's per-step values) that were written before
    the checkpoint (the time :class:`RoundCheckpoint` wrote into it, or else ``saved_at``, its
    file's time) are written again behind the purge, with their own times. Returns the new
    logger (the caller puts it in place of the old one), or None when nothing was logged after
    the checkpoint (the usual case: the run died mid-round).
    """
    logger = trainer.logger
    if not trainer.is_global_zero or not isinstance(logger, TensorBoardLogger) or not os.path.isdir(logger.log_dir):
        return None
    folder = Path(logger.log_dir)
    if not any(folder.glob("events.out.tfevents.*")):
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = int(checkpoint.get("epoch", -1)) + 1  # the rounds the checkpoint holds
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    logged = [e.step for tag in tags if tag.startswith("round/") for e in events.Scalars(tag)]
    if not logged or max(logged) <= done:
        return None
    saved_at = float(checkpoint.get(SAVED_AT, saved_at))
    fresh = tensorboard_like(logger, logger.version, purge_step=done + 1)
    for tag in tags:
        for event in events.Scalars(tag):
            if event.step > done and event.wall_time <= saved_at:
                fresh.experiment.add_scalar(tag, event.value, event.step, walltime=event.wall_time)
    fresh.experiment.flush()
    log.info(
        f"round(s) {done + 1} to {max(logged)} were logged after the checkpoint of round {done} was written; "
        "TensorBoard drops them and this run logs them again"
    )
    return fresh
