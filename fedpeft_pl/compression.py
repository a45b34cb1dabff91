"""Update compression: what a state looks like on the wire.

A codec turns a mapping of tensors into the payload that travels (:meth:`Codec.encode`) and
back (:meth:`Codec.decode`). The byte counter counts the payload, so every communication figure
is the compressed size. Uploads carry the client's update (its state minus the state it
received), downloads carry the global state. Choose codecs with ``trainer.compress_upload`` and
``trainer.compress_download``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from fedpeft_pl.component import Component
from fedpeft_pl.federation import State

SCALE_SUFFIX = "::scale"


class Codec(Component):
    """No compression: tensors travel as they are."""

    @property
    def identity(self) -> bool:
        """Whether tensors travel as they are (this base class), so anything may be done with them on the way."""
        return type(self).encode is Codec.encode and type(self).decode is Codec.decode

    def encode(self, tensors: State, client: Optional[int] = None) -> State:
        """The payload for ``tensors``; ``client`` identifies the sender where a codec keeps per-client state.

        Per-client state that encoding changes (Int8's error-feedback residual) is staged, and kept
        only by :meth:`commit`: an update that is refused must leave the sender's state as it was.
        """
        return tensors

    def commit(self, client: int) -> None:
        """Keep the per-client state that the last :meth:`encode` for ``client`` staged."""

    def rollback(self, client: int) -> None:
        """Drop the per-client state that the last :meth:`encode` for ``client`` staged."""

    def decode(self, payload: State, like: State) -> State:
        """Tensors shaped and typed like ``like`` from ``payload``."""
        return payload

    def client_state(self, clients: list[int]) -> dict[int, Any]:
        """The per-client state of ``clients`` (none for a stateless codec), to move between processes."""
        return {}

    def load_client_state(self, state: dict[int, Any]) -> None:
        """Take over per-client state from :meth:`client_state` of another process."""

    def drop_client_state(self, clients: list[int]) -> None:
        """Forget the per-client state of ``clients``: a process that serves many clients' tasks in turn (a
        deployment's worker) keeps none of it between tasks; each task loads what its node kept."""


class _Cast(Codec):
    dtype: torch.dtype

    def encode(self, tensors: State, client: Optional[int] = None) -> State:
        return {name: t.to(self.dtype) for name, t in tensors.items()}

    def decode(self, payload: State, like: State) -> State:
        return {name: payload[name].to(ref.dtype) for name, ref in like.items()}


class Float16(_Cast):
    """IEEE half precision: 2 bytes an element."""

    dtype = torch.float16


class BFloat16(_Cast):
    """bfloat16: 2 bytes an element, float32's range."""

    dtype = torch.bfloat16


class Int8(Codec):
    """Symmetric 8-bit quantization with one float32 scale per tensor: ``q = round(x / s)``, ``s = max|x| / 127``.

    Args:
        error_feedback: each sender keeps what quantization lost and adds it to its next message
            (Seide et al. 2014; Karimireddy et al. 2019). The residuals are per-client state,
            checkpointed with the run. A residual is kept only when its update is accepted
            (:meth:`commit`), so one NaN update does not poison every later message of its sender.
    """

    def __init__(self, error_feedback: bool = False) -> None:
        self.error_feedback = error_feedback
        self._residuals: dict[int, State] = {}
        self._staged: dict[int, State] = {}

    def encode(self, tensors: State, client: Optional[int] = None) -> State:
        if self.error_feedback and client is not None and client in self._residuals:
            residual = self._residuals[client]
            tensors = {name: t + residual[name].to(t.device) for name, t in tensors.items()}
        payload: State = {}
        for name, tensor in tensors.items():
            scale = tensor.detach().abs().max().to(torch.float32) / 127.0
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            payload[name] = (tensor.to(torch.float32) / safe).round().clamp(-127, 127).to(torch.int8)
            payload[name + SCALE_SUFFIX] = scale.reshape(1)
        if self.error_feedback and client is not None:
            sent = self.decode(payload, tensors)
            self._staged[client] = {name: tensors[name] - sent[name] for name in tensors}
        return payload

    def commit(self, client: int) -> None:
        if client in self._staged:
            self._residuals[client] = self._staged.pop(client)

    def rollback(self, client: int) -> None:
        self._staged.pop(client, None)

    def decode(self, payload: State, like: State) -> State:
        return {
            name: (payload[name].to(torch.float32) * payload[name + SCALE_SUFFIX]).to(ref.dtype)
            for name, ref in like.items()
        }

    def client_state(self, clients: list[int]) -> dict[int, Any]:
        return {c: {k: v.cpu() for k, v in self._residuals[c].items()} for c in clients if c in self._residuals}

    def load_client_state(self, state: dict[int, Any]) -> None:
        self._residuals.update(state)

    def drop_client_state(self, clients: list[int]) -> None:
        for client in clients:
            self._residuals.pop(client, None)
            self._staged.pop(client, None)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {str(client): state for client, state in self._residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._residuals = {int(client): residual for client, residual in state["residuals"].items()}
