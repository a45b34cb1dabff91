"""The server as Lightning sees it: a thin callback over :class:`~fedpeft_pl.server.Server`.

The server itself (global state and its versions, the round's message, accepting replies,
aggregating through the strategy, counting bytes, its state for a checkpoint) is plain torch in
:mod:`fedpeft_pl.server`; this callback calls it from the loop's hooks, keeps a personalised
method's local part out of the global state, and logs each round. The aggregation algorithms live
in :mod:`fedpeft_pl.strategies`; what a client does with the message in :mod:`fedpeft_pl.exchange`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Optional

import lightning.pytorch as pl
from typing_extensions import override

from fedpeft_pl.attacks import Attack
from fedpeft_pl.clock import VirtualClock, format_seconds
from fedpeft_pl.comm import MIB, WireCounter
from fedpeft_pl.compression import Codec
from fedpeft_pl.federation import ClientEvaluation, ClientResult, Federation, Round, RoundMessage, State
from fedpeft_pl.hooks import FederatedCallback
from fedpeft_pl.peft import PEFTMethod, load_trainable_state, local_names, shared_state, trainable_state
from fedpeft_pl.privacy import releases_client_statistics
from fedpeft_pl.schedules import Schedule, staleness_summary
from fedpeft_pl.server import Server
from fedpeft_pl.strategies import Strategy

log = logging.getLogger(__name__)


class ServerAggregation(FederatedCallback):
    """The server: configures each round, collects results, aggregates, and logs each round.

    Logged per round (TensorBoard step = round): ``comm/bytes_down``, ``comm/bytes_up``,
    ``comm/cumulative_bytes`` (tensor-element bytes, the paper's unit), ``comm/wire_bytes_down``,
    ``comm/wire_bytes_up`` (the messages as Flower serialises them, with Flower installed; see
    :mod:`fedpeft_pl.comm`), ``server/acc``, ``server/loss``, ``train/loss`` (the clients'
    mean training loss, weighted by their sample counts; not in a private run),
    ``round/clients_aggregated``, ``round/clients_dropped``, ``round/clients_failed``,
    ``round/stragglers``, ``round/seconds`` and any ``round_metrics()`` of the strategy; with
    per-client test splits (``data.client_test_fraction``) also ``clients/acc_mean`` (weighted
    by test samples), ``clients/acc_mean_unweighted``, ``clients/acc_p10`` (the worst decile),
    ``clients/acc_std`` and ``clients/loss_mean``; and
    ``server/acc_vs_cumulative_bytes`` whose step is the cumulative number of bytes sent so far
    in both directions. Loggers are flushed every round, before the round's checkpoint. The
    ``comm/*`` and ``round/*`` values are also logged through Lightning (``logger=False``), so
    ``trainer.callback_metrics`` holds them and EarlyStopping or ModelCheckpoint can monitor them.

    Every client that receives the round's message counts its encoded global state (and any
    strategy extras) as sent down; a client that availability drops is sent nothing, as in a
    deployment. A client that finishes sends its encoded update (its state minus the state it
    received) and any extras. An update that holds NaN or Inf is left out with a warning naming
    the client and the tensor. If fewer than ``strategy.min_clients`` updates arrive, the round
    is skipped and the state stays.

    Where the PEFT method gives each client its own view of the state (heterogeneous LoRA ranks,
    :meth:`~fedpeft_pl.peft.PEFTMethod.client_view`), each client's download and upload are
    counted at its own view (its own rank), plus what the method says a client receives besides
    (FLoRA's merged update); wire bytes are not measured then.

    Args:
        strategy: the aggregation strategy; FedAvg by default.
        upload: codec for the clients' updates; none by default.
        download: codec for the global state sent to clients; none by default.
        clock: simulated time of each client task (:class:`~fedpeft_pl.clock.VirtualClock`): the
            round's ``time/round_seconds`` (its last client's arrival), ``time/simulated_seconds``
            and ``server/acc_vs_simulated_seconds`` (step: whole simulated seconds); none by default.
        schedule: when the server updates (:mod:`fedpeft_pl.schedules`): synchronous rounds with
            over-selection and a deadline (``round/clients_late``, ``comm/bytes_late``), or FedBuff and
            FedAsync (``async/staleness_mean``, ``async/staleness_max``); every round waits for all of
            its clients by default. Needs a clock.
        attack: clients that lie (:mod:`fedpeft_pl.attacks`): ``attack/malicious_updates``,
            ``attack/malicious_weight``, ``attack/tpr`` and ``attack/fpr`` per round, and a backdoor's
            ``attack/success_rate`` with each evaluation; none by default.
    """

    def __init__(
        self,
        strategy: Optional[Strategy] = None,
        upload: Optional[Codec] = None,
        download: Optional[Codec] = None,
        clock: Optional[VirtualClock] = None,
        schedule: Optional[Schedule] = None,
        attack: Optional[Attack] = None,
    ) -> None:
        self.server = Server(strategy, upload, download, clock, schedule, attack)
        self._local_init: State = {}
        self._round_started = 0.0
        self._sampled = 0
        self._stragglers = 0

    # the server's parts, as callers have named them
    @property
    def strategy(self) -> Strategy:
        """The server's strategy."""
        return self.server.strategy

    @property
    def upload(self) -> Codec:
        """The codec of the clients' updates."""
        return self.server.upload

    @property
    def download(self) -> Codec:
        """The codec of the global state sent to clients."""
        return self.server.download

    @property
    def wire(self) -> WireCounter:
        """The counter of the bytes of the messages as Flower would send them."""
        return self.server.wire

    @property
    def global_state(self) -> State:
        """The server's global trainable state."""
        return self.server.global_state

    @property
    def cumulative_bytes(self) -> int:
        """Bytes moved since the start of the run, both directions."""
        return self.server.cumulative_bytes

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # checkpoints are written only at round ends, when the module holds the global state; a
        # personalised method's local part never reaches the server: the module keeps its initial values
        local = local_names(pl_module)
        self._local_init = {n: t for n, t in trainable_state(pl_module).items() if n in local}
        peft = getattr(pl_module, "peft", None)
        self.server.start(shared_state(pl_module), peft if isinstance(peft, PEFTMethod) else None)

    @override
    def on_federation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, federation: Federation) -> None:
        self.server.setup(federation)

    @override
    def on_round_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round) -> None:
        self._round_started = time.perf_counter()
        self._sampled = len(round.clients)
        self._stragglers = round.stragglers
        self.server.begin()

    def configure_round(self, round: Round) -> RoundMessage:
        """The message every sampled client of ``round`` receives: encoded state, config, extras."""
        return self.server.configure(round)

    @override
    def on_client_dropped(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        self.server.dropped(round, result)

    @override
    def on_client_failed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        self.server.failed(round, result)

    @override
    def on_client_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        if self.server.schedule is None:  # under a schedule the loop hands over replies that count, as they arrive
            self.server.accept(round, result, pl_module.device)

    @override
    def on_round_gather(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, gather: Callable[[Any], list[Any]]
    ) -> None:
        if trainer.world_size > 1:
            self.server.gather(round, gather, pl_module.device)

    @override
    def on_round_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round) -> None:
        self.server.update(round, getattr(pl_module, "model", None))
        load_trainable_state(pl_module, {**self.server.global_state, **self._local_init})

    def record_client_evaluations(self, round: Round, evaluations: list[ClientEvaluation]) -> None:
        """Every client's accuracy on its own test split this round: logged as ``clients/acc_*``."""
        self.server.record_client_evaluations(evaluations)

    @property
    def client_metrics(self) -> dict[str, float]:
        """This round's client metrics so far, each weighted by the reporting clients' sample counts."""
        return self.server.client_metrics

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.server.evaluation.update({k: float(metrics[k]) for k in ("server/acc", "server/loss") if k in metrics})
        self.server.evaluation.update(self._attack_figures(trainer, pl_module))

    def _attack_figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """An attack's own test sets (a backdoor's triggered images) through the global model: their accuracy is the
        attack's figure. On images, also where the run trains the classifier on cached features."""
        sets = self.server.attack_sets
        if not sets or not hasattr(pl_module, "evaluate_on"):
            return {}
        from torch.utils.data import DataLoader

        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        batch_size = getattr(datamodule, "eval_batch_size", 64)
        features = getattr(pl_module, "takes_features", False)
        figures = {}
        try:
            pl_module.takes_features = False  # type: ignore[assignment]
            for name, dataset in sets.items():
                _, result = pl_module.evaluate_on(  # type: ignore[operator]
                    DataLoader(dataset, batch_size=batch_size), trainer.precision_plugin.forward_context()
                )
                if "acc" in result:
                    figures[name] = result["acc"]
        finally:
            pl_module.takes_features = features  # type: ignore[assignment]
        return figures

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        server_round = trainer.current_epoch + 1
        server = self.server
        evaluation = server.evaluation
        metrics: dict[str, float] = {
            "comm/bytes_down": server.pending.bytes["down"],
            "comm/bytes_up": server.pending.bytes["up"],
            "comm/cumulative_bytes": server.cumulative_bytes,
            **server.wire.metrics(),
            "round/clients_aggregated": server.aggregated,
            "round/clients_dropped": server.pending.dropped,
            "round/clients_failed": server.pending.failed,
            "round/stragglers": self._stragglers,
            "round/seconds": time.perf_counter() - self._round_started,
            **(
                {"round/clients_late": server.pending.late, "comm/bytes_late": server.pending.late_bytes}
                if server.schedule is not None and not server.schedule.asynchronous
                else {}
            ),
            **staleness_summary(server.pending.staleness),
            **evaluation,
            **server.strategy.round_metrics(),
            **server.attack_metrics,
        }
        if server.clock is not None:
            metrics["time/round_seconds"] = server.round_seconds
            metrics["time/simulated_seconds"] = server.simulated_seconds
        train_loss = self.client_metrics.get("train_loss")
        if train_loss is None and "train/loss" in trainer.callback_metrics:  # a module that logs its own
            train_loss = float(trainer.callback_metrics["train/loss"])
        if train_loss is not None and releases_client_statistics(trainer):  # un-noised: not in a private run
            metrics["train/loss"] = train_loss
        # through Lightning too (not to its loggers: their step here is the round), so that
        # callback_metrics hold them for EarlyStopping, ModelCheckpoint(monitor=...) and any callback.
        # Under DDP every process holds the same gathered figures, so their maximum is the figure
        # itself (and round/seconds the slowest process's); synced, Lightning does not warn per key.
        pl_module.log_dict(
            {k: float(v) for k, v in metrics.items() if k.startswith(("comm/", "round/"))},
            logger=False,
            sync_dist=True,
            reduce_fx="max",
        )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=server_round)
            if "server/acc" in evaluation:
                logger.log_metrics(
                    {"server/acc_vs_cumulative_bytes": evaluation["server/acc"]}, step=server.cumulative_bytes
                )
                if server.clock is not None:  # its step: whole simulated seconds since the start
                    logger.log_metrics(
                        {"server/acc_vs_simulated_seconds": evaluation["server/acc"]},
                        step=round(server.simulated_seconds),
                    )
            logger.save()
        if trainer.is_global_zero:
            log.info(_round_summary(server_round, trainer.max_epochs, self._sampled, metrics))

    def components(self) -> dict[str, str]:
        """The server's strategy and codecs by setting, as a checkpoint records them for a resume."""
        return self.server.components()

    def check_resume(self, state: dict[str, Any]) -> None:
        """Refuse, before anything is written, a checkpoint's server state that this run cannot continue."""
        self.server.check_resume(state)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.server.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.server.load_state_dict(state_dict)


def _round_summary(server_round: int, num_rounds: int, sampled: int, metrics: dict[str, float]) -> str:
    parts = [f"round {server_round}/{num_rounds}"]
    late = "round/clients_late"
    if "async/staleness_mean" in metrics:  # a buffered asynchronous update: its replies, not a round's clients
        parts.append(
            f"{metrics['round/clients_aggregated']} replies (staleness mean {metrics['async/staleness_mean']:.1f}, "
            f"max {metrics['async/staleness_max']:.0f}), {sampled} dispatched"
        )
    elif metrics["round/clients_aggregated"] < sampled or metrics["round/stragglers"] or metrics.get(late):
        details = [f"{metrics['round/clients_aggregated']}/{sampled} clients aggregated"]
        details += [
            f"{metrics[key]} {word}"
            for key, word in (
                ("round/clients_dropped", "dropped"),
                ("round/clients_failed", "failed"),
                ("round/stragglers", "straggled"),
                ("round/clients_late", "late"),
            )
            if metrics.get(key)
        ]
        parts.append(", ".join(details))
    if "server/acc" in metrics:
        parts.append(f"server acc {metrics['server/acc']:.4f} loss {metrics['server/loss']:.4f}")
    if "train/loss" in metrics:
        parts.append(f"train loss {metrics['train/loss']:.4f}")
    parts.append(
        f"sent {metrics['comm/bytes_down'] / MIB:.3f} MiB down, {metrics['comm/bytes_up'] / MIB:.3f} MiB up"
        f" (total {metrics['comm/cumulative_bytes'] / MIB:.3f} MiB)"
    )
    if "time/round_seconds" in metrics:
        parts.append(
            f"simulated {format_seconds(metrics['time/round_seconds'])} "
            f"(total {format_seconds(metrics['time/simulated_seconds'])})"
        )
    parts.append(f"{metrics['round/seconds']:.1f} s")
    return " | ".join(parts)
