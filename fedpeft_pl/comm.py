"""Byte accounting: the single source of every communication figure fedpeft reports.

A payload is the mapping of tensors that crosses the network; its size is the sum of each
tensor's element count times its dtype's size. Training logs, ``fedpeft comm`` and the
benchmarks all call :func:`payload_bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from fedpeft_pl.compression import Codec
from fedpeft_pl.federation import ClientContext
from fedpeft_pl.peft import trainable_parameters

if TYPE_CHECKING:
    from fedpeft_pl.client import FedPEFTModule
    from fedpeft_pl.strategies import Strategy

MIB = 2**20


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire for ``payload``: elements times dtype size, summed over tensors."""
    return sum(t.numel() * t.element_size() for t in payload.values())


@dataclass(frozen=True)
class CommReport:
    """What one configuration sends, before any training."""

    method: str
    trainable_params: int
    download_bytes: int  # one client, one round, server to client
    upload_bytes: int  # one client, one round, client to server
    full_client_bytes: int  # full fine-tuning of this backbone, uncompressed, one direction
    clients_per_round: int
    num_rounds: int
    notes: tuple[str, ...] = ()

    @property
    def round_bytes(self) -> int:
        """Both directions, all sampled clients, one round."""
        return self.clients_per_round * (self.download_bytes + self.upload_bytes)

    @property
    def run_bytes(self) -> int:
        return self.num_rounds * self.round_bytes

    @property
    def ratio_to_full(self) -> float:
        """How many times fewer bytes than uncompressed full fine-tuning, both directions."""
        return 2 * self.full_client_bytes / (self.download_bytes + self.upload_bytes)

    def format(self) -> str:
        rows = [("method", self.method), ("trainable parameters", f"{self.trainable_params:,}")]
        if self.download_bytes == self.upload_bytes:
            rows.append(("per client per direction", _size(self.download_bytes)))
        else:
            rows += [("per client, download", _size(self.download_bytes)), ("per client, upload", _size(self.upload_bytes))]
        rows += [
            (f"per round ({self.clients_per_round} clients, both directions)", _size(self.round_bytes)),
            (f"whole run ({self.num_rounds} rounds)", _size(self.run_bytes)),
            ("full fine-tuning per client per direction", _size(self.full_client_bytes)),
            ("bytes relative to full fine-tuning", f"1/{self.ratio_to_full:,.1f} ({100 / self.ratio_to_full:.3f}%)"),
        ]
        rows += [("note", note) for note in self.notes]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _size(num_bytes: int) -> str:
    return f"{num_bytes:,} bytes ({num_bytes / MIB:,.3f} MiB)"


def communication_report(
    module: FedPEFTModule,
    clients_per_round: int,
    num_rounds: int,
    upload: Optional[Codec] = None,
    download: Optional[Codec] = None,
    notes: tuple[str, ...] = (),
    strategy: Optional[Strategy] = None,
) -> CommReport:
    """Bytes that ``module``'s PEFT method sends with the given codecs, next to full fine-tuning.

    Counts come from the built architecture, the codecs' actual payloads and the tensors the
    strategy sends besides the state (SCAFFOLD's control variates), so no weights are
    downloaded and compressed sizes are exact.
    """
    local = frozenset(getattr(module, "local_names", ()))  # a personalised method's local part never travels
    trainable = {name: p.detach() for name, p in trainable_parameters(module).items() if name not in local}
    full = dict(module.backbone.build(module.num_classes).named_parameters())
    upload, download = upload or Codec(), download or Codec()
    extras_down: dict[str, torch.Tensor] = {}
    extras_up: dict[str, torch.Tensor] = {}
    if strategy is not None:
        extras_down = strategy.client_extras(1, trainable)
        context = ClientContext(0, 1, trainable, extras=extras_down, steps=1, lr=1.0)
        extras_up = strategy.client_end(trainable, context)
    return CommReport(
        method=repr(module.peft),
        trainable_params=sum(p.numel() for p in trainable.values()),
        download_bytes=payload_bytes(download.encode(trainable)) + payload_bytes(extras_down),
        upload_bytes=payload_bytes(upload.encode(trainable)) + payload_bytes(extras_up),
        full_client_bytes=payload_bytes(full),
        clients_per_round=clients_per_round,
        num_rounds=num_rounds,
        notes=notes,
    )
