"""FederatedTrainer: a Lightning Trainer whose fit runs federated rounds.

Arguments, default callbacks, fit and resume live here; the round itself is
:class:`~fedpeft_pl.loop.FederatedLoop`. ``comm`` and ``export`` are trainer methods because
LightningCLI dispatches subcommands to them; they call into :mod:`fedpeft_pl.comm` and
:mod:`fedpeft_pl.export`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from fedpeft_pl.aggregation import ServerAggregation
from fedpeft_pl.attacks import Attack
from fedpeft_pl.availability import ClientAvailability
from fedpeft_pl.capabilities import RunParts, check_run
from fedpeft_pl.clock import VirtualClock
from fedpeft_pl.comm import CommReport
from fedpeft_pl.compression import Codec
from fedpeft_pl.console import RunSummary
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.exchange import ClientSession
from fedpeft_pl.export import Exported, export_checkpoint
from fedpeft_pl.federation import ClientRunner, Federation
from fedpeft_pl.hooks import runs_on_client
from fedpeft_pl.loop import FederatedLoop, RoundTrainer, _ClientJob, federated_ddp
from fedpeft_pl.privacy import LocalDP, releases_client_statistics
from fedpeft_pl.progress import FederatedProgressBar
from fedpeft_pl.run_folder import (
    RoundCheckpoint,
    check_checkpoint_file,
    check_resume,
    check_server_resume,
    forget_rounds_logged_after,
    removed_if_failed_early,
    tensorboard_like,
)
from fedpeft_pl.run_plan import EPOCH_LIMITS, NOT_IN_ROUNDS, communication_plan, federation_settings, refuse_in_rounds
from fedpeft_pl.runners import FeatureCache, VectorizedRunner
from fedpeft_pl.runners.choice import RunnerChoice
from fedpeft_pl.runners.device_data import DeviceData
from fedpeft_pl.schedules import Schedule
from fedpeft_pl.strategies import Strategy

log = logging.getLogger(__name__)


class FederatedTrainer(RoundTrainer):
    """A Lightning Trainer that runs federated rounds instead of epochs.

    Args:
        num_rounds: communication rounds (one Lightning epoch each).
        clients_per_round: clients sampled each round (m of the data module's N); with Poisson
            sampling, the expected number.
        local_epochs: passes over its own data that each sampled client makes per round.
        seed: seeds client sampling, availability and every client's local training.
        aggregation: the server's strategy (``fedpeft_pl.strategies``); FedAvg by default.
        client_sampling: ``uniform`` (exactly m, without replacement) or ``poisson`` (each
            client with probability m/N; what DP-FedAvg's accounting assumes).
        availability: dropout and stragglers (:class:`~fedpeft_pl.availability.ClientAvailability`).
        compress_upload: codec for client updates (``fedpeft_pl.compression``), e.g. ``Int8``.
        compress_download: codec for the global state sent to clients, e.g. ``Float16``.
        privacy: local differential privacy (:class:`~fedpeft_pl.privacy.LocalDP`): DP-SGD on every
            client with per-client accounting. Central DP is a strategy (``DPFedAvg``).
        clock: simulated time (:class:`~fedpeft_pl.clock.VirtualClock`): each client's device and
            network, each task's seconds from its wire bytes and samples, logged per round
            (``time/*``, ``server/acc_vs_simulated_seconds``) and on the console; off by default.
        schedule: when the server updates, on the clock (:mod:`fedpeft_pl.schedules`):
            ``Synchronous`` rounds with over-selection and a deadline, ``FedBuff`` (buffered
            asynchronous aggregation) or ``FedAsync``; every round waits for all of its sampled
            clients by default. Needs ``clock``.
        attack: clients that lie, in a simulation (:mod:`fedpeft_pl.attacks`): a seeded set of malicious
            clients poisons its data, tampers with its updates or inflates its sample counts, or
            colludes knowing the honest updates; the figures are logged per round (``attack/*``).
            None by default. (On a deployment a SuperNode's node config makes it an attacker.)
        client_runner: ``sequential`` (clients one after another through Lightning's epoch loop),
            ``vectorized`` (a round's clients at once through the one frozen backbone,
            :class:`~fedpeft_pl.runners.vectorized.VectorizedRunner`) or ``auto`` (vectorised on one CUDA
            device, where it is faster, and for Head on cached features; sequential elsewhere); the
            console says which and why.
        max_parallel_clients: with the vectorised runner, at most this many clients train at once
            (halved by itself if a chunk runs out of CUDA memory).
        feature_cache: linear probing (Head) on features computed once per run
            (:class:`~fedpeft_pl.runners.feature_cache.FeatureCache`): ``auto`` caches where that is exact
            and says on the console why not elsewhere, ``memory`` insists, ``off`` never caches.
        feature_cache_max_gib: the most memory the cached features may take.
        device_data_max_gib: with the vectorised runner, the most memory the training samples,
            transformed once per run where the transforms are deterministic, may take on the device
            (:class:`~fedpeft_pl.runners.device_data.DeviceData`); beyond it they stay in host memory
            where they fit, else every step transforms them in DataLoader workers. The server's test
            split is kept the same way (on the device beside them with the vectorised runner,
            in host memory with the sequential one) where the bound leaves room.
        callbacks: further Lightning callbacks. A server-aggregation callback, a round-aware
            progress bar (only when stderr is a terminal), a run summary and a round-end
            checkpoint (``round=N.ckpt`` and ``last.ckpt``) are added unless given.
        num_sanity_val_steps: as in Lightning; off by default.
        **kwargs: any other ``lightning.pytorch.Trainer`` argument except epoch and step limits.

    Example::

        trainer = FederatedTrainer(num_rounds=50, clients_per_round=8, accelerator="gpu")
        trainer.fit(FedPEFTModule(100, peft=Prompt()), datamodule=FederatedDataModule(CIFAR100(), num_clients=64))
    """

    def __init__(
        self,
        num_rounds: int = 50,
        clients_per_round: int = 8,
        local_epochs: int = 1,
        seed: int = 0,
        aggregation: Optional[Strategy] = None,
        client_sampling: Literal["uniform", "poisson"] = "uniform",
        availability: Optional[ClientAvailability] = None,
        compress_upload: Optional[Codec] = None,
        compress_download: Optional[Codec] = None,
        privacy: Optional[LocalDP] = None,
        clock: Optional[VirtualClock] = None,
        schedule: Optional[Schedule] = None,
        attack: Optional[Attack] = None,
        client_runner: Literal["auto", "sequential", "vectorized"] = "auto",
        max_parallel_clients: Optional[int] = None,
        feature_cache: Literal["auto", "memory", "off"] = "auto",
        feature_cache_max_gib: float = 4.0,
        device_data_max_gib: float = 4.0,
        callbacks: Optional[list[Callback]] = None,
        num_sanity_val_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        features = FeatureCache(feature_cache, feature_cache_max_gib)  # checked before Lightning starts
        device_data = DeviceData(device_data_max_gib)
        # the same checks as at fit time, where the number of clients is known
        settings = federation_settings(num_rounds, clients_per_round, local_epochs, seed, client_sampling)
        # (each name popped here, where jsonargparse's reading of this signature sees it)
        for name in (*EPOCH_LIMITS, *NOT_IN_ROUNDS):
            refuse_in_rounds(name, kwargs.get(name))
            kwargs.pop(name, None)
        callbacks = list(callbacks or [])
        if privacy is not None:
            # before the server: a client whose budget is spent is dropped before anything is sent to it
            callbacks.insert(0, privacy)
        if not any(isinstance(c, ServerAggregation) for c in callbacks):
            callbacks.append(
                ServerAggregation(
                    aggregation,
                    upload=compress_upload,
                    download=compress_download,
                    clock=clock,
                    schedule=schedule,
                    attack=attack,
                )
            )
        elif any(
            part is not None for part in (aggregation, compress_upload, compress_download, clock, schedule, attack)
        ):
            raise ConfigError(
                "give the strategy, codecs, clock, schedule and attack either as trainer arguments or in a "
                "ServerAggregation callback, not both"
            )
        if kwargs.get("enable_progress_bar") is None and not any(isinstance(c, ProgressBar) for c in callbacks):
            # redirected to a file (CI, nohup, a cluster job) a bar is hundreds of lines of fragments;
            # a notebook's stderr is no terminal either, but draws the bar as a widget
            kwargs["enable_progress_bar"] = sys.stderr.isatty() or "ipykernel" in sys.modules
        if kwargs.get("enable_model_summary") is None:
            # Lightning's summary table; shown with its other messages (fedpeft --verbose)
            kwargs["enable_model_summary"] = logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)
        if kwargs["enable_progress_bar"] is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(FederatedProgressBar())
        if kwargs.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.append(RoundCheckpoint())
        if not any(isinstance(c, RunSummary) for c in callbacks):
            callbacks.append(RunSummary())
        try:
            super().__init__(
                max_epochs=num_rounds, callbacks=callbacks, num_sanity_val_steps=num_sanity_val_steps, **kwargs
            )
        except MisconfigurationException as err:  # e.g. accelerator: gpu on a machine without one
            detail = str(err).strip().splitlines()[0]
            accelerator = kwargs.get("accelerator", "auto")
            raise ConfigError(
                f"trainer.accelerator {accelerator!r} cannot run here ({detail}); set trainer.accelerator: cpu, "
                "or auto to use what this machine has (and check trainer.devices)"
            ) from None
        federated_ddp(self.strategy)  # "ddp" as a federated run needs it: no buffer broadcast before every forward
        # device_data: where the vectorised runner keeps the transformed training samples
        self.fit_loop = FederatedLoop(
            self, settings, availability=availability, feature_cache=features, device_data=device_data
        )
        self.fit_loop.use_choice(
            RunnerChoice.configured(client_runner, self._root_device_type(), self.world_size, max_parallel_clients)
        )

    @property
    def client_runner(self) -> str:
        """The runner that trains the clients: ``sequential``, ``vectorized`` or a given runner's name."""
        return self.fit_loop.choice.runner

    @property
    def client_runner_reason(self) -> str:
        """Why that runner (:class:`~fedpeft_pl.runners.choice.RunnerChoice`)."""
        return self.fit_loop.choice.reason

    @property
    def client_runner_setting(self) -> str:
        """``trainer.client_runner`` as given (``auto``, ``sequential``, ``vectorized``), or a given runner's name."""
        return self.fit_loop.choice.setting

    @property
    def max_parallel_clients(self) -> Optional[int]:
        """With the vectorised runner, at most this many clients train at once (as given)."""
        return self.fit_loop.choice.max_parallel_clients

    @property
    def device_data(self) -> Optional[DeviceData]:
        """Where the vectorised runner keeps the transformed training samples."""
        return self.fit_loop.device_data

    def describe_client_runner(self, module: Optional[pl.LightningModule] = None) -> tuple[str, str]:
        """Which runner trains the clients and why, e.g. ``("sequential", "auto: ...")``; a
        vectorised runner that hands this run to the sequential one says so, and otherwise which
        path of the engine trains (``stacked``, ``vmap``) and why."""
        loop = self.fit_loop
        context = loop.context
        return loop.choice.describe(
            context, module if module is not None else context.module, isinstance(loop.runner, VectorizedRunner)
        )

    def _root_device_type(self) -> str:
        try:
            return self.strategy.root_device.type
        except (AttributeError, IndexError, RuntimeError):  # a strategy that knows its device only once launched
            return "cpu"

    @property
    def releases_client_statistics(self) -> bool:
        """Whether this run may collect un-noised per-client statistics
        (:func:`fedpeft_pl.privacy.releases_client_statistics`)."""
        return releases_client_statistics(self)

    @property
    def federation(self) -> Federation:
        """The run's federation (needs the data module, so known from fit on)."""
        return self.fit_loop.federation

    def use_runner(self, runner: ClientRunner) -> None:
        """Run clients with ``runner`` instead of in this process one by one (e.g. a Flower runner)."""
        self.fit_loop.use_runner(runner)

    @override
    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: Optional[pl.LightningDataModule] = None,
        ckpt_path: Optional[str] = None,
        weights_only: Optional[bool] = None,
    ) -> None:
        """Run ``num_rounds`` rounds; ``datamodule`` must be a FederatedDataModule.

        Args:
            model: the FedPEFTModule to train.
            datamodule: a FederatedDataModule: the data split into clients.
            ckpt_path: resume from this checkpoint, or ``last`` for the newest ``last.ckpt`` of
                this configuration's logger (the same run folder); checked before anything is written.
            weights_only: as in Lightning; fedpeft checkpoints load tensors-only.
        """
        if train_dataloaders is not None or val_dataloaders is not None:
            raise ConfigError(
                "FederatedTrainer.fit takes its data from a FederatedDataModule; pass datamodule=... instead of "
                "dataloaders"
            )
        if not all(hasattr(datamodule, a) for a in ("num_clients", "client_dataloader", "client_num_samples")):
            raise ConfigError(
                "FederatedTrainer.fit needs a FederatedDataModule, passed as datamodule=..., to split data into clients"
            )
        self._check_clients(datamodule.num_clients)
        privacy = self.privacy
        if privacy is not None:
            privacy.attach(model, datamodule)
        if ckpt_path == "last":
            ckpt_path = self.find_last_checkpoint(continue_logging=True)
            log.info(
                f"resuming from {ckpt_path}"
                if ckpt_path
                else "no earlier checkpoint to resume from; training starts at round 1"
            )
        if ckpt_path is not None:
            # everything that can refuse the resume, before the run folder is touched
            checkpoint = check_checkpoint_file(str(ckpt_path))
            check_resume(model, checkpoint)
            check_server_resume(self, checkpoint)
            fresh = forget_rounds_logged_after(self, checkpoint, os.path.getmtime(ckpt_path))
            if fresh is not None:
                self.loggers = [fresh] + [lg for lg in self.loggers if lg is not self.logger]
        with removed_if_failed_early(self):
            super().fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)

    def train_client(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        session: ClientSession,
        max_batches: Optional[int] = None,
    ) -> int:
        """Train one client of one round from the state ``model`` holds now; return its number of samples.

        The client side of a deployment (:mod:`fedpeft_pl.deploy.flower`): no server, no evaluation, no
        logging and no checkpoints, and only the callbacks that run on clients
        (:func:`~fedpeft_pl.hooks.runs_on_client`); the trained state is left in ``model``.
        ``max_batches`` caps the local steps (a straggler); by default the client makes all
        ``local_epochs`` epochs.
        """
        loop, callbacks, loggers = self.fit_loop, self.callbacks, self.loggers
        self.fit_loop = _ClientJob(loop, session, max_batches)
        self.callbacks = [c for c in callbacks if runs_on_client(c)]
        self.loggers = []
        try:
            super().fit(model, datamodule=datamodule)
        finally:
            self.fit_loop, self.callbacks, self.loggers = loop, callbacks, loggers
        return datamodule.client_num_samples(session.client)

    def find_last_checkpoint(self, continue_logging: bool = False) -> Optional[str]:
        """The newest ``last.ckpt`` of an earlier run with this configuration's checkpoint folder or logger name.

        With ``continue_logging``, a TensorBoard logger without an explicit version continues in
        the version that checkpoint belongs to, so a resumed run's curves stay in one place.
        """
        logger = self.logger
        root = getattr(logger, "root_dir", None)
        pinned = isinstance(logger, TensorBoardLogger) and _has_version(logger)
        own_dirs = [Path(c.dirpath) for c in self.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if own_dirs:
            candidates = [p for d in own_dirs for p in d.glob("last*.ckpt")]
        elif root is not None and pinned:
            candidates = list(Path(logger.log_dir, "checkpoints").glob("last*.ckpt"))
        elif root is not None:
            candidates = list(Path(root).glob("*/checkpoints/last*.ckpt"))
        else:
            candidates = list(Path(self.default_root_dir).glob("checkpoints/last*.ckpt"))
        if not candidates:
            return None
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        version_dir = newest.parent.parent
        if (
            continue_logging
            and not own_dirs
            and isinstance(logger, TensorBoardLogger)
            and not pinned
            and version_dir.parent == Path(root)
        ):
            self.loggers = [_continue_in(logger, version_dir.name)] + [lg for lg in self.loggers if lg is not logger]
        return str(newest)

    def federation_of(self, num_clients: int) -> Federation:
        """This run's federation of ``num_clients`` clients, where the number is known before fit (a
        deployed client knows it from its node config); raises ConfigError where the settings do not fit it."""
        return Federation(num_clients=num_clients, **self.fit_loop.settings)

    def _check_clients(self, num_clients: int) -> None:
        self.federation_of(num_clients)

    def check_parts(self, model: pl.LightningModule, secure_aggregation: bool = False, live: bool = False) -> None:
        """Refuse, in one line, a combination of this run's parts that cannot hold
        (:func:`fedpeft_pl.capabilities.check_run`); ``secure_aggregation``: the server will see only the masked sum;
        ``live``: the clients train elsewhere in real time (a deployment)."""
        server = self.aggregation.server
        privacy = (self.privacy,) if self.privacy is not None else ()
        check_run(
            RunParts(
                getattr(model, "peft", None),
                server.strategy,
                server.upload,
                privacy,
                secure_aggregation,
                server.clock,
                server.schedule,
                live,
                server.attack,
            )
        )

    def export(
        self,
        model: pl.LightningModule,
        datamodule: Optional[pl.LightningDataModule] = None,
        ckpt_path: Optional[str] = None,
        output: str = "model.safetensors",
        weights_only: Optional[bool] = None,
    ) -> Exported:
        """Write the checkpoint's model as one safetensors file that plain timm loads where the method allows.

        Args:
            ckpt_path: a checkpoint of this configuration, or ``last`` for the newest.
            output: the file to write.
        """
        if ckpt_path is None:
            raise ConfigError("export needs --ckpt_path: a checkpoint file, or last for this config's newest last.ckpt")
        if os.path.isdir(output):
            raise ConfigError(
                f"--output {output!r} is a directory; give the file to write, e.g. "
                f"{os.path.join(output, 'model.safetensors')!r}"
            )
        path = self.find_last_checkpoint() if ckpt_path == "last" else ckpt_path
        if path is None:
            raise ConfigError(
                "ckpt_path 'last': this config's run folder holds no last.ckpt; give the checkpoint file to export"
            )
        if ckpt_path == "last":
            log.info(f"reading the checkpoint {path}")
        check_resume(model, check_checkpoint_file(path))
        exported = export_checkpoint(model, path, output, weights_only=weights_only is not False)
        kind = (
            "plain timm"
            if exported.plain_timm
            else "timm plus the PEFT tensors (load with fedpeft_pl.export.load_exported)"
        )
        print(f"wrote {exported.path}: {exported.tensors} tensors, {exported.num_bytes:,} bytes, {kind}")
        return exported

    def comm(self, model: pl.LightningModule, datamodule: Optional[pl.LightningDataModule] = None) -> CommReport:
        """Print what one client sends per round and the whole run costs, without training or downloading."""
        # fedpeft comm runs the same plan without this trainer where it can (fedpeft_pl.comm_command)
        report = communication_plan(
            model,
            datamodule,
            self.fit_loop.settings,
            self.fit_loop.availability,
            self.aggregation.server,
            lambda: self.describe_client_runner(model),
            [self.aggregation.strategy, *self.callbacks],
            releases_client_statistics(self),
        )
        print(report.format())
        return report


def _continue_in(logger: TensorBoardLogger, version: Union[str, int]) -> TensorBoardLogger:
    """A TensorBoard logger like ``logger`` that writes into the existing ``version`` folder."""
    name = str(version)
    suffix = name.removeprefix("version_")
    pinned = int(suffix) if name.startswith("version_") and suffix.isdigit() else name
    return tensorboard_like(logger, pinned)


def _has_version(logger: TensorBoardLogger) -> bool:
    """Whether the user gave the logger a version. Lightning has no public way to ask: reading
    ``logger.version`` would pick the next free one, so the unset attribute is read, never written."""
    return getattr(logger, "_version", None) is not None
