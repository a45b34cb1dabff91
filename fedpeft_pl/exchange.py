"""What crosses between server and client, and the client's side of a round, the same for every runner.

A runner opens a :class:`ClientSession` from the round's message (:func:`open_session`),
trains, and closes it into a :class:`~fedpeft_pl.federation.ClientResult`
(:meth:`ClientSession.finish`): the strategy's client hooks, the codecs and the client's own
per-round state are applied here once, whether the client trains in this process, vectorised
with others, or on a Flower SuperNode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, TypeGuard

import torch
from torch import nn

from fedpeft_pl.attacks import Attack
from fedpeft_pl.compression import Codec
from fedpeft_pl.federation import ClientContext, ClientResult, RoundMessage, State, first_non_finite
from fedpeft_pl.peft import PEFTMethod, PerClientViews, load_trainable_state
from fedpeft_pl.strategies import Strategy

LOCAL = "local."  # the key prefix of a personalised method's local tensors in a client's own state


def encode_update(codec: Codec, state: State, received: State, client: int, extras: Optional[State] = None) -> State:
    """What a client sends after training: its state as it is, or through a codec the encoded change.

    The codec's per-client state (an error-feedback residual) is kept only for an update the
    server will accept (finite, with finite ``extras``, the strategy's tensors sent beside it, as
    :meth:`ServerAggregation.on_client_end` checks): the client checks this itself, so it holds
    also where the client encodes on its own machine (Flower).
    """
    if type(codec) is Codec:
        return state
    payload = codec.encode({name: state[name] - received[name] for name in state}, client=client)
    if first_non_finite({**decode_update(codec, payload, received), **(extras or {})}) is None:
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


def _views(peft: Optional[PEFTMethod]) -> TypeGuard[PerClientViews]:
    return isinstance(peft, PerClientViews)


def client_start(peft: Optional[PEFTMethod], received: State, client: int, server_round: int) -> State:
    """What ``client`` starts from, in global shapes: all of ``received`` unless the method gives each
    client its own view (:meth:`PerClientViews.client_view`: heterogeneous LoRA ranks), then that view.

    With a download codec the view is taken of the decoded state; the server counts the bytes of the
    view's encoding (:class:`~fedpeft_pl.aggregation.ServerAggregation`).
    """
    if not _views(peft):
        return received
    view = peft.client_view(received, client, server_round, upload=False)
    return peft.from_client_view(view, client, server_round, like=received)


def decode_reply(
    codec: Codec, payload: State, received: State, peft: Optional[PEFTMethod], client: int, server_round: int
) -> State:
    """The server's side of :meth:`ClientSession.finish`: the client's trained state, in global shapes,
    from its ``payload`` and the global state ``received`` that every client of the round was sent."""
    if not _views(peft):
        return decode_update(codec, payload, received)
    started = peft.client_view(client_start(peft, received, client, server_round), client, server_round, upload=True)
    view = decode_update(codec, payload, started)
    return peft.from_client_view(view, client, server_round, like=received)


@dataclass
class ClientSession:
    """One client's part of one round: what it received, its strategy hooks, and how it replies.

    Args:
        strategy: the run's strategy; only its client hooks are called here.
        upload: the codec for the client's update.
        context: the client's view of the round (received state, config, extras, own state).
        local_init: a personalised method's local tensors as every client first gets them;
            empty otherwise.
        peft: the PEFT method, where clients exchange their own views of the state
            (heterogeneous LoRA ranks); None where every client exchanges all of it.
        attack: set where this client is malicious (:mod:`fedpeft_pl.attacks`): it tampers with what
            the client sends and the count it reports, before the upload codec, as a real client would.
    """

    strategy: Strategy
    upload: Codec
    context: ClientContext
    local_init: Optional[State] = None
    peft: Optional[PEFTMethod] = None
    attack: Optional[Attack] = None

    def local_state(self) -> State:
        """The client's own local tensors: as it left them, or their initial values the first time."""
        return {name: self.context.state.get(LOCAL + name, value) for name, value in (self.local_init or {}).items()}

    def load_into(self, module: nn.Module) -> None:
        """Put what the client starts from into ``module``: the received state and its own local part."""
        load_trainable_state(module, self.context.received, partial=bool(self.local_init))
        if self.local_init:
            load_trainable_state(module, self.local_state(), partial=True)

    @property
    def client(self) -> int:
        return self.context.client

    @property
    def adds_loss(self) -> bool:
        return type(self.strategy).client_loss is not Strategy.client_loss

    @property
    def corrects_gradients(self) -> bool:
        return type(self.strategy).client_gradient is not Strategy.client_gradient

    def loss_term(self, params: State) -> Optional[torch.Tensor]:
        """The strategy's term for the client's loss (None if it adds none)."""
        return self.strategy.client_loss(params, self.context)

    def correct(self, grads: State, params: State) -> State:
        """The gradient the optimizer applies after the strategy's correction."""
        return self.strategy.client_gradient(grads, params, self.context)

    def finish(self, trained: State, num_samples: int, metrics: dict[str, float]) -> ClientResult:
        """The client's reply: its encoded update, the strategy's extra tensors and its metrics.

        ``trained`` is every trainable tensor; a personalised method's local part is kept in the
        client's own state instead of being sent.
        """
        if self.local_init:
            for name in self.local_init:
                self.context.state[LOCAL + name] = trained[name].detach().clone()
            trained = {name: t for name, t in trained.items() if name not in self.local_init}
        if self.attack is not None:
            trained = self.attack.tamper(self.context, trained)
            num_samples = self.attack.report(self.context.client, num_samples)
        extras = self.strategy.client_end(trained, self.context)
        received = self.context.received
        if _views(self.peft):  # the client sends its own view: at its own rank
            client, server_round = self.context.client, self.context.server_round
            trained = self.peft.client_view(trained, client, server_round, upload=True)
            received = self.peft.client_view(received, client, server_round, upload=True)
        payload = encode_update(self.upload, trained, received, self.context.client, extras)
        metrics = {**metrics, "steps": float(self.context.steps)}
        return ClientResult(self.context.client, num_samples, payload, extras, metrics, version=self.context.version)


