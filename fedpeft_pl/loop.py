"""FederatedLoop and the in-process client runner.

This is the ONLY module that touches private Lightning API (``_FitLoop``,
``_TrainingEpochLoop``, data fetchers, ``call._call_*``, the logger connector). A Lightning
upgrade that moves those breaks this file and ``tests/test_loop_contract.py``, nothing else.

One Lightning epoch is one communication round, so ``trainer.current_epoch`` counts rounds,
``on_train_epoch_end`` fires once per round and checkpoints are written at round ends. Each
round the loop builds a :class:`~fedpeft_pl.federation.Round`, asks the server for the round's
message, lets a :class:`~fedpeft_pl.federation.ClientRunner` train the clients, hands every
:class:`~fedpeft_pl.federation.ClientResult` to the hooks, and evaluates the global model once.

The :class:`SequentialRunner` trains clients one after another with Lightning's own
training-epoch loop (so ``training_step``, precision, gradient clipping, ``self.log`` and batch
hooks behave as in plain Lightning); under DDP each process trains its share.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional, Union, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loops import _FitLoop
from lightning.pytorch.loops.progress import _ProcessedTracker, _Progress
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.loops.utilities import _select_data_fetcher
from lightning.pytorch.plugins import Precision
from lightning.pytorch.profilers import Profiler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from typing_extensions import override

from fedpeft_pl.aggregation import ServerAggregation
from fedpeft_pl.attacks import PoisonedData
from fedpeft_pl.availability import ClientAvailability
from fedpeft_pl.capabilities import PrivacyMechanism, RunParts, check_run
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.exchange import ClientSession, open_session
from fedpeft_pl.federation import (
    ClientResult,
    ClientRunner,
    ClientStore,
    Federation,
    LiveRunner,
    Plan,
    Round,
    sample_clients,
)
from fedpeft_pl.hooks import ClientDropped, FederatedCallback, FederatedHooks
from fedpeft_pl.peft import trainable_state
from fedpeft_pl.privacy import LocalDP, releases_client_statistics
from fedpeft_pl.runners import SequentialRunner, VectorizedRunner
from fedpeft_pl.runners.base import RunnerContext
from fedpeft_pl.runners.choice import RunnerChoice
from fedpeft_pl.runners.device_data import DeviceData
from fedpeft_pl.runners.feature_cache import FEATURE_EVAL_BATCH, FeatureCache
from fedpeft_pl.schedules import FedBuff, Synchronous, Task, Timeline
from fedpeft_pl.seeds import client_seed, training_seed
from fedpeft_pl.server import Server

if TYPE_CHECKING:
    from fedpeft_pl.client import FedPEFTModule
    from fedpeft_pl.data.datamodule import FederatedDataModule

log = logging.getLogger(__name__)

UNAVAILABLE = "dropped out (client availability)"  # why a client that availability drops takes no part

__all__ = ["FederatedLoop", "RoundTrainer", "SequentialRunner", "federated_ddp", "sample_clients"]


class RoundTrainer(pl.Trainer):
    """The trainer a :class:`FederatedLoop` runs under, typed: what Lightning sets on it at run time, and the
    run's server and privacy among its callbacks. :class:`~fedpeft_pl.trainer.FederatedTrainer` is one.

    Attributes:
        datamodule: the run's data module during a fit (Lightning sets it).
        callbacks: the run's callbacks (Lightning sets them).
        profiler: Lightning's profiler.
    """

    datamodule: FederatedDataModule
    callbacks: list[Callback]
    profiler: Profiler

    @property
    def privacy(self) -> Optional[LocalDP]:
        """The local-DP callback, if the run trains privately."""
        return next((c for c in self.callbacks if isinstance(c, LocalDP)), None)

    @property
    def aggregation(self) -> ServerAggregation:
        """The callback that plays the server."""
        return next(c for c in self.callbacks if isinstance(c, ServerAggregation))


@dataclass
class _RoundProgress(_Progress):
    """Lightning's epoch progress as its fit loop builds it, typed so: its trackers count processed epochs too."""

    total: _ProcessedTracker = field(default_factory=_ProcessedTracker)
    current: _ProcessedTracker = field(default_factory=_ProcessedTracker)


def federated_ddp(strategy: Any) -> None:
    """Set what a federated run needs of Lightning's DDP where the user left it open.

    DDP broadcasts rank 0's buffers before every forward by default: a collective that processes
    training different clients for different numbers of steps would not all reach. A federated
    run's buffers are constants (LoRA's index mask) or the server's (FLoRA's merged update), the
    same on every process, so nothing is lost. An explicit ``broadcast_buffers: true`` stays, and
    the loop refuses it at start. Lightning has no public setter for the arguments it passes to
    ``DistributedDataParallel``, hence this module.
    """
    if isinstance(strategy, DDPStrategy):
        strategy._ddp_kwargs.setdefault("broadcast_buffers", False)


