"""The base of PEFT methods whose clients do not all exchange the same tensors (heterogeneous LoRA ranks, FLoRA)."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from timm.models import VisionTransformer

from fedpeft_pl.peft.base import PEFTMethod, State

if TYPE_CHECKING:
    from fedpeft_pl.strategies import ClientUpdate


class PerClientViews(PEFTMethod):
    """A PEFT method whose clients each exchange their own view of the shared state.

    A plain :class:`PEFTMethod` sends every client the whole trainable state and gets all of it
    back. A subclass of this one says instead what of the global state each client receives and
    sends (:meth:`client_view`, in the client's own shapes) and how a view goes back into global
    shapes (:meth:`from_client_view`); both are required. The server counts every client's bytes at
    its own view, and a deployment sends each client only its own.

    The other hooks are optional and do nothing by default: a method that aggregates otherwise
    than the strategy overrides :meth:`aggregate`, keeps what it needs across rounds in
    :meth:`server_state`, counts what a client receives besides its view in
    :meth:`pending_download_bytes` and :meth:`delivered`, and sends a deployed client what it needs
    of the server's model besides the trainable state with :meth:`model_update`.

    Such methods train on the sequential runner (the vectorised runner falls back to it); local
    DP, secure aggregation and :class:`~fedpeft_pl.peft.Personalized` refuse them.

    Example (BitFit whose odd clients exchange only the classifier; what a view lacks, a client
    starts from the global state and the server takes as unchanged)::

        class BitFitHeadOnOddClients(PerClientViews, Bias):
            def client_view(self, state, client, server_round, upload):
                if client % 2 == 0:
                    return state
                return {k: v for k, v in state.items() if k.startswith("model.head.")}

            def from_client_view(self, view, client, server_round, like):
                return {k: view.get(k, like[k]) for k in like}
    """

    per_client_views: ClassVar[bool] = True

    @abstractmethod
    def client_view(self, state: State, client: int, server_round: int, upload: bool) -> State:
        """What of the shared ``state`` (global shapes) ``client`` exchanges in ``server_round``, in its own shapes.

        Args:
            state: the global trainable state (or a client's trained state in global shapes).
            client: the client's id.
            server_round: the round, from 1.
            upload: the direction: what the client sends back after training, or (False) what it
                receives. The server counts the bytes of these views, and codecs encode them.
        """

    @abstractmethod
    def from_client_view(self, view: State, client: int, server_round: int, like: State) -> State:
        """The inverse of :meth:`client_view`: ``view`` in the global shapes of ``like``.

        What the view lacks is what the client starts from without receiving it (zero padding,
        a freshly drawn factor). The client starts training from the result; the server decodes
        each upload through it before the strategy aggregates.

        Args:
            view: what :meth:`client_view` gave for this client (decoded).
            client: the client's id.
            server_round: the round, from 1.
            like: a state in global shapes: the names, shapes and dtypes of the result.
        """

    def aggregate(
        self, model: VisionTransformer, aggregated: State, updates: list[ClientUpdate], server_round: int
    ) -> State:
        """The next global state, from the strategy's ``aggregated`` one and the clients' ``updates`` (global shapes).

        A method may fold the updates into ``model``'s own buffers here (FLoRA's product).
        Unchanged by default.
        """
        return aggregated

    def pending_download_bytes(self, client: int, server_round: int) -> int:
        """Bytes ``client`` receives in ``server_round`` besides its view of the state (FLoRA's unmerged update)."""
        return 0

    def delivered(self, clients: list[int], server_round: int) -> None:
        """``clients`` received the message of ``server_round`` (a method's bookkeeping of what each client holds)."""

    def server_state(self) -> dict[str, Any]:
        """What the method keeps on the server across rounds, for the server's checkpoint."""
        return {}

    def load_server_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`server_state` (the model is built and attached)."""

    def model_update(self) -> State:
        """Tensors of the server's model outside the trainable state that a client on another machine needs
        before it trains or evaluates (FLoRA's merged update); none by default. A deployment sends them
        with every message (:mod:`fedpeft_pl.deploy.flower`)."""
        return {}

    def load_model_update(self, tensors: State) -> None:
        """Put :meth:`model_update` of the server into this (a client's) model."""
