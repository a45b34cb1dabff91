"""The server as a Lightning callback: it holds the global state, moves it in and out of the
one shared model, applies the strategy and the codecs, counts every byte that travels and logs
each round. The aggregation algorithms themselves live in :mod:`fedpeft_pl.strategies`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch

from fedpeft_pl.comm import MIB, WireCounter, payload_bytes
from fedpeft_pl.compression import Codec
from fedpeft_pl.hooks import FederatedCallback
from fedpeft_pl.peft import load_trainable_state, trainable_state
from fedpeft_pl.privacy import releases_client_statistics
from fedpeft_pl.strategies import ClientUpdate, FedAvg, State, Strategy

log = logging.getLogger(__name__)


class ServerAggregation(FederatedCallback):
    """The server: sends the global state, collects updates, aggregates, and logs each round.

    Logged per round (TensorBoard step = round): ``comm/bytes_down``, ``comm/bytes_up``,
    ``comm/cumulative_bytes`` (tensor-element bytes), ``comm/wire_bytes_down``,
    ``comm/wire_bytes_up`` (the messages as Flower serialises them, with Flower installed; see
    :mod:`fedpeft_pl.comm`), ``server/acc``, ``server/loss``, ``train/loss``,
    ``round/clients_aggregated``, ``round/clients_dropped``, ``round/clients_failed``,
    ``round/stragglers``, ``round/seconds`` and any ``round_metrics()`` of the strategy; and
    ``server/acc_vs_cumulative_bytes`` whose step is the cumulative number of bytes sent so far
    in both directions. Loggers are flushed every round, before the round's checkpoint.

    Every sampled client receives the encoded global state (a client that availability drops
    is sent nothing, as in a deployment); a client
    that finishes sends its encoded update (its state minus the state it received). An update
    that holds NaN or Inf is left out with a warning naming the client and the tensor. If fewer
    than ``strategy.min_clients`` updates arrive, the round is skipped and the state stays.

    Args:
        strategy: the aggregation strategy; FedAvg by default.
        upload: codec for the clients' updates; none by default.
        download: codec for the global state sent to clients; none by default.
    """

    def __init__(self, strategy: Optional[Strategy] = None, upload: Optional[Codec] = None, download: Optional[Codec] = None) -> None:
        self.strategy = strategy if strategy is not None else FedAvg()
        self.upload = upload if upload is not None else Codec()
        self.download = download if download is not None else Codec()
        self.global_state: State = {}
        self.cumulative_bytes = 0
        self._payload: State = {}
        self._received: State = {}
        self._config: dict[str, Any] = {}
        self._dropped = 0
        self._failed = 0
        self._updates: list[ClientUpdate] = []
        self._bytes = {"down": 0, "up": 0}
        self._eval: dict[str, float] = {}
        self._round_started = 0.0
        self._aggregated = 0
        self._sampled = 0
        self._round = 0
        self.wire = WireCounter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # checkpoints are written only at round ends, when the module holds the global state
        self.global_state = trainable_state(pl_module)
        loop = trainer.fit_loop
        self.strategy.setup(
            num_clients=trainer.datamodule.num_clients,
            clients_per_round=loop.clients_per_round,
            num_rounds=loop.num_rounds,
            sampling=loop.client_sampling,
            seed=loop.seed,
        )

    def on_round_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, server_round: int, clients: list[int]
    ) -> None:
        self._round_started = time.perf_counter()
        self._sampled = len(clients)
        self._updates = []
        self._bytes = {"down": 0, "up": 0}
        self._eval = {}
        self._dropped = self._failed = 0
        state, self._config = self.strategy.configure_fit(server_round, self.global_state)
        self._payload = self.download.encode(state)
        self._received = self.download.decode(self._payload, like=state)
        self._round = server_round
        self.wire.start_round(self._payload)

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int) -> None:
        load_trainable_state(pl_module, self._received)
        pl_module.fit_config = dict(self._config)
        plan = trainer.fit_loop.round_plans.get(client)
        if plan is None or not plan.dropped:  # a deployment sends nothing to a client that drops out
            self._bytes["down"] += payload_bytes(self._payload)
            self.wire.download(self._config, self._round, client, plan.batches if plan is not None else 0)

    def on_client_dropped(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int, reason: str) -> None:
        self._dropped += 1

    def on_client_failed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int, error: BaseException) -> None:
        self._failed += 1

    @property
    def round_payload(self) -> tuple[State, dict[str, Any]]:
        """What every client of the current round receives: the encoded global state and the strategy's config."""
        return self._payload, dict(self._config)

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int, num_samples: int) -> None:
        payload = trainer.fit_loop.uploads.pop(client, None)  # what a remote client sent, if it trained elsewhere
        if payload is None:
            payload = encode_update(self.upload, trainable_state(pl_module), self._received, client)
        self._bytes["up"] += payload_bytes(payload)
        self.wire.upload(payload, num_samples, with_loss=releases_client_statistics(trainer))
        state = decode_update(self.upload, payload, self._received)
        broken = next((name for name, tensor in state.items() if not torch.isfinite(tensor).all()), None)
        if broken is not None:
            log.warning(
                f"round {trainer.current_epoch + 1}: client {client} sent NaN or Inf values (in {broken}); "
                "its update is left out of this round"
            )
            return
        self._updates.append(ClientUpdate(client, num_samples, state))

    def on_round_gather(self, trainer: pl.Trainer, pl_module: pl.LightningModule, gather: Callable[[Any], list[Any]]) -> None:
        if trainer.world_size == 1:
            return
        mine = {
            "updates": [(u.client, u.num_samples, {k: v.cpu() for k, v in u.state.items()}) for u in self._updates],
            "bytes": self._bytes,
            "wire": self.wire.bytes,
            "dropped": self._dropped,
            "failed": self._failed,
            "upload": self.upload.client_state(trainer.fit_loop.own_share(trainer.fit_loop.round_clients)),
        }
        device = pl_module.device
        order = {c: i for i, c in enumerate(trainer.fit_loop.round_clients)}
        updates = []
        self._bytes, self._dropped, self._failed = {"down": 0, "up": 0}, 0, 0
        self.wire.bytes = {"down": 0, "up": 0} if self.wire.bytes is not None else None
        for part in gather(mine):
            updates += [ClientUpdate(c, n, {k: v.to(device) for k, v in state.items()}) for c, n, state in part["updates"]]
            self._bytes = {k: self._bytes[k] + part["bytes"][k] for k in self._bytes}
            if self.wire.bytes is not None and part["wire"] is not None:
                self.wire.bytes = {k: v + part["wire"][k] for k, v in self.wire.bytes.items()}
            self._dropped += part["dropped"]
            self._failed += part["failed"]
            self.upload.load_client_state(part["upload"])
        # the order of a single process, so that every process aggregates to the same bits as one would
        self._updates = sorted(updates, key=lambda u: order[u.client])

    def on_round_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, server_round: int) -> None:
        arrived = len(self._updates)
        if arrived >= self.strategy.min_clients:
            self.global_state = self.strategy.aggregate_fit(server_round, self.global_state, self._updates)
            self._aggregated = arrived
        else:
            log.warning(
                f"round {server_round}: {arrived} usable update(s) of {self._sampled} sampled clients, fewer than "
                f"min_clients={self.strategy.min_clients}; the round is skipped and the global state is unchanged"
            )
            self._aggregated = 0
        self._updates = []
        load_trainable_state(pl_module, self.global_state)
        self.cumulative_bytes += self._bytes["down"] + self._bytes["up"]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self._eval = {k: float(metrics[k]) for k in ("server/acc", "server/loss") if k in metrics}

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
            "round/stragglers": sum(plan.straggler for plan in trainer.fit_loop.round_plans.values()),
            "round/seconds": time.perf_counter() - self._round_started,
            **self._eval,
            **self.strategy.round_metrics(),
        }
        train_loss = getattr(pl_module, "round_train_loss", None)
        if train_loss is None and "train/loss" in trainer.callback_metrics:  # a module that logs its own
            train_loss = float(trainer.callback_metrics["train/loss"])
        if train_loss is not None and releases_client_statistics(trainer):  # un-noised: not in a private run
            metrics["train/loss"] = train_loss
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=server_round)
            if "server/acc" in self._eval:
                logger.log_metrics({"server/acc_vs_cumulative_bytes": self._eval["server/acc"]}, step=self.cumulative_bytes)
            logger.save()
        if trainer.is_global_zero:
            log.info(_round_summary(server_round, trainer.max_epochs, self._sampled, metrics))

    def state_dict(self) -> dict[str, Any]:
        return {
            "cumulative_bytes": self.cumulative_bytes,
            "strategy": self.strategy.state_dict(),
            "upload": self.upload.state_dict(),
            "download": self.download.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cumulative_bytes = state_dict["cumulative_bytes"]
        self.strategy.load_state_dict(state_dict["strategy"])
        self.upload.load_state_dict(state_dict["upload"])
        self.download.load_state_dict(state_dict["download"])


def encode_update(codec: Codec, state: State, received: State, client: int) -> State:
    """What a client sends after training: its state as it is, or through a codec the encoded change.

    The codec's per-client state (an error-feedback residual) is kept only for an update the
    server will accept (finite, see :meth:`ServerAggregation.on_client_end`): the client checks
    this itself, so it holds also where the client encodes on its own machine (Flower).
    """
    if type(codec) is Codec:
        return state
    payload = codec.encode({name: state[name] - received[name] for name in state}, client=client)
    if all(torch.isfinite(t).all() for t in decode_update(codec, payload, received).values()):
        codec.commit(client)
    else:
        codec.rollback(client)
    return payload


def decode_update(codec: Codec, payload: State, received: State) -> State:
    """The client's state that the server reconstructs from ``payload``."""
    if type(codec) is Codec:
        return payload
    decoded = codec.decode(payload, like=received)
    return {name: received[name] + decoded[name] for name in received}


def _round_summary(server_round: int, num_rounds: int, sampled: int, metrics: dict[str, float]) -> str:
    parts = [f"round {server_round}/{num_rounds}"]
    if metrics["round/clients_aggregated"] < sampled or metrics["round/stragglers"]:
        details = [f"{metrics['round/clients_aggregated']}/{sampled} clients aggregated"]
        details += [f"{metrics[key]} {word}" for key, word in
                    (("round/clients_dropped", "dropped"), ("round/clients_failed", "failed"), ("round/stragglers", "straggled"))
                    if metrics[key]]
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