class _ClientEpochLoop(_TrainingEpochLoop):
    """One local epoch of one client: Lightning's training epoch without validation inside it.

    The federated loop evaluates the aggregated model once per round, so validation never runs
    between batches; and it hands over a fresh, already-iterated data fetcher per epoch.
    """

    @override
    def on_run_start(self, data_fetcher: Any) -> None:
        data_fetcher._start_profiler = self._on_before_fetch
        data_fetcher._stop_profiler = self._on_after_fetch

    @override
    def _should_check_val_fx(self, data_fetcher: Any) -> bool:
        return False

    @override
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

    Each round draws clients (the strategy's :meth:`~fedpeft_pl.strategies.Strategy.draw_clients`: the
    federation's sampling, :meth:`Federation.sample`, by default), plans their availability, asks the
    server (:class:`~fedpeft_pl.aggregation.ServerAggregation`) for the round's message, runs
    the clients through the runner, hands their results to the hooks, lets the server aggregate
    and evaluates the global model once. Client ``c`` of round ``r`` shuffles with its own
    ``DATA_ORDER`` stream and trains under the torch seed of its ``LOCAL_TRAINING`` stream
    (:mod:`fedpeft_pl.seeds`): its result depends on the global state and those seeds only, so
    runs repeat exactly and resume exactly at round boundaries.

    Args:
        trainer: the FederatedTrainer.
        settings: the federation's shape less ``num_clients``, which the data module gives at fit time.
        availability: dropout and stragglers.
        runner: how clients run; the in-process :class:`SequentialRunner` by default.
        feature_cache: linear probing on features computed once per run
            (:class:`~fedpeft_pl.runners.feature_cache.FeatureCache`); ``auto`` by default.
        device_data: where the vectorised runner keeps the transformed training samples
            (:class:`~fedpeft_pl.runners.device_data.DeviceData`); none by default.
        choice: which runner trains the clients, and why (:class:`~fedpeft_pl.runners.choice.RunnerChoice`;
            :meth:`use_choice` builds the runner it names); the sequential runner by default.

    A runner sees the loop as a :class:`~fedpeft_pl.runners.base.RunnerHost`, and the run through
    :attr:`context` (a :class:`~fedpeft_pl.runners.base.RunnerContext`), never the trainer.
    """

    trainer: RoundTrainer
    epoch_loop: _ClientEpochLoop
    epoch_progress: _RoundProgress

    def __init__(
        self,
        trainer: RoundTrainer,
        settings: dict[str, Any],
        availability: Optional[ClientAvailability] = None,
        runner: Optional[ClientRunner] = None,
        feature_cache: Optional[FeatureCache] = None,
        device_data: Optional[DeviceData] = None,
        choice: Optional[RunnerChoice] = None,
    ) -> None:
        super().__init__(trainer, min_epochs=0, max_epochs=settings["num_rounds"])
        self.epoch_progress = _RoundProgress()
        self.epoch_loop = _ClientEpochLoop(trainer)
        self.settings = dict(settings)
        self.availability = availability if availability is not None else ClientAvailability()
        self.choice = choice if choice is not None else RunnerChoice("sequential", "sequential", "set in the config")
        self.runner: ClientRunner = runner if runner is not None else SequentialRunner(self)
        self.feature_cache = feature_cache if feature_cache is not None else FeatureCache()
        self.device_data = device_data
        self.client_states = ClientStore()
        self.timeline = Timeline()  # a buffered asynchronous run's clients in flight
        self.live: dict[str, Task] = {}  # a deployed asynchronous run's tasks in flight, by task id
        self._carried: list[tuple[Round, ClientResult]] = []  # replies that arrived after the last buffer filled
        self._federation: Optional[Federation] = None
        self._context = _LoopContext(self)

    @property
    def context(self) -> RunnerContext:
        """The run as a runner sees it: its module, data, device, precision and settings, read from the trainer."""
        return self._context

    def use_choice(self, choice: RunnerChoice) -> None:
        """Train the clients on the runner ``choice`` names (the vectorised or the sequential one)."""
        self.choice = choice
        if choice.runner == "vectorized":
            self.runner = VectorizedRunner(self, choice.max_parallel_clients)
        else:
            self.runner = SequentialRunner(self)

    def use_runner(self, runner: ClientRunner) -> None:
        """Train the clients on ``runner`` (e.g. a Flower runner), named after its class."""
        self.runner = runner
        self.choice = RunnerChoice.given(runner)

    @property
    def federation(self) -> Federation:
        """The run's federation; known once the data module has said how many clients it holds."""
        if self._federation is None:
            self._federation = Federation(num_clients=self.trainer.datamodule.num_clients, **self.settings)
        return self._federation

    def _secret_sampling(self) -> None:
        """A strategy whose privacy rests on unpredictable sampling (DP-FedAvg) samples from a secret seed.

        Drawn from ``os.urandom`` on rank 0 and shared with every process, so all agree on each
        round's clients; never in the config or the checkpoint (a resumed run draws a new one).
        """
        if not self.server.strategy.needs_secret_sampling:
            return
        secret = int.from_bytes(os.urandom(8), "little") >> 1
        secret = self.gather(secret)[0]
        self._federation = replace(self.federation, sampling_seed=secret)
        log.info("client sampling draws from a secret seed (central DP): the config's seed does not say who is sampled")

    @property
    def server(self) -> Server:
        """The run's server, which the server-aggregation callback holds."""
        return self.trainer.aggregation.server

    @property
    def num_rounds(self) -> int:
        """The run's number of rounds (Lightning's ``max_epochs``)."""
        return self.max_epochs

    @property
    @override
    def done(self) -> bool:
        if self.epoch_progress.current.processed >= self.max_epochs:
            self.epoch_progress.current.completed = self.epoch_progress.current.processed
            return True
        return self.trainer.should_stop

    @override
    def run(self) -> None:
        """The federated run: the rounds, each one Lightning epoch, until ``num_rounds`` or a stop."""
        self._federation = None  # this fit's data module says how many clients there are
        self._check_setup()
        if self.done:
            return
        self._resume_at_round_boundary()
        with self._attacked_data(), self._cached_features(), self._kept_evaluation_split():
            self.on_run_start()
            self._secret_sampling()
            self._federated(
                "on_federation_start",
                lambda cb, t, m: cb.on_federation_start(t, m, self.federation),
                lambda m: m.on_federation_start(self.federation),
            )
            while not self.done:
                try:
                    self.on_advance_start()
                    self.advance()
                    self.on_advance_end()
                finally:
                    self.on_iteration_done()
            self.on_run_end()

    @contextmanager
    def _attacked_data(self) -> Iterator[None]:
        """The run's attack (:mod:`fedpeft_pl.attacks`) draws its malicious clients; one that poisons data serves
        their training samples poisoned, to every runner and to the feature cache, until the run ends. The attack's
        own test sets (a backdoor's triggered images) are made from the server's test images here."""
        # a deployed client's one-client fit has no server: its SuperNode plays its attack itself (deploy/flower.py)
        servers = [c.server for c in self.trainer.callbacks if isinstance(c, ServerAggregation)]
        attack = servers[0].attack if servers else None
        datamodule = self.context.datamodule
        splits = getattr(datamodule, "splits", None)
        if attack is None or splits is None:
            yield
            return
        attack.setup(self.federation, splits.num_classes)
        self.server.attack_sets = attack.evaluation_sets(splits.test)
        if not attack.poisons_data or not attack.malicious:
            yield
            return
        owners = PoisonedData.owners_of(datamodule.client_indices, attack.malicious)
        clean = datamodule.use_splits(replace(splits, train=PoisonedData(splits.train, attack, owners)))
        try:
            yield
        finally:
            datamodule.use_splits(clean)

    @contextmanager
    def _cached_features(self) -> Iterator[None]:
        """Linear probing: the run's images through the backbone once, then the classifier on their
        features (:mod:`fedpeft_pl.runners.feature_cache`); the images, and the plain forward, come back after."""
        trainer = self.trainer
        elsewhere = None
        if not isinstance(self.runner, (SequentialRunner, VectorizedRunner)):
            elsewhere = f"clients train on the {type(self.runner).__name__}, not in this process"
        elif trainer.world_size > 1:
            elsewhere = "several processes (DDP) would each compute every image's features; not supported yet"
        context = self.context
        module, datamodule = context.module, context.datamodule
        features = self.feature_cache.features_for(
            module, datamodule, context.device, context.precision_plugin, elsewhere
        )
        if features is None:
            yield
            return
        val_loop = self.epoch_loop.val_loop
        eval_batch_size = datamodule.eval_batch_size
        runner, choice = self.runner, self.choice
        splits = datamodule.splits
        assert splits is not None, "the features were computed from the data module's splits"
        images = datamodule.use_splits(replace(splits, train=features[0], test=features[1]))
        try:
            val_loop._combined_loader = None  # the server evaluates on the test features (reloaded at first use)
            module.takes_features = True
            limit = trainer.limit_val_batches
            if isinstance(limit, float) and limit == 1.0:
                # evaluating a classifier on features costs Lightning's per-batch machinery, not
                # arithmetic: the test features go through in batches of FEATURE_EVAL_BATCH (the same
                # metrics up to float rounding); kept as it is where limit_val_batches counts batches
                datamodule.eval_batch_size = max(eval_batch_size, FEATURE_EVAL_BATCH)
            # a classifier on features: where the sequential runner would train, the choice says which instead
            swapped = choice.with_cached_features() if isinstance(runner, SequentialRunner) else None
            if swapped is not None:
                self.use_choice(swapped)
            yield
        finally:
            module.takes_features = False
            datamodule.eval_batch_size = eval_batch_size
            datamodule.use_splits(images)
            val_loop._combined_loader = None
            self.runner, self.choice = runner, choice

    @contextmanager
    def _kept_evaluation_split(self) -> Iterator[None]:
        """The server's test split transformed once for the run and kept as tensors (with the vectorised runner on
        the device, where ``trainer.device_data_max_gib`` leaves room beside its training samples; else in host
        memory within the bound), so each round's evaluation gathers rows instead of running every image's
        transforms again (:meth:`~fedpeft_pl.runners.device_data.DeviceData.evaluation`); the split as it was
        comes back after."""
        trainer = self.trainer
        data = self.device_data
        datamodule = trainer.datamodule
        splits = getattr(datamodule, "splits", None)
        if (
            data is None
            or splits is None
            or not trainer.enable_validation
            or getattr(trainer.lightning_module, "takes_features", False)  # the test split is features already
            or not len(splits.test)
            # an evaluation that reads part of the split: transforming all of it once would cost more
            or not (isinstance(trainer.limit_val_batches, float) and trainer.limit_val_batches == 1.0)
        ):
            yield
            return
        # on the training device beside the vectorised runner's samples, within its bound; in host memory for the
        # sequential runner, whose device memory trainer.device_data_max_gib has never claimed
        vectorised = isinstance(self.runner, VectorizedRunner)
        device = trainer.strategy.root_device if vectorised else torch.device("cpu")
        reserved = data.planned_bytes(splits.train, device) if vectorised else 0
        kept = data.evaluation(
            splits.test,
            device,
            reserved,
            num_workers=datamodule.num_workers,
            batch_size=datamodule.eval_batch_size,
        )
        if kept is splits.test:
            yield
            return
        val_loop = self.epoch_loop.val_loop
        served = datamodule.use_splits(replace(splits, test=kept))
        val_loop._combined_loader = None
        try:
            yield
        finally:
            datamodule.use_splits(served)
            val_loop._combined_loader = None

    def _check_setup(self) -> None:
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                if callback._every_n_train_steps or callback._train_time_interval:
                    raise ConfigError(
                        "ModelCheckpoint must save at round ends only; remove every_n_train_steps and "
                        "train_time_interval"
                    )
                callback._save_on_train_epoch_end = True
        model = self.trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and model.broadcast_buffers:
            if any(True for _ in model.module.buffers()):
                # DDP would broadcast buffers in every forward: a collective that processes training
                # different clients for different numbers of steps would not all reach
                raise ConfigError(
                    "this model has buffers, which DDP would broadcast on every forward while the processes "
                    "train different clients; remove broadcast_buffers: true from trainer.strategy"
                )
        module = self.trainer.lightning_module
        privacy = getattr(module, "privacy", None)
        check_run(
            RunParts(
                peft=getattr(module, "peft", None),
                strategy=self.server.strategy,
                upload=self.server.upload,
                privacy=(privacy,) if privacy is not None else (),
                clock=self.server.clock,
                schedule=self.server.schedule,
                live=isinstance(self.runner, LiveRunner),
                attack=self.server.attack,
                secure_aggregation=bool(getattr(self.runner, "secure_aggregation", False)),
            )
        )
        schedule = self.server.schedule
        if schedule is not None:
            name = type(schedule).__name__
            if self.trainer.world_size > 1:
                raise ConfigError(f"trainer.schedule {name} runs in one process; DDP is not supported with it yet")
            live = isinstance(self.runner, LiveRunner)
            if live and not isinstance(schedule, FedBuff):
                raise ConfigError(
                    f"trainer.schedule {name} is simulated on the virtual clock; a deployment runs FedBuff and "
                    "FedAsync in real time, synchronous rounds with a deadline not yet"
                )
            if not live and not isinstance(self.runner, (SequentialRunner, VectorizedRunner)):
                raise ConfigError(
                    f"trainer.schedule {name} is simulated in one process; the {type(self.runner).__name__} "
                    "does not run it"
                )
            schedule.check(self.federation.num_clients, self.federation.clients_per_round)

    def _resume_at_round_boundary(self) -> None:
        progress = self.epoch_progress
        if self.restarting:
            if progress.current.processed != progress.current.started:
                raise ConfigError(
                    "this checkpoint was written in the middle of a round; resume from a round-end checkpoint such as "
                    "last.ckpt"
                )
            progress.current.completed = progress.current.processed
            progress.total.completed = progress.total.processed
        self.restarting = False

    @override
    def on_save_checkpoint(self) -> dict:
        state = super().on_save_checkpoint()
        state["rng"] = _rng_state()
        state["client_states"] = self.client_states.state_dict()
        state["timeline"] = self.timeline.state_dict()
        return state

    @override
    def on_load_checkpoint(self, state_dict: dict) -> None:
        super().on_load_checkpoint(state_dict)
        if "rng" in state_dict:
            _set_rng_state(state_dict["rng"])
        self.client_states.load_state_dict(state_dict.get("client_states", {}))
        if "timeline" in state_dict:
            self.timeline.load_state_dict(state_dict["timeline"])

    @override
    def on_advance_start(self) -> None:
        trainer = self.trainer
        self.epoch_progress.increment_ready()
        call._call_callback_hooks(trainer, "on_train_epoch_start")
        call._call_lightning_module_hook(trainer, "on_train_epoch_start")
        self.epoch_progress.increment_started()

    def plan_round(self, number: int, clients: Optional[list[int]] = None) -> Round:
        """Round ``number``: its sampled clients (or the given ones), their plans and this process's share."""
        federation = self.federation
        if clients is None:
            clients = self.server.strategy.draw_clients(federation, number, federation.clients_per_round)
        plans = {c: self._plan(number, c) for c in clients}
        share = clients[self.trainer.global_rank :: self.trainer.world_size]
        return Round(number, tuple(clients), plans, tuple(share))

    def _plan(self, number: int, client: int) -> Plan:
        """``client``'s availability in round (server update) ``number``: dropped, or how many local batches."""
        federation = self.federation
        planned = federation.local_epochs * self.trainer.datamodule.client_num_batches(client)
        return self.availability.plan(federation.seed, number, client, planned)

    @override
    def advance(self) -> None:
        """One communication round (one server update)."""
        schedule = self.server.schedule
        if isinstance(schedule, FedBuff):
            if isinstance(self.runner, LiveRunner):
                self._advance_live(schedule, self.runner)
            else:
                self._advance_buffered(schedule)
            return
        number = self.epoch_progress.current.processed + 1
        cohort = None
        if isinstance(schedule, Synchronous):  # over-selection: more clients than the round needs
            federation = self.federation
            size = schedule.cohort(federation.clients_per_round, federation.num_clients)
            cohort = self.server.strategy.draw_clients(federation, number, size)
        round = self.plan_round(number, cohort)
        self._start_round(round)
        round = replace(round, message=self.server.configure(round))
        failures: list[BaseException] = []
        steps_before = self.trainer.global_step
        held: list[ClientResult] = []
        for result in self.runner.run(round):
            self.report(round, result)
            if result.error is not None:
                failures.append(result.error)
            elif schedule is not None and result.ok:
                held.append(result)
        if isinstance(schedule, Synchronous):
            self._close_round(round, schedule, held)
        self.epoch_loop.check_sigterm()
        failed = sum(self.gather(len(failures)))
        if self.trainer.world_size > 1:
            for part in self.gather(self.client_states.of(round.share)):
                self.client_states.update(part)
            # every process counts every process's steps: the global step is one process's, and the
            # round checkpoint, which Lightning skips where the global step did not move and which
            # waits for every process, is written by all or by none
            mine = self.trainer.global_step - steps_before
            self.count_steps(sum(self.gather(mine)) - mine)
        self._federated(
            "on_round_gather",
            lambda cb, t, m: cb.on_round_gather(t, m, round, self.gather),
            lambda m: m.on_round_gather(round, self.gather),
        )
        if failed and failed == len(round.clients):
            raise RuntimeError(
                f"all {len(round.clients)} clients of round {round.number} failed; the first error is above"
            ) from (failures[0] if failures else None)
        self._federated("on_round_end", lambda cb, t, m: cb.on_round_end(t, m, round), lambda m: m.on_round_end(round))
        if self._should_evaluate(round.number):
            self._evaluate()
            # a client's accuracy on its own test split is an un-noised figure of its data: not in a private run
            if getattr(self.trainer.datamodule, "has_client_tests", False) and releases_client_statistics(self.trainer):
                self._evaluate_clients(round)

    def _start_round(self, round: Round) -> None:
        self._federated(
            "on_round_start", lambda cb, t, m: cb.on_round_start(t, m, round), lambda m: m.on_round_start(round)
        )

    def _close_round(self, round: Round, schedule: Synchronous, held: list[ClientResult]) -> None:
        """Which replies count: the first ``clients_per_round`` to arrive on the clock, before the deadline.

        Each reply's task time is its download, its samples and its actual upload (as without a
        schedule); the rest arrived late, and their work is discarded and counted.
        """
        server = self.server
        arrivals = {
            result.client: server.task_seconds(round, result.client, result.num_samples, server.upload_size(result))
            for result in held
        }
        kept, ends = schedule.on_time(arrivals, self.federation.clients_per_round)
        on_time = set(kept)
        device = self.trainer.lightning_module.device
        for result in held:  # in the round's order, as without a schedule, so the same replies give the same bits
            if result.client in on_time:
                server.accept(round, result, device)
            else:
                server.late(round, result)
        server.pending.ends = ends

    def _advance_buffered(self, schedule: FedBuff) -> None:
        """One server update of a buffered asynchronous run (FedBuff, FedAsync), on the virtual clock.

        Free slots are filled with idle clients from the newest version as the clock reaches each
        arrival; the clients dispatched during this update train together, through the runner, from
        that version; the first ``buffer_size`` usable replies to arrive are handed to the server in
        arrival order, weighted by their staleness, and the server updates. Replies that arrive later
        stay in flight (trained, their results kept) for a later update.
        """
        server, federation = self.server, self.federation
        datamodule = self.trainer.datamodule
        timeline = self.timeline
        timeline.new_version()
        number = self.epoch_progress.current.processed + 1
        message = server.configure(Round(number, (), {}, ()))
        seed = federation.seed if federation.sampling_seed is None else federation.sampling_seed
        metrics_like = {"train_loss": 0.0, "steps": 0.0} if releases_client_statistics(self.trainer) else {"steps": 0.0}
        started = timeline.now
        dispatched: list[Task] = []
        dropped: list[int] = []
        plans: dict[int, Plan] = {}

        def fill() -> None:
            while len(timeline) < schedule.concurrency:
                client = timeline.draw(seed, federation.num_clients)
                if client is None:
                    return
                plan = self._plan(number, client)
                plans[client] = plan
                if plan.dropped:  # unavailable when its turn came: sent nothing, and another is drawn
                    dropped.append(client)
                    continue
                one = Round(number, (client,), {client: plan}, (client,), message)
                samples = datamodule.client_num_samples(client)
                upload = server.reply_size(one, client, samples, metrics_like)
                seconds = server.task_seconds(one, client, samples, upload)
                now = timeline.now
                task = Task(client, message.version, number, timeline.sequence, now, now + seconds, plan)
                timeline.push(task)
                dispatched.append(task)

        buffer: list[Task] = []
        round: Optional[Round] = None
        trained = 0
        needed = schedule.buffer_size
        failures: list[BaseException] = []
        while True:
            while len(buffer) < needed:
                fill()
                if not len(timeline):
                    break
                buffer.append(timeline.pop())
            if round is None:
                clients = tuple(t.client for t in dispatched) + tuple(dropped)
                round = Round(number, clients, dict(plans), clients, message)
                self._start_round(round)
                for client in dropped:
                    self.report(round, ClientResult(client, dropped=UNAVAILABLE, received=False))
            fresh = dispatched[trained:]
            trained = len(dispatched)
            if fresh:
                share = tuple(t.client for t in fresh)
                batch = Round(number, share, {c: plans[c] for c in share}, share, message)
                by_client = {t.client: t for t in fresh}
                for result in self.runner.run(batch):
                    by_client[result.client].result = result
                    server.count_download(batch, result)  # sent now; the reply may arrive in a later update
                    self.report(batch, result)
                    if result.error is not None:
                        failures.append(result.error)
            usable = sum(1 for t in buffer if t.result is not None and t.result.ok)
            if usable >= schedule.buffer_size or not len(timeline):
                break
            needed = len(buffer) + schedule.buffer_size - usable  # some replies failed: wait for more
        device = self.trainer.lightning_module.device
        for task in buffer:  # in arrival order
            result = task.result
            if result is not None and result.ok:
                server.accept(task.round(), result, device)
        server.pending.ends = timeline.now - started
        server.in_flight = frozenset(timeline.versions())
        if failures and not any(t.result is not None and t.result.ok for t in buffer):
            raise RuntimeError(
                f"server update {number}: every client that replied failed; the first error is above"
            ) from failures[0]
        self._federated("on_round_end", lambda cb, t, m: cb.on_round_end(t, m, round), lambda m: m.on_round_end(round))
        if self._should_evaluate(number):
            self._evaluate()
            if getattr(self.trainer.datamodule, "has_client_tests", False) and releases_client_statistics(self.trainer):
                self._evaluate_clients(round)

    def _advance_live(self, schedule: FedBuff, runner: LiveRunner) -> None:
        """One server update of FedBuff or FedAsync on a deployment, in real time.

        ``concurrency`` tasks stay in flight through the runner (a Flower Grid): a slot freed by a
        reply is filled at once, with the newest version; replies are pulled as they arrive and the
        server updates once ``buffer_size`` usable ones are in, weighted by their staleness as in a
        simulation. A task unanswered after the runner's ``reply_timeout`` has failed (its node went
        away); a reply to a task this server did not send (an earlier incarnation's) or one already
        taken is left out by the runner. Replies pulled beyond a full buffer start the next one.
        Nothing is simulated: there is no clock, and the clients' own speeds decide the order.
        """
        server, federation = self.server, self.federation
        timeline, live = self.timeline, self.live
        timeline.new_version()
        number = self.epoch_progress.current.processed + 1
        message = server.configure(Round(number, (), {}, ()))
        round = Round(number, (), {}, (), message)
        self._start_round(round)
        seed = federation.seed if federation.sampling_seed is None else federation.sampling_seed
        buffer, self._carried = self._carried, []

        def fill() -> None:
            busy = {task.client for task in live.values()}
            while len(live) < schedule.concurrency:
                client = timeline.draw(seed, federation.num_clients, busy)
                if client is None:
                    return
                plan = self._plan(number, client)
                one = Round(number, (client,), {client: plan}, (client,), message)
                if plan.dropped:  # unavailable when its turn came: sent nothing
                    self.report(one, ClientResult(client, dropped=UNAVAILABLE, received=False))
                    continue
                sent = runner.dispatch(one, client)
                if isinstance(sent, ClientResult):  # not connected, or it declined: nothing in flight
                    self.report(one, sent)
                    continue
                now = time.monotonic()
                live[sent] = Task(
                    client, message.version, number, timeline.sequence, now, now + runner.reply_timeout, plan
                )
                busy.add(client)
                server.count_download(one, ClientResult(client, version=message.version))

        while len(buffer) < schedule.buffer_size:
            fill()
            if not live:
                break
            arrived = runner.collect(list(live))
            for task_id, result in arrived:
                task = live.pop(task_id, None)
                if task is None:
                    continue
                result.version = task.version
                own = task.round()
                timeline.fresh.add(task.client)  # not sent out again before this update
                if result.ok:
                    self.count_steps(int(result.metrics.get("steps", 0)))
                self.report(own, result)
                if result.ok:
                    (buffer if len(buffer) < schedule.buffer_size else self._carried).append((own, result))
            now = time.monotonic()
            for task_id, task in list(live.items()):
                if now > task.arrival:  # no reply in time: its node went away with the task
                    del live[task_id]
                    error = RuntimeError(f"no reply within {runner.reply_timeout:g} s")
                    self.report(task.round(), ClientResult(task.client, error=error, version=task.version))
            if not arrived:
                time.sleep(0.01)
        device = self.trainer.lightning_module.device
        for own, result in buffer:  # in arrival order
            server.accept(own, result, device)
        # the versions clients are still working from, and those of replies that wait for the next buffer
        waiting = {result.version for _, result in self._carried if result.version is not None}
        server.in_flight = frozenset({task.version for task in live.values()} | waiting)
        self._federated("on_round_end", lambda cb, t, m: cb.on_round_end(t, m, round), lambda m: m.on_round_end(round))
        if self._should_evaluate(number):
            self._evaluate()

    def _evaluate_clients(self, round: Round) -> None:
        """Every client on its own test split (this process's share of them), then the summary to the server."""
        clients = list(range(self.federation.num_clients))[self.trainer.global_rank :: self.trainer.world_size]
        mine = list(self.runner.evaluate(round, clients))
        everyone = [evaluation for part in self.gather(mine) for evaluation in part]
        self.server.record_client_evaluations(sorted(everyone, key=lambda e: e.client))

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order (``[obj]`` in a single process)."""
        if self.trainer.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    # -- what runners call ----------------------------------------------------------------------

    def start_client(self, round: Round, client: int) -> Optional[ClientResult]:
        """``on_client_start``, then availability: None if the client takes part, else its dropped result."""
        try:
            self._federated("on_client_start", lambda cb, t, m: cb.on_client_start(t, m, round, client), None)
        except ClientDropped as reason:
            return ClientResult(client, dropped=str(reason), received=False)
        if round.plans[client].dropped:  # unavailable when its round came: it is sent nothing
            return ClientResult(client, dropped=UNAVAILABLE, received=False)
        return None

    def open_session(
        self, round: Round, client: int, like: dict[str, torch.Tensor], local_init: dict[str, torch.Tensor]
    ) -> ClientSession:
        """The client's side of ``round``: the decoded message, its strategy hooks and its own stored state."""
        server = self.server
        assert round.message is not None, "the server configures the round before clients run"
        return open_session(
            server.strategy,
            server.upload,
            server.download,
            round.message,
            client,
            round.number,
            like,
            self.client_states.get(client),
            local_init,
            getattr(self.trainer.lightning_module, "peft", None),
            attack=server.attack,
        )

    def close_session(self, session: ClientSession) -> None:
        """Keep the client's own state for the next round it takes part in."""
        self.client_states.put(session.client, session.context.state)

    def report(self, round: Round, result: ClientResult) -> None:
        """Hand one client's result to the hooks."""
        if result.dropped is not None:
            log.info(
                f"round {round.number}: client {result.client} takes no part: {result.dropped}",
                extra={"each_process": True},
            )
            self._federated("on_client_dropped", lambda cb, t, m: cb.on_client_dropped(t, m, round, result), None)
        elif result.error is not None:
            log.warning(
                f"round {round.number}: client {result.client} failed and is left out of this round: "
                f"{type(result.error).__name__}: {result.error}",
                extra={"each_process": True},
            )
            self._federated("on_client_failed", lambda cb, t, m: cb.on_client_failed(t, m, round, result), None)
        else:
            self._federated("on_client_end", lambda cb, t, m: cb.on_client_end(t, m, round, result), None)

    def count_steps(self, steps: int) -> None:
        """Optimizer steps that clients took on other machines (a Flower deployment), counted as Lightning
        counts this process's own: ``trainer.global_step`` advances as in a simulation, and with it
        Lightning's checkpoint trigger, which skips a round whose global step did not move."""
        if steps <= 0:
            return
        if self.trainer.lightning_module.automatic_optimization:
            progress = self.epoch_loop.automatic_optimization.optim_progress.optimizer.step
        else:
            progress = self.epoch_loop.manual_optimization.optim_step_progress
        progress.total.ready += steps
        progress.total.completed += steps

    def no_gradient_sync(self) -> Any:
        """Under DDP every process trains other clients, so their gradients must not be averaged."""
        model = self.trainer.strategy.model
        return model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else nullcontext()

    def train_local(
        self, round_number: int, client: int, max_batches: int, session: Optional[ClientSession] = None
    ) -> None:
        """Local training for ``local_epochs`` epochs, stopping after ``max_batches`` batches (stragglers).

        A fresh optimizer from the module's ``configure_optimizers``; data order and the torch
        seed (dropout, drop path) derive from ``(seed, round, client)``. A personalised method
        with FedRep's schedule first trains its local part alone for its own epochs (with its own
        fresh optimizer), then the shared part alone; the step cap applies to the shared part.
        """
        trainer = self.trainer
        module = trainer.lightning_module
        seed = self.federation.seed
        loader = trainer.datamodule.client_dataloader(client, client_seed(seed, round_number, client))
        device = trainer.strategy.root_device
        rng_devices = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        local_first = module.local_first_epochs
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(training_seed(seed, round_number, client))
            if local_first:
                names = module.local_names
                with module.training_only(names):
                    self._epochs(loader, local_first, local_first * len(loader), session)
                shared = [n for n in trainable_state(module) if n not in names]
                with module.training_only(shared):
                    self._epochs(loader, self.federation.local_epochs, max_batches, session)
            else:
                self._epochs(loader, self.federation.local_epochs, max_batches, session)

    def _epochs(self, loader: Any, epochs: int, max_batches: int, session: Optional[ClientSession]) -> None:
        trainer = self.trainer
        trainer.strategy.setup_optimizers(trainer)  # a fresh optimizer for every client (and phase)
        if session is not None and trainer.optimizers:
            session.context.lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        remaining = max_batches
        for _ in range(epochs):
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

    # -- evaluation and hooks -------------------------------------------------------------------

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

    def _federated(
        self,
        label: str,
        on_callback: Callable[[FederatedCallback, pl.Trainer, pl.LightningModule], None],
        on_module: Optional[Callable[[FederatedHooks], None]],
    ) -> None:
        """Call a federated hook on every FederatedCallback, then on the module if it has federated hooks."""
        trainer = self.trainer
        module = trainer.lightning_module
        for callback in trainer.callbacks:
            if isinstance(callback, FederatedCallback):
                with trainer.profiler.profile(f"[Callback]{callback.state_key}.{label}"):
                    on_callback(callback, trainer, module)
        if on_module is not None and isinstance(module, FederatedHooks):
            with trainer.profiler.profile(f"[LightningModule]{type(module).__name__}.{label}"):
                on_module(module)


class _LoopContext:
    """The run as a runner sees it (:class:`~fedpeft_pl.runners.base.RunnerContext`): read from the loop's
    trainer when asked, so the runners never hold the trainer."""

    def __init__(self, loop: FederatedLoop) -> None:
        self._loop = loop

    @property
    def _trainer(self) -> RoundTrainer:
        return self._loop.trainer

    @property
    def module(self) -> FedPEFTModule:
        return cast("FedPEFTModule", self._trainer.lightning_module)

    @property
    def datamodule(self) -> FederatedDataModule:
        return self._trainer.datamodule

    @property
    def device(self) -> torch.device:
        return self._trainer.strategy.root_device

    @property
    def precision(self) -> str:
        return str(self._trainer.precision)

    @property
    def precision_plugin(self) -> Precision:
        return self._trainer.precision_plugin

    def forward_context(self) -> AbstractContextManager[Any]:
        return self._trainer.precision_plugin.forward_context()

    @property
    def choice(self) -> RunnerChoice:
        return self._loop.choice

    @property
    def device_data(self) -> Optional[DeviceData]:
        return self._loop.device_data

    @property
    def releases_client_statistics(self) -> bool:
        return releases_client_statistics(self._trainer)

    @property
    def clients_train_privately(self) -> bool:
        return any(isinstance(c, PrivacyMechanism) and c.reports_from_clients for c in self._trainer.callbacks)

    @property
    def privacy(self) -> Optional[LocalDP]:
        return self._trainer.privacy

    @property
    def callbacks(self) -> Sequence[Callback]:
        return self._trainer.callbacks

    @property
    def gradient_clip_val(self) -> Optional[Union[int, float]]:
        return self._trainer.gradient_clip_val

    @property
    def accumulate_grad_batches(self) -> int:
        return self._trainer.accumulate_grad_batches

    def keep_in_checkpoints(self, callback: Callback) -> None:
        self._trainer.callbacks.append(callback)


class _ClientJob(FederatedLoop):
    """One given client of one given round, and nothing else: what a deployed client runs per message.

    It trains exactly as that client would inside a simulation (the same seeds, data order,
    fresh optimizer and step cap), so a deployment reaches the simulation's state.
    """

    def __init__(self, parent: FederatedLoop, session: ClientSession, max_batches: Optional[int]) -> None:
        super().__init__(
            parent.trainer,
            {**parent.settings, "num_rounds": 1},
            parent.availability,
            device_data=parent.device_data,
            choice=parent.choice,
        )
        self.session = session
        self.job_batches = max_batches

    @override
    def _check_setup(self) -> None:
        pass

    @override
    def _secret_sampling(self) -> None:
        pass  # a deployed client samples no one; the server does

    @override
    def _cached_features(self) -> Any:
        return nullcontext()  # one client of one round: each image is seen once or a few times

    @override
    def advance(self) -> None:
        module = self.trainer.lightning_module
        client = self.session.client
        max_batches = self.job_batches
        if max_batches is None:
            max_batches = self.federation.local_epochs * self.trainer.datamodule.client_num_batches(client)
        module.begin_client(self.session)
        try:
            self.train_local(self.session.context.server_round, client, max_batches, self.session)
        finally:
            module.end_client()


def _rng_state() -> dict[str, Any]:
    """Every global RNG's state, in types that ``torch.load(weights_only=True)`` accepts."""
    legacy = np.random.get_state()
    assert isinstance(legacy, tuple), "numpy gives its legacy state tuple by default"
    kind, keys, position, has_gauss, cached = legacy
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
