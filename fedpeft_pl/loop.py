"""FederatedLoop and FederatedTrainer.

This is the ONLY module that touches private Lightning API (``_FitLoop``,
``_TrainingEpochLoop``, data fetchers, ``call._call_*``, the logger connector). A Lightning
upgrade that moves those breaks this file and ``tests/test_loop_contract.py``, nothing else.

One Lightning epoch is one communication round, so ``trainer.current_epoch`` counts rounds,
``on_train_epoch_end`` fires once per round and checkpoints are written at round ends.
Inside a round every sampled client trains with Lightning's own training-epoch loop (so
``training_step``, precision, gradient clipping, ``self.log`` and batch hooks behave as in
plain Lightning), then the server aggregates and the global model is evaluated once.
"""

from __future__ import annotations

import logging
import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loops import _FitLoop
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.loops.utilities import _select_data_fetcher
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from fedpeft_pl.aggregation import ServerAggregation
from fedpeft_pl.availability import ClientAvailability, Plan
from fedpeft_pl.compression import Codec
from fedpeft_pl.comm import CommReport, communication_report
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.export import Exported, export_model
from fedpeft_pl.hooks import ClientDropped, FederatedCallback
from fedpeft_pl.peft import load_trainable_state, trainable_parameters
from fedpeft_pl.privacy import LocalDP, releases_client_statistics
from fedpeft_pl.progress import FederatedProgressBar
from fedpeft_pl.seeds import CLIENT_SAMPLING, DATA_ORDER, LOCAL_TRAINING, derive_seed
from fedpeft_pl.strategies import Strategy

log = logging.getLogger(__name__)


def sample_clients(
    seed: int, server_round: int, num_clients: int, clients_per_round: int, sampling: str = "uniform"
) -> list[int]:
    """The clients of round ``server_round``, a function of the seed alone.

    ``uniform`` draws exactly ``clients_per_round`` without replacement; ``poisson`` includes each
    client independently with probability ``clients_per_round / num_clients`` (as central DP's
    accounting assumes), so the count varies around ``clients_per_round``.
    """
    rng = np.random.default_rng(derive_seed(seed, CLIENT_SAMPLING, server_round))
    if sampling == "poisson":
        return [int(c) for c in np.flatnonzero(rng.random(num_clients) < clients_per_round / num_clients)]
    return sorted(int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False))


