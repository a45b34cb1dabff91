"""Server aggregation: strategies that combine client updates, and the callback that runs them.

A strategy follows Flower's split: :meth:`Strategy.configure_fit` decides what each client
receives, :meth:`Strategy.aggregate_fit` turns the clients' results into the next global
state. :class:`ServerAggregation` is the Lightning callback that holds the global state,
moves it in and out of the one shared model, counts every byte that travels and logs the
round's metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from fedpeft_pl.comm import MIB, payload_bytes
from fedpeft_pl.hooks import FederatedCallback
from fedpeft_pl.peft import load_trainable_state, trainable_state

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What one client sends back after local training."""

    client: int
    num_samples: int
    state: State


class Strategy:
    """How the server configures a round and aggregates its results.

    Server-side state (for example a server optimizer's moments) lives in the strategy and is
    checkpointed through :meth:`state_dict`.
    """

    def configure_fit(self, server_round: int, global_state: State) -> State:
        """The payload every sampled client receives; by default the global state itself."""
        return global_state

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def weighted_average(updates: list[ClientUpdate]) -> State:
    """Average of the client states weighted by their sample counts, accumulated in float64."""
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise ValueError("cannot average updates that trained on no samples")
    averaged = {}
    for name in updates[0].state:
        acc = torch.zeros_like(updates[0].state[name], dtype=torch.float64)
        for update in updates:
            acc.add_(update.state[name].to(torch.float64), alpha=update.num_samples / total)
        averaged[name] = acc.to(updates[0].state[name].dtype)
    return averaged


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): the sample-weighted mean of the client states."""

    def aggregate_fit(self, server_round: int, global_state: State, updates: list[ClientUpdate]) -> State:
        return weighted_average(updates)


class ServerAggregation(FederatedCallback):
    """The server: sends the global state, collects updates, aggregates, and logs each round.

    Logged per round (TensorBoard step = round): ``comm/bytes_down``, ``comm/bytes_up``,
    ``comm/cumulative_bytes``, ``server/acc``, ``server/loss``, ``train/loss``,
    ``round/clients_aggregated`` and ``round/seconds``; and ``server/acc_vs_cumulative_bytes``
    whose step is the cumulative number of bytes sent so far in both directions. Loggers are
    flushed every round, before the round's checkpoint is written.

    An update that holds NaN or Inf is left out of the aggregate with a warning naming the
    client and the tensor.

    Args:
        strategy: the aggregation strategy; FedAvg by default.
    """

    def __init__(self, strategy: Strategy | None = None) -> None:
        self.strategy = strategy if strategy is not None else FedAvg()
        self.global_state: State = {}
        self.cumulative_bytes = 0
        self._payload: State = {}
        self._updates: list[ClientUpdate] = []
        self._bytes = {"down": 0, "up": 0}
        self._eval: dict[str, float] = {}
        self._round_started = 0.0
        self._aggregated = 0
        self._sampled = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # checkpoints are written only at round ends, when the module holds the global state
        self.global_state = trainable_state(pl_module)

    def on_round_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, server_round: int, clients: list[int]
    ) -> None:
        self._round_started = time.perf_counter()
        self._sampled = len(clients)
        self._updates = []
        self._bytes = {"down": 0, "up": 0}
        self._eval = {}
        self._payload = self.strategy.configure_fit(server_round, self.global_state)

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int) -> None:
        load_trainable_state(pl_module, self._payload)
        self._bytes["down"] += payload_bytes(self._payload)

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int, num_samples: int) -> None:
        state = trainable_state(pl_module)
        self._bytes["up"] += payload_bytes(state)
        broken = next((name for name, tensor in state.items() if not torch.isfinite(tensor).all()), None)
        if broken is not None:
            log.warning(
                f"round {trainer.current_epoch + 1}: client {client} sent NaN or Inf values (in {broken}); "
                "its update is left out of this round"
            )
            return
        self._updates.append(ClientUpdate(client, num_samples, state))

    def on_round_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, server_round: int) -> None:
        self._aggregated = len(self._updates)
        if self._updates:
            self.global_state = self.strategy.aggregate_fit(server_round, self.global_state, self._updates)
        else:
            log.warning(f"round {server_round}: no usable update arrived; the global state is unchanged")
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
            "round/clients_aggregated": self._aggregated,
            "round/seconds": time.perf_counter() - self._round_started,
            **self._eval,
        }
        if "train/loss" in trainer.callback_metrics:
            metrics["train/loss"] = float(trainer.callback_metrics["train/loss"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=server_round)
            if "server/acc" in self._eval:
                logger.log_metrics({"server/acc_vs_cumulative_bytes": self._eval["server/acc"]}, step=self.cumulative_bytes)
            logger.save()
        if trainer.is_global_zero:
            log.info(_round_summary(server_round, trainer.max_epochs, self._sampled, metrics))

    def state_dict(self) -> dict[str, Any]:
        return {"cumulative_bytes": self.cumulative_bytes, "strategy": self.strategy.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cumulative_bytes = state_dict["cumulative_bytes"]
        self.strategy.load_state_dict(state_dict["strategy"])


def _round_summary(server_round: int, num_rounds: int, sampled: int, metrics: dict[str, float]) -> str:
    parts = [f"round {server_round}/{num_rounds}"]
    if metrics["round/clients_aggregated"] < sampled:
        parts.append(f"{metrics['round/clients_aggregated']}/{sampled} clients aggregated")
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