def open_session(
    strategy: Strategy,
    upload: Codec,
    download: Codec,
    message: RoundMessage,
    client: int,
    server_round: int,
    like: State,
    own_state: Optional[State] = None,
    local_init: Optional[State] = None,
    peft: Optional[PEFTMethod] = None,
    view_sent: bool = False,
    attack: Optional[Attack] = None,
) -> ClientSession:
    """Decode the round's ``message`` for ``client``.

    ``like`` gives the shared tensors' names, shapes and dtypes; ``own_state`` is what the client
    kept from earlier rounds; ``local_init`` a personalised method's initial local tensors;
    ``peft`` the method, whose :meth:`~PerClientViews.client_view` says what this client exchanges;
    ``view_sent`` that the message holds only this client's view (a deployment sends no more);
    ``attack`` the run's attack, which acts on this client's reply if the client is malicious.
    """
    if view_sent and _views(peft):
        view_like = peft.client_view(like, client, server_round, upload=False)
        view = download.decode(message.payload, like=view_like)
        received = peft.from_client_view(view, client, server_round, like=like)
    else:
        received = client_start(peft, download.decode(message.payload, like=like), client, server_round)
    context = ClientContext(
        client=client,
        server_round=server_round,
        received=received,
        config=dict(message.config),
        extras={k: v.to(next(iter(like.values())).device) for k, v in message.extras.items()}
        if like
        else dict(message.extras),
        state=dict(own_state or {}),
        version=message.version,
    )
    tampers = attack is not None and attack.is_malicious(client)
    return ClientSession(
        strategy, upload, context, dict(local_init or {}), peft if _views(peft) else None, attack if tampers else None
    )