class _ClientEpochLoop(_TrainingEpochLoop):
    """One local epoch of one client: Lightning's training epoch without validation inside it.

    The federated loop evaluates the aggregated model once per round, so validation never runs
    between batches; and it hands over a fresh, already-iterated data fetcher per epoch.
    """

    def on_run_start(self, data_fetcher: Any) -> None:
        data_fetcher._start_profiler = self._on_before_fetch
        data_fetcher._stop_profiler = self._on_after_fetch

    def _should_check_val_fx(self, data_fetcher: Any) -> bool:
        return False

    def _broadcast_sigterm_tensor(self) -> None:
        # Lightning broadcasts rank 0's SIGTERM flag before every step. Under DDP each process
        # trains other clients, for different numbers of steps, so the processes would wait on
        # each other's broadcasts; the federated loop checks once a round instead.
        pass

    def check_sigterm(self) -> None:
        """Lightning's SIGTERM check, where every process reaches it."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            super()._broadcast_sigterm_tensor()


class FederatedLoop(_FitLoop):
    """A Lightning fit loop in which one iteration is one communication round.

    Each round samples ``clients_per_round`` of the data module's clients (seeded by round),
    trains each from the global state with a fresh optimizer for ``local_epochs`` epochs over
    its own split, lets :class:`~fedpeft_pl.aggregation.ServerAggregation` combine the
    updates, and evaluates the global model once. Client ``c`` of round ``r`` trains under
    the torch seed ``derive_seed(seed, LOCAL_TRAINING, r, c)`` and shuffles with its own
    ``DATA_ORDER`` stream (:mod:`fedpeft_pl.seeds`): its result depends on the global state and
    those seeds only, so runs repeat exactly and resume exactly at round boundaries.
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        num_rounds: int,
        clients_per_round: int,
        local_epochs: int,
        seed: int,
        client_sampling: str = "uniform",
        availability: Optional[ClientAvailability] = None,
    ) -> None:
        super().__init__(trainer, min_epochs=0, max_epochs=num_rounds)
        self.epoch_loop = _ClientEpochLoop(trainer)
        self.clients_per_round = clients_per_round
        self.local_epochs = local_epochs
        self.seed = seed
        self.client_sampling = client_sampling
        self.availability = availability if availability is not None else ClientAvailability()
        self.round_clients: list[int] = []
        self.round_plans: dict[int, Plan] = {}
        self.round_batches = 0
        self.client: Optional[int] = None
        # updates of clients that trained outside this process (a Flower deployment), by client
        self.uploads: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def num_rounds(self) -> int:
        return self.max_epochs

    @property
    def done(self) -> bool:
        if self.epoch_progress.current.processed >= self.max_epochs:
            self.epoch_progress.current.completed = self.epoch_progress.current.processed
            return True
        return self.trainer.should_stop

    def run(self) -> None:
        self._check_setup()
        if self.done:
            return
        self._resume_at_round_boundary()
        self.on_run_start()
        while not self.done:
            try:
                self.on_advance_start()
                self.advance()
                self.on_advance_end()
            finally:
                self.on_iteration_done()
        self.on_run_end()

    def _check_setup(self) -> None:
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                if callback._every_n_train_steps or callback._train_time_interval:
                    raise ConfigError(
                        "ModelCheckpoint must save at round ends only; remove every_n_train_steps and train_time_interval"
                    )
                callback._save_on_train_epoch_end = True
        model = self.trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and model.broadcast_buffers:
            if any(True for _ in model.module.buffers()):
                # DDP would broadcast buffers in every forward: a collective that processes training
                # different clients for different numbers of steps would not all reach
                raise ConfigError(
                    "this model has buffers, which DDP broadcasts on every forward; set "
                    "trainer.strategy to lightning.pytorch.strategies.DDPStrategy with init_args {broadcast_buffers: false}"
                )

    def _resume_at_round_boundary(self) -> None:
        progress = self.epoch_progress
        if self.restarting:
            if progress.current.processed != progress.current.started:
                raise ConfigError(
                    "this checkpoint was written in the middle of a round; resume from a round-end checkpoint such as last.ckpt"
                )
            progress.current.completed = progress.current.processed
            progress.total.completed = progress.total.processed
        self.restarting = False

    def on_save_checkpoint(self) -> dict:
        state = super().on_save_checkpoint()
        state["rng"] = _rng_state()
        return state

    def on_load_checkpoint(self, state_dict: dict) -> None:
        super().on_load_checkpoint(state_dict)
        if "rng" in state_dict:
            _set_rng_state(state_dict["rng"])

    def on_advance_start(self) -> None:
        trainer = self.trainer
        self.epoch_progress.increment_ready()
        call._call_callback_hooks(trainer, "on_train_epoch_start")
        call._call_lightning_module_hook(trainer, "on_train_epoch_start")
        self.epoch_progress.increment_started()

    def advance(self) -> None:
        """One communication round."""
        datamodule = self.trainer.datamodule
        server_round = self.epoch_progress.current.processed + 1
        clients = sample_clients(self.seed, server_round, datamodule.num_clients, self.clients_per_round, self.client_sampling)
        self.round_clients = clients
        self.round_plans = {
            c: self.availability.plan(self.seed, server_round, c, self.local_epochs * datamodule.client_num_batches(c))
            for c in clients
        }
        self.round_batches = sum(plan.batches for plan in self.round_plans.values())
        self._call_federated_hook("on_round_start", server_round, clients)
        failures = self._run_clients(server_round, self.own_share(clients))
        self.client = None
        self.epoch_loop.check_sigterm()
        failed = sum(self.gather(len(failures)))
        self._call_federated_hook("on_round_gather", self.gather)
        if failed and failed == len(clients):
            raise RuntimeError(
                f"all {len(clients)} clients of round {server_round} failed; the first error is above"
            ) from (failures[0] if failures else None)
        self._call_federated_hook("on_round_end", server_round)
        if self._should_evaluate(server_round):
            self._evaluate()

    def own_share(self, clients: list[int]) -> list[int]:
        """The sampled clients that this process trains: all of them, or under DDP every ``world_size``-th."""
        return clients[self.trainer.global_rank :: self.trainer.world_size]

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order (``[obj]`` in a single process)."""
        if self.trainer.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def _run_clients(self, server_round: int, clients: list[int]) -> list[BaseException]:
        """Each client in turn: it receives the global state, trains, and hands over its update."""
        datamodule = self.trainer.datamodule
        failures: list[BaseException] = []
        for client in clients:
            if not self.start_client(server_round, client):
                continue
            plan = self.round_plans[client]
            try:
                with self._no_gradient_sync():
                    self._train_client(server_round, client, plan.batches)
            except Exception as error:  # one client's failure must not end the run
                failures.append(error)
                self.client_failed(server_round, client, error)
            else:
                self._call_federated_hook("on_client_end", client, datamodule.client_num_samples(client))
        return failures

    def start_client(self, server_round: int, client: int) -> bool:
        """The client receives the global state (``on_client_start``); False if it drops out instead."""
        self.client = client
        try:
            self._call_federated_hook("on_client_start", client)
        except ClientDropped as reason:
            self._drop(server_round, client, str(reason))
            return False
        if self.round_plans[client].dropped:
            self._drop(server_round, client, "dropped out (client availability)")
            return False
        return True

    def client_failed(self, server_round: int, client: int, error: BaseException) -> None:
        log.warning(
            f"round {server_round}: client {client} failed and is left out of this round: "
            f"{type(error).__name__}: {error}"
        )
        self._call_federated_hook("on_client_failed", client, error)

    def _no_gradient_sync(self) -> Any:
        """Under DDP every process trains other clients, so their gradients must not be averaged."""
        model = self.trainer.strategy.model
        return model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else nullcontext()

    def _drop(self, server_round: int, client: int, reason: str) -> None:
        log.info(f"round {server_round}: client {client} takes no part: {reason}")
        self._call_federated_hook("on_client_dropped", client, reason)

    def _train_client(self, server_round: int, client: int, max_batches: int) -> None:
        """Local training for ``local_epochs`` epochs, stopping after ``max_batches`` batches (stragglers)."""
        trainer = self.trainer
        loader = trainer.datamodule.client_dataloader(client, derive_seed(self.seed, DATA_ORDER, server_round, client))
        trainer.strategy.setup_optimizers(trainer)  # a fresh optimizer for every client
        device = trainer.strategy.root_device
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(derive_seed(self.seed, LOCAL_TRAINING, server_round, client))
            remaining = max_batches
            for _ in range(self.local_epochs):
                if remaining <= 0:
                    break
                fetcher = _select_data_fetcher(trainer, RunningStage.TRAINING)
                fetcher.setup(CombinedLoader(loader, "max_size_cycle"))
                try:
                    iter(fetcher)
                    self.max_batches = min(len(loader), remaining)
                    self.epoch_loop.run(fetcher)
                finally:
                    fetcher.teardown()
                remaining -= self.max_batches

    def _should_evaluate(self, server_round: int) -> bool:
        every = self.trainer.check_val_every_n_epoch
        due = every is None or server_round % every == 0 or server_round == self.num_rounds
        return due and self.trainer.enable_validation

    def _evaluate(self) -> None:
        trainer = self.trainer
        first_loop_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        self.epoch_loop.val_loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter

    def _call_federated_hook(self, name: str, *args: Any) -> None:
        """Callbacks first, then the LightningModule's method of the same name, if it has one."""
        trainer = self.trainer
        module = trainer.lightning_module
        for callback in trainer.callbacks:
            if isinstance(callback, FederatedCallback):
                with trainer.profiler.profile(f"[Callback]{callback.state_key}.{name}"):
                    getattr(callback, name)(trainer, module, *args)
        hook = getattr(module, name, None)
        if callable(hook):
            with trainer.profiler.profile(f"[LightningModule]{type(module).__name__}.{name}"):
                hook(*args)



