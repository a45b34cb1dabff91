"""What a client runner may ask of the federated loop: a narrow interface, not the loop itself.

A runner (:mod:`fedpeft_pl.runners.sequential`, :mod:`fedpeft_pl.runners.vectorized`, the Flower
runner of :mod:`fedpeft_pl.deploy.flower`) is handed a :class:`RunnerHost` when it is built: the
per-client steps of a round, the run's federation and server, and a :class:`RunnerContext` with
what it needs of the module, the data and the hardware. The
:class:`~fedpeft_pl.loop.FederatedLoop` is one, and builds the context from its trainer, which a
runner never sees; a runner imports nothing from ``loop.py``, so the loop's private Lightning API
stays behind this interface and the arrows run one way (``import-linter`` checks it, see
``pyproject.toml``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union

import torch

from fedpeft_pl.federation import ClientResult, ClientStore, Federation, Round, State
from fedpeft_pl.peft import load_trainable_state, local_names, trainable_state
from fedpeft_pl.privacy import releases_client_statistics
from fedpeft_pl.runners.choice import RunnerChoice

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins import Precision

    from fedpeft_pl.client import FedPEFTModule
    from fedpeft_pl.data.datamodule import FederatedDataModule
    from fedpeft_pl.exchange import ClientSession
    from fedpeft_pl.privacy import LocalDP
    from fedpeft_pl.runners.device_data import DeviceData
    from fedpeft_pl.server import Server

__all__ = ["ClientExecutor", "ClientHost", "RunnerContext", "RunnerHost", "client_metrics"]


class RunnerContext(Protocol):
    """What a runner needs of the run, besides the loop's per-client steps: given by the loop, never the trainer.

    Read when asked (the module and the data module exist from fit on), so a runner keeps the
    context, not its answers. The loop builds it from its trainer; a test or another host can
    give any object with these attributes.

    Attributes:
        module: the module the clients train in (frozen backbone + PEFT).
        datamodule: the run's data, split into clients.
        device: where this process trains.
        precision: the run's precision (``32-true``, ``bf16-mixed``, ...).
        precision_plugin: Lightning's precision plugin (its input conversion and forward context).
        choice: which runner trains the clients and why (:class:`~fedpeft_pl.runners.choice.RunnerChoice`).
        device_data: where the vectorised engine keeps its transformed training samples, if the run says.
        releases_client_statistics: whether a client may report un-noised statistics (its training loss).
        clients_train_privately: whether a privacy mechanism acts on the clients' steps (local DP).
        privacy: the local-DP mechanism, if the run trains privately.
        callbacks, gradient_clip_val, accumulate_grad_batches: what Lightning's loop does around a
            local step (:func:`~fedpeft_pl.runners.choice.lightning_step_customised`).
    """

    @property
    def module(self) -> FedPEFTModule: ...

    @property
    def datamodule(self) -> FederatedDataModule: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def precision(self) -> str: ...

    @property
    def precision_plugin(self) -> Precision: ...

    @property
    def choice(self) -> RunnerChoice: ...

    @property
    def device_data(self) -> Optional[DeviceData]: ...

    @property
    def releases_client_statistics(self) -> bool: ...

    @property
    def clients_train_privately(self) -> bool: ...

    @property
    def privacy(self) -> Optional[LocalDP]: ...

    @property
    def callbacks(self) -> Sequence[Callback]: ...

    @property
    def gradient_clip_val(self) -> Optional[Union[int, float]]: ...

    @property
    def accumulate_grad_batches(self) -> int: ...

    def forward_context(self) -> AbstractContextManager[Any]:
        """The precision's context around an evaluation forward."""
        ...

    def keep_in_checkpoints(self, callback: Callback) -> None:
        """Add ``callback`` to the run, so its state is written with every checkpoint (a deployment's run key)."""
        ...


class ClientHost(Protocol):
    """What one client task (:class:`ClientExecutor`) asks of where it runs: start, open, close.

    The loop is one (the in-process runners); a deployed client answering a train message is another
    (:mod:`fedpeft_pl.deploy.flower`), so the same :class:`~fedpeft_pl.federation.ClientContext` is built on
    every runner.
    """

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


class RunnerHost(ClientHost, Protocol):
    """The loop as a runner sees it: the run's parts and the per-client steps of a round.

    A runner no longer reaches the trainer: what it needs of the module, the data, the device and
    the settings is in ``context``. (The :class:`~fedpeft_pl.loop.FederatedLoop` is still a Lightning
    loop with a ``trainer``, but that is not part of this interface.)

    Attributes:
        context: what the runner needs of the run (:class:`RunnerContext`).
        federation: the run's federation (N, m, rounds, local epochs, seed).
        server: the run's server (its strategy, codecs, global state and the message of each version).
        client_states: each client's own tensors kept across rounds.
    """

    client_states: ClientStore

    @property
    def context(self) -> RunnerContext: ...

    @property
    def federation(self) -> Federation: ...

    @property
    def server(self) -> Server: ...

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


def client_metrics(releases_statistics: bool, module: Any) -> dict[str, float]:
    """What a client reports besides its update: its training loss, unless the run keeps client statistics in
    (``releases_statistics``: :attr:`RunnerContext.releases_client_statistics`).

    The older form, ``client_metrics(trainer, module)``, still works, with a deprecation warning.
    """
    if not isinstance(releases_statistics, bool):
        warnings.warn(
            "client_metrics(trainer, module) is deprecated; pass whether the run releases client statistics "
            "(RunnerContext.releases_client_statistics) instead of the trainer",
            DeprecationWarning,
            stacklevel=2,
        )
        releases_statistics = releases_client_statistics(releases_statistics)
    metrics: dict[str, float] = module.local_metrics()
    if not releases_statistics:  # un-noised per-client statistics stay on the client
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
        host: where the task runs: the loop (in-process runners) or a deployed client.
        module: the module the clients train in; its trainable state when built is what the round
            starts from (the global state and a personalised method's initial local part).
    """

    def __init__(self, host: ClientHost, module: Any) -> None:
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
