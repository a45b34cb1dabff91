"""What a client runner may ask of the federated loop: a narrow interface, not the loop itself.

A runner (:mod:`fedpeft_pl.runners.sequential`, :mod:`fedpeft_pl.runners.vectorized`, the Flower
runner of :mod:`fedpeft_pl.deploy.flower`) is handed a :class:`RunnerHost` when it is built. The
:class:`~fedpeft_pl.loop.FederatedLoop` is one; a runner imports nothing from ``loop.py``, so
the loop's private Lightning API stays behind this interface and the arrows run one way
(``import-linter`` checks it, see ``pyproject.toml``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Protocol, Union

import torch

from fedpeft_pl.federation import ClientResult, ClientStore, Federation, Round, State
from fedpeft_pl.peft import load_trainable_state, local_names, trainable_state
from fedpeft_pl.privacy import releases_client_statistics

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from fedpeft_pl.exchange import ClientSession
    from fedpeft_pl.server import Server

__all__ = ["ClientExecutor", "RunnerHost", "client_metrics"]


class RunnerHost(Protocol):
    """The loop as a runner sees it: the run's parts and the per-client steps of a round.

    Attributes:
        trainer: the run's trainer (its module, data module, strategy, precision).
        federation: the run's federation (N, m, rounds, local epochs, seed).
        server: the run's server (its strategy, codecs, global state and the message of each version).
        client_states: each client's own tensors kept across rounds.
    """

    trainer: pl.Trainer
    client_states: ClientStore

    @property
    def federation(self) -> Federation: ...

    @property
    def server(self) -> Server: ...

    def start_client(self, round: Round, client: int) -> Optional[ClientResult]:
        """``on_client_start`` and availability: None if the client takes part, else its dropped result."""
        ...

    def open_session(
        self, round: Round, client: int, like: dict[str, torch.Tensor], local_init: dict[str, torch.Tensor]
    ) -> ClientSession:
        """The client's side of ``round``: the decoded message, its strategy hooks and its own state."""
        ...

    def close_session(self, session: ClientSession) -> None:
        """Keep the client's own state for the next round it takes part in."""
        ...

    def train_local(
        self, round_number: int, client: int, max_batches: int, session: Optional[ClientSession] = None
    ) -> None:
        """Local training of the module's current state with Lightning's epoch loop."""
        ...

    def no_gradient_sync(self) -> Any:
        """A context in which gradients are not averaged across processes (each trains other clients)."""
        ...

    def count_steps(self, steps: int) -> None:
        """Optimizer steps that clients took elsewhere (a deployment), so the run's global step advances."""
        ...


def client_metrics(trainer: pl.Trainer, module: Any) -> dict[str, float]:
    """What a client reports besides its update: its training loss, unless the run is private."""
    metrics: dict[str, float] = module.local_metrics()
    if not releases_client_statistics(trainer):  # un-noised per-client statistics stay on the client
        metrics.pop("train_loss", None)
    return metrics


class ClientExecutor:
    """One client task of a round, the same on every in-process runner: start, train, finish.

    ``start`` runs ``on_client_start`` and availability, then opens the client's
    :class:`~fedpeft_pl.exchange.ClientSession` (the decoded message, its own view of the state, the
    strategy's :class:`~fedpeft_pl.federation.ClientContext`, its own state); the runner trains (its
    backend: Lightning's epoch loop, the stacked engine); ``finish`` closes the session into the
    client's :class:`~fedpeft_pl.federation.ClientResult` (the encoded update, the strategy's
    extras, its metrics) and keeps its own state. ``show`` puts what ``on_client_end`` sees in the
    module: the client's trained shared state (a personalised method's local part as every client
    starts it); ``restore`` puts back the state the round started from.

    Args:
        host: the loop as the runner sees it.
        module: the module the clients train in; its trainable state when built is what the round
            starts from (the global state and a personalised method's initial local part).
    """

    def __init__(self, host: RunnerHost, module: Any) -> None:
        self.host = host
        self.module = module
        self.start_state = trainable_state(module)
        local = local_names(module)
        self.shared_like = {n: t for n, t in self.start_state.items() if n not in local}
        self.local_init = {n: t for n, t in self.start_state.items() if n in local}

    def start(self, round: Round, client: int) -> Union[ClientResult, ClientSession]:
        """The client's session, or its result if it takes no part this round."""
        dropped = self.host.start_client(round, client)
        if dropped is not None:
            return dropped
        return self.host.open_session(round, client, self.shared_like, self.local_init)

    def finish(
        self, session: ClientSession, trained: State, num_samples: int, metrics: dict[str, float]
    ) -> ClientResult:
        """The client's reply from its ``trained`` state (every trainable tensor); its own state is kept."""
        result = session.finish(trained, num_samples, metrics)
        self.host.close_session(session)
        return result

    def show(self, trained: State) -> None:
        """What the module holds while the hooks see the client's result: its trained shared state."""
        load_trainable_state(self.module, trained)
        self.reset_local()

    def reset_local(self) -> None:
        """A personalised method's local part back to its initial values (the next client's are its own)."""
        if self.local_init:
            load_trainable_state(self.module, self.local_init, partial=True)

    def restore(self) -> None:
        """The state the round started from, back in the module."""
        load_trainable_state(self.module, self.start_state)