class _ClientJob(FederatedLoop):
    """One given client of one given round, and nothing else: what a deployed client runs per message.

    It trains exactly as that client would inside a simulation (the same seed, data order, fresh
    optimizer and step cap), so a deployment reaches the simulation's state.
    """

    def __init__(self, parent: FederatedLoop, server_round: int, client: int, max_batches: Optional[int]) -> None:
        super().__init__(parent.trainer, 1, 1, parent.local_epochs, parent.seed)
        self.job = (server_round, client, max_batches)

    def _check_setup(self) -> None:
        pass

    def advance(self) -> None:
        server_round, client, max_batches = self.job
        if max_batches is None:
            max_batches = self.local_epochs * self.trainer.datamodule.client_num_batches(client)
        self.round_clients = [client]
        self._call_federated_hook("on_round_start", server_round, [client])
        self.client = client
        self._call_federated_hook("on_client_start", client)
        self._train_client(server_round, client, max_batches)
        self.client = None


def _rng_state() -> dict[str, Any]:
    """Every global RNG's state, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class FederatedTrainer(pl.Trainer):
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
        callbacks: further Lightning callbacks. A server-aggregation callback, a round-aware
            progress bar and a round-end ModelCheckpoint (``last.ckpt``) are added unless given.
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
        callbacks: Optional[list[Callback]] = None,
        num_sanity_val_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        for name, value in (
            ("num_rounds", num_rounds),
            ("clients_per_round", clients_per_round),
            ("local_epochs", local_epochs),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"trainer.{name} must be a positive integer, got {value!r}")
        for name in ("max_epochs", "min_epochs", "max_steps", "min_steps"):
            if kwargs.get(name) not in (None, -1):
                raise ConfigError(f"FederatedTrainer counts rounds, not epochs or steps; remove trainer.{name} and set trainer.num_rounds")
            kwargs.pop(name, None)
        if client_sampling not in ("uniform", "poisson"):
            raise ConfigError(f"trainer.client_sampling must be 'uniform' or 'poisson', got {client_sampling!r}")
        callbacks = list(callbacks or [])
        if privacy is not None:
            # before the server: a client whose budget is spent is dropped before anything is sent to it
            callbacks.insert(0, privacy)
        if not any(isinstance(c, ServerAggregation) for c in callbacks):
            callbacks.append(ServerAggregation(aggregation, upload=compress_upload, download=compress_download))
        elif aggregation is not None or compress_upload is not None or compress_download is not None:
            raise ConfigError(
                "give the strategy and codecs either as trainer arguments or in a ServerAggregation callback, not both"
            )
        if kwargs.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(FederatedProgressBar())
        if kwargs.get("enable_checkpointing", True) is not False and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(save_last=True, save_on_train_epoch_end=True))
        super().__init__(max_epochs=num_rounds, callbacks=callbacks, num_sanity_val_steps=num_sanity_val_steps, **kwargs)
        self.fit_loop = FederatedLoop(
            self, num_rounds, clients_per_round, local_epochs, seed, client_sampling=client_sampling, availability=availability
        )

    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: Optional[pl.LightningDataModule] = None,
        ckpt_path: Optional[str] = None,
        weights_only: Optional[bool] = None,
    ) -> None:
        """Run ``num_rounds`` rounds; ``datamodule`` must be a FederatedDataModule."""
        if train_dataloaders is not None or val_dataloaders is not None:
            raise ConfigError("FederatedTrainer.fit takes its data from a FederatedDataModule; pass datamodule=... instead of dataloaders")
        if not all(hasattr(datamodule, a) for a in ("num_clients", "client_dataloader", "client_num_samples")):
            raise ConfigError("FederatedTrainer.fit needs a FederatedDataModule, passed as datamodule=..., to split data into clients")
        self._check_clients(datamodule.num_clients)
        privacy = self.privacy
        if privacy is not None:
            privacy.attach(model, datamodule)
        if ckpt_path == "last":
            ckpt_path = self.find_last_checkpoint(continue_logging=True)
        elif ckpt_path is not None and not os.path.isfile(ckpt_path):
            raise ConfigError(f"ckpt_path {str(ckpt_path)!r} does not exist; give a checkpoint file, or 'last' for this run's newest")
        super().fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)

    def train_client(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        server_round: int,
        client: int,
        max_batches: Optional[int] = None,
    ) -> int:
        """Train one client of one round from the state ``model`` holds now; return its number of samples.

        The client side of a deployment (:mod:`fedpeft_pl.flower`): no server, no evaluation, no
        logging and no checkpoints; the trained state is left in ``model``. ``max_batches`` caps
        the local steps (a straggler); by default the client makes all ``local_epochs`` epochs.
        """
        loop, callbacks, loggers = self.fit_loop, self.callbacks, self.loggers
        server_side = (ServerAggregation, LocalDP, Checkpoint, ProgressBar, ModelSummary, SaveConfigCallback)
        self.fit_loop = _ClientJob(loop, server_round, client, max_batches)
        self.callbacks = [c for c in callbacks if not isinstance(c, server_side)]
        self.loggers = []
        try:
            super().fit(model, datamodule=datamodule)
        finally:
            self.fit_loop, self.callbacks, self.loggers = loop, callbacks, loggers
        return datamodule.client_num_samples(client)

    def find_last_checkpoint(self, continue_logging: bool = False) -> Optional[str]:
        """The newest ``last.ckpt`` of an earlier run with this configuration's checkpoint folder or logger name.

        With ``continue_logging``, a logger without an explicit version continues in the version
        that checkpoint belongs to, so a resumed run's curves stay in one place.
        """
        logger = self.logger
        root = getattr(logger, "root_dir", None)
        own_dirs = [Path(c.dirpath) for c in self.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if own_dirs:
            candidates = [p for d in own_dirs for p in d.glob("last*.ckpt")]
        elif root is not None and getattr(logger, "_version", None) is not None:
            candidates = list(Path(logger.log_dir, "checkpoints").glob("last*.ckpt"))
        elif root is not None:
            candidates = list(Path(root).glob("*/checkpoints/last*.ckpt"))
        else:
            candidates = list(Path(self.default_root_dir).glob("checkpoints/last*.ckpt"))
        if not candidates:
            log.info("no earlier checkpoint to resume from; training starts at round 1")
            return None
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        version_dir = newest.parent.parent
        if continue_logging and not own_dirs and root is not None and logger._version is None and version_dir.parent == Path(root):
            name = version_dir.name
            suffix = name.removeprefix("version_")
            logger._version = int(suffix) if name.startswith("version_") and suffix.isdigit() else name
        log.info(f"resuming from {newest}")
        return str(newest)

    def _check_clients(self, num_clients: int) -> None:
        if self.fit_loop.clients_per_round > num_clients:
            raise ConfigError(
                f"trainer.clients_per_round ({self.fit_loop.clients_per_round}) exceeds data.num_clients "
                f"({num_clients}); lower clients_per_round or add clients"
            )

    @property
    def privacy(self) -> Optional[LocalDP]:
        """The local-DP callback, if the run trains privately."""
        return next((c for c in self.callbacks if isinstance(c, LocalDP)), None)

    @property
    def aggregation(self) -> ServerAggregation:
        """The callback that plays the server."""
        return next(c for c in self.callbacks if isinstance(c, ServerAggregation))

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
        path = self.find_last_checkpoint() if ckpt_path == "last" else ckpt_path
        if path is None or not os.path.isfile(path):
            raise ConfigError(f"ckpt_path {ckpt_path!r} names no checkpoint; give the checkpoint file to export")
        model.configure_model()
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only is not False)
        model.on_load_checkpoint(checkpoint)
        load_trainable_state(model, {k: checkpoint["state_dict"][k] for k in trainable_parameters(model)})
        exported = export_model(model, output)
        kind = "plain timm" if exported.plain_timm else "timm plus the PEFT tensors (load with fedpeft_pl.export.load_exported)"
        print(f"wrote {exported.path}: {exported.tensors} tensors, {exported.num_bytes:,} bytes, {kind}")
        return exported

    def comm(self, model: pl.LightningModule, datamodule: Optional[pl.LightningDataModule] = None) -> CommReport:
        """Print what one client sends per round and the whole run costs, without training or downloading."""
        num_clients = getattr(datamodule, "num_clients", None)
        if num_clients is not None:
            self._check_clients(num_clients)
        server = self.aggregation
        notes = ["clients are Poisson-sampled: m is the expected number per round"] if self.fit_loop.client_sampling == "poisson" else []
        if self.fit_loop.availability.dropout or self.fit_loop.availability.stragglers:
            notes.append(f"{self.fit_loop.availability!r}: dropped clients are sent nothing and send nothing")
        notes += [c.describe() for c in [server.strategy, *self.callbacks] if hasattr(c, "describe")]
        if type(server.upload) is not Codec or type(server.download) is not Codec:
            notes.append(f"upload {server.upload!r}, download {server.download!r}")
        report = communication_report(
            model, self.fit_loop.clients_per_round, self.fit_loop.num_rounds,
            upload=server.upload, download=server.download, notes=tuple(notes),
            round_config=server.strategy.configure_fit(1, {})[1], with_loss=releases_client_statistics(self),
        )
        print(report.format())
        return report
