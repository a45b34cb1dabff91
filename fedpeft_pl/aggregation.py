"""The server as a Lightning callback: it holds the global state, configures each round's message,
collects the clients' results, applies the strategy and the codecs, counts every byte that
travels and logs each round. The aggregation algorithms live in :mod:`fedpeft_pl.strategies`;
what a client does with the message lives in :mod:`fedpeft_pl.exchange`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any, Optional

import lightning.pytorch as pl
from typing_extensions import override

from fedpeft_pl.comm import MIB, WireCounter, payload_bytes
from fedpeft_pl.compression import Codec
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.exchange import decode_reply
from fedpeft_pl.federation import (
    ClientEvaluation,
    ClientResult,
    Federation,
    Round,
    RoundMessage,
    State,
    client_accuracy_summary,
    first_non_finite,
    weighted_metrics,
)
from fedpeft_pl.hooks import FederatedCallback
from fedpeft_pl.peft import PerClientViews, load_trainable_state, local_names, shared_state, trainable_state
from fedpeft_pl.privacy import releases_client_statistics
from fedpeft_pl.strategies import ClientUpdate, FedAvg, Strategy

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
    :meth:`~fedpeft_pl.peft.PerClientViews.client_view`), each client's download and upload are
    counted at its own view (its own rank), plus what the method says a client receives besides
    (FLoRA's merged update); wire bytes are not measured then.

    Args:
        strategy: the aggregation strategy; FedAvg by default.
        upload: codec for the clients' updates; none by default.
        download: codec for the global state sent to clients; none by default.
    """

    def __init__(
        self, strategy: Optional[Strategy] = None, upload: Optional[Codec] = None, download: Optional[Codec] = None
    ) -> None:
        self.strategy = strategy if strategy is not None else FedAvg()
        self.upload = upload if upload is not None else Codec()
        self.download = download if download is not None else Codec()
        self.global_state: State = {}
        self._local_init: State = {}
        self.cumulative_bytes = 0
        self._message = RoundMessage({})
        self._received: State = {}
        self._dropped = 0
        self._failed = 0
        self._updates: list[ClientUpdate] = []
        self._reports: list[tuple[int, int, dict[str, float]]] = []  # (client, samples, metrics)
        self._bytes = {"down": 0, "up": 0}
        self._eval: dict[str, float] = {}
        self._client_evaluations: list[tuple[int, int, dict[str, float]]] = []
        self._round_started = 0.0
        self._aggregated = 0
        self._sampled = 0
        self._stragglers = 0
        self.wire = WireCounter()
        self._contributors = 0
        self._peft: Optional[PerClientViews] = None  # set where clients exchange their own views
        self._peft_state: dict[str, Any] = {}  # the method's server state from a checkpoint, until training starts
        self._sent: State = {}
        self._delivered: list[int] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # checkpoints are written only at round ends, when the module holds the global state; a
        # personalised method's local part never reaches the server: the module keeps its initial values
        local = local_names(pl_module)
        self.global_state = shared_state(pl_module)
        self._local_init = {n: t for n, t in trainable_state(pl_module).items() if n in local}
        peft = getattr(pl_module, "peft", None)
        if isinstance(peft, PerClientViews):
            self._peft = peft
            self.wire.enabled = False  # one message layout per client: not measured
            if self._peft_state:
                peft.load_server_state(self._peft_state)
                self._peft_state = {}

    @override
    def on_federation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, federation: Federation) -> None:
        self.strategy.setup(federation)

    @override
    def on_round_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round) -> None:
        self._round_started = time.perf_counter()
        self._sampled = len(round.clients)
        self._stragglers = round.stragglers
        self._updates = []
        self._reports = []
        self._bytes = {"down": 0, "up": 0}
        self._eval = {}
        self._dropped = self._failed = 0
        self._contributors = 0
        self._delivered = []

    def configure_round(self, round: Round) -> RoundMessage:
        """The message every sampled client of ``round`` receives: encoded state, config, extras."""
        state, config = self.strategy.configure_fit(round.number, self.global_state)
        payload = self.download.encode(state)
        self._sent = state
        self._received = self.download.decode(payload, like=state)
        self._message = RoundMessage(
            payload, dict(config), self.strategy.client_extras(round.number, self.global_state)
        )
        self.wire.start_round(payload)
        return self._message

    def _count_download(self, round: Round, result: ClientResult) -> None:
        if result.received:  # a securely aggregated result: each of its clients received the message
            clients = list(result.aggregate_of) or [result.client]
            if self._peft is not None:  # each client its own view, at its own rank
                self._delivered += clients
                for client in clients:
                    view = self._peft.client_view(self._sent, client, round.number, upload=False)
                    self._bytes["down"] += payload_bytes(self.download.encode(view)) + payload_bytes(
                        self._message.extras
                    )
                    self._bytes["down"] += self._peft.pending_download_bytes(client, round.number)
            else:
                size = payload_bytes(self._message.payload) + payload_bytes(self._message.extras)
                self._bytes["down"] += size * len(clients)
            plan = round.plans.get(result.client)
            self.wire.download(
                self._message.config, round.number, result.client, plan.batches if plan else 0, self._message.extras
            )

    @override
    def on_client_dropped(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        self._count_download(round, result)
        self._dropped += 1

    @override
    def on_client_failed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        self._count_download(round, result)
        self._failed += 1

    @override
    def on_client_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, result: ClientResult
    ) -> None:
        self._count_download(round, result)
        if result.payload is None:
            raise RuntimeError(f"round {round.number}: client {result.client} reported success but sent no update")
        # a securely aggregated result stands for that many clients, each of which uploaded an update
        # of this size (in SecAgg+'s masked form; see fedpeft_pl.deploy.secagg for its wire size)
        self._bytes["up"] += (payload_bytes(result.payload) + payload_bytes(result.extras)) * max(
            1, len(result.aggregate_of)
        )
        self.wire.upload(result.payload, result.num_samples, result.metrics, result.extras)
        self._reports.append((result.client, result.num_samples, dict(result.metrics)))
        device = pl_module.device
        payload = {k: v.to(device) for k, v in result.payload.items()}
        state = decode_reply(self.upload, payload, self._received, self._peft, result.client, round.number)
        extras = {k: v.to(device) for k, v in result.extras.items()}
        broken = first_non_finite({**state, **extras})
        if broken is not None:
            log.warning(
                f"round {round.number}: client {result.client} sent NaN or Inf values (in {broken}); "
                "its update is left out of this round",
                extra={"each_process": True},  # only the process that trained the client knows
            )
            return
        self._updates.append(ClientUpdate(result.client, result.num_samples, state, extras, tuple(result.aggregate_of)))
        self._contributors += max(1, len(result.aggregate_of))  # secure aggregation: one mean of several clients

    @override
    def on_round_gather(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, gather: Callable[[Any], list[Any]]
    ) -> None:
        if trainer.world_size == 1:
            return
        mine = {
            "updates": [
                (
                    u.client,
                    u.num_samples,
                    {k: v.cpu() for k, v in u.state.items()},
                    {k: v.cpu() for k, v in u.extras.items()},
                )
                for u in self._updates
            ],
            "reports": self._reports,
            "bytes": self._bytes,
            "wire": self.wire.bytes,
            "dropped": self._dropped,
            "failed": self._failed,
            "upload": self.upload.client_state(list(round.share)),
            "delivered": self._delivered,
        }
        device = pl_module.device
        order = {c: i for i, c in enumerate(round.clients)}
        updates, reports, self._delivered = [], [], []
        self._bytes, self._dropped, self._failed = {"down": 0, "up": 0}, 0, 0
        self.wire.bytes = {"down": 0, "up": 0} if self.wire.bytes is not None else None
        for part in gather(mine):
            updates += [
                ClientUpdate(
                    c, n, {k: v.to(device) for k, v in state.items()}, {k: v.to(device) for k, v in extras.items()}
                )
                for c, n, state, extras in part["updates"]
            ]
            reports += part["reports"]
            self._bytes = {k: self._bytes[k] + part["bytes"][k] for k in self._bytes}
            if self.wire.bytes is not None and part["wire"] is not None:
                self.wire.bytes = {k: v + part["wire"][k] for k, v in self.wire.bytes.items()}
            self._dropped += part["dropped"]
            self._failed += part["failed"]
            self.upload.load_client_state(part["upload"])
            self._delivered += part["delivered"]
        # the order of a single process, so that every process aggregates to the same bits as one would
        self._updates = sorted(updates, key=lambda u: order[u.client])
        self._reports = sorted(reports, key=lambda r: order[r[0]])

    @override
    def on_round_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round) -> None:
        arrived = max(len(self._updates), self._contributors)  # under DDP the gathered updates are all ranks' own
        if arrived >= self.strategy.min_clients:
            self.global_state = self.strategy.aggregate_fit(round.number, self.global_state, self._updates)
            if self._peft is not None:
                self.global_state = self._peft.aggregate(
                    pl_module.model, self.global_state, self._updates, round.number
                )
            self._aggregated = arrived
        else:
            log.warning(
                f"round {round.number}: {arrived} usable update(s) of {self._sampled} sampled clients, fewer than "
                f"min_clients={self.strategy.min_clients}; the round is skipped and the global state is unchanged"
            )
            self._aggregated = 0
        self._updates = []
        if self._peft is not None:
            self._peft.delivered(self._delivered, round.number)
        load_trainable_state(pl_module, {**self.global_state, **self._local_init})
        self.cumulative_bytes += self._bytes["down"] + self._bytes["up"]

    def record_client_evaluations(self, round: Round, evaluations: list[ClientEvaluation]) -> None:
        """Every client's accuracy on its own test split this round: logged as ``clients/acc_*``."""
        self._eval.update(client_accuracy_summary(evaluations))
        # each evaluated client receives the global state: counted apart from the training traffic
        self._eval["comm/bytes_eval_down"] = len(evaluations) * payload_bytes(self.download.encode(self.global_state))
        self._client_evaluations = [(e.client, e.num_samples, dict(e.metrics)) for e in evaluations]

    @property
    def client_metrics(self) -> dict[str, float]:
        """This round's client metrics so far, each weighted by the reporting clients' sample counts."""
        return weighted_metrics(ClientResult(c, n, metrics=m) for c, n, m in self._reports)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self._eval.update({k: float(metrics[k]) for k in ("server/acc", "server/loss") if k in metrics})

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        server_round = trainer.current_epoch + 1
        metrics: dict[str, float] = {
            "comm/bytes_down": self._bytes["down"],
            "comm/bytes_up": self._bytes["up"],
            "comm/cumulative_bytes": self.cumulative_bytes,
            **self.wire.metrics(),
            "round/clients_aggregated": self._aggregated,
            "round/clients_dropped": self._dropped,
            "round/clients_failed": self._failed,
            "round/stragglers": self._stragglers,
            "round/seconds": time.perf_counter() - self._round_started,
            **self._eval,
            **self.strategy.round_metrics(),
        }
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
            if "server/acc" in self._eval:
                logger.log_metrics(
                    {"server/acc_vs_cumulative_bytes": self._eval["server/acc"]}, step=self.cumulative_bytes
                )
            logger.save()
        if trainer.is_global_zero:
            log.info(_round_summary(server_round, trainer.max_epochs, self._sampled, metrics))

    def components(self) -> dict[str, str]:
        """The server's strategy and codecs by setting, as a checkpoint records them for a resume."""

        def name(part: Any) -> str:
            return "none" if type(part) is Codec else type(part).__name__

        return {
            "trainer.aggregation": name(self.strategy),
            "trainer.compress_upload": name(self.upload),
            "trainer.compress_download": name(self.download),
        }

    def check_resume(self, state: dict[str, Any]) -> None:
        """Refuse, before anything is written, a checkpoint's server state that this run cannot continue.

        Checkpoints record their strategy and codecs (:meth:`components`); the state is also loaded
        into copies, so a checkpoint from before that record is checked too.
        """
        saved = state.get("components", {})
        for setting, name in self.components().items():
            if setting in saved and saved[setting] != name:
                raise ConfigError(
                    f"the checkpoint was written with {setting} {saved[setting]}, this run has {name}; "
                    "resume with the configuration that wrote it (its run folder's config.yaml)"
                )
        for part, target in (("strategy", self.strategy), ("upload", self.upload), ("download", self.download)):
            try:
                copy.deepcopy(target).load_state_dict(state[part])
            except Exception as error:  # the state of another strategy or codec: KeyError, shape errors
                raise ConfigError(
                    f"the checkpoint's server state ({part}) does not fit this run's {type(target).__name__} "
                    f"({type(error).__name__}: {error}); resume with the configuration that wrote it"
                ) from None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "components": self.components(),
            "cumulative_bytes": self.cumulative_bytes,
            "strategy": self.strategy.state_dict(),
            "upload": self.upload.state_dict(),
            "download": self.download.state_dict(),
            "peft": self._peft.server_state() if self._peft is not None else {},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cumulative_bytes = state_dict["cumulative_bytes"]
        self.strategy.load_state_dict(state_dict["strategy"])
        self.upload.load_state_dict(state_dict["upload"])
        self.download.load_state_dict(state_dict["download"])
        self._peft_state = dict(state_dict.get("peft", {}))


def _round_summary(server_round: int, num_rounds: int, sampled: int, metrics: dict[str, float]) -> str:
    parts = [f"round {server_round}/{num_rounds}"]
    if metrics["round/clients_aggregated"] < sampled or metrics["round/stragglers"]:
        details = [f"{metrics['round/clients_aggregated']}/{sampled} clients aggregated"]
        details += [
            f"{metrics[key]} {word}"
            for key, word in (
                ("round/clients_dropped", "dropped"),
                ("round/clients_failed", "failed"),
                ("round/stragglers", "straggled"),
            )
            if metrics[key]
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
    parts.append(f"{metrics['round/seconds']:.1f} s")
    return " | ".join(parts)
