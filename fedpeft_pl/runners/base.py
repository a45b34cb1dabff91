"""What a client runner may ask of the federated loop: a narrow interface, not the loop itself.

A runner (:mod:`fedpeft_pl.runners.sequential`, :mod:`fedpeft_pl.runners.vectorized`, the Flower
runner of :mod:`fedpeft_pl.deploy.flower`) is handed a :class:`RunnerHost` when it is built. The
:class:`~fedpeft_pl.loop.FederatedLoop` is one; a runner imports nothing from ``loop.py``, so
the loop's private Lightning API stays behind this interface and the arrows run one way
(``import-linter`` checks it, see ``pyproject.toml``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch

from fedpeft_pl.federation import ClientResult, ClientStore, Federation, Round
from fedpeft_pl.privacy import releases_client_statistics

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from fedpeft_pl.exchange import ClientSession
    from fedpeft_pl.server import Server

__all__ = ["RunnerHost", "client_metrics"]


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
