"""Byte accounting: the single source of every communication figure fedpeft reports.

A payload is the mapping of tensors that crosses the network; its size is the sum of each
tensor's element count times its dtype's size. Training logs, ``fedpeft comm`` and the
benchmarks all call :func:`payload_bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedpeft_pl.peft import trainable_parameters

if TYPE_CHECKING:
    from fedpeft_pl.client import FedPEFTModule

MIB = 2**20


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire for ``payload``: elements times dtype size, summed over tensors."""
    return sum(t.numel() * t.element_size() for t in payload.values())


@dataclass(frozen=True)
class CommReport:
    """What one configuration sends, before any training."""

    method: str
    trainable_params: int
    client_bytes: int  # one client, one direction, one round
    full_client_bytes: int  # the same for full fine-tuning of this backbone
    clients_per_round: int
    num_rounds: int

    @property
    def round_bytes(self) -> int:
        """Both directions, all sampled clients, one round."""
        return 2 * self.clients_per_round * self.client_bytes

    @property
    def run_bytes(self) -> int:
        return self.num_rounds * self.round_bytes

    @property
    def ratio_to_full(self) -> float:
        """How many times fewer bytes than full fine-tuning."""
        return self.full_client_bytes / self.client_bytes

    def format(self) -> str:
        rows = [
            ("method", self.method),
            ("trainable parameters", f"{self.trainable_params:,}"),
            ("per client per direction", _size(self.client_bytes)),
            (f"per round ({self.clients_per_round} clients, both directions)", _size(self.round_bytes)),
            (f"whole run ({self.num_rounds} rounds)", _size(self.run_bytes)),
            ("full fine-tuning per client per direction", _size(self.full_client_bytes)),
            ("bytes relative to full fine-tuning", f"1/{self.ratio_to_full:,.1f} ({100 / self.ratio_to_full:.3f}%)"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _size(num_bytes: int) -> str:
    return f"{num_bytes:,} bytes ({num_bytes / MIB:,.3f} MiB)"


def communication_report(module: FedPEFTModule, clients_per_round: int, num_rounds: int) -> CommReport:
    """Bytes that ``module``'s PEFT method sends, next to full fine-tuning of the same backbone.

    Counts come from the built architecture, so no weights are downloaded.
    """
    trainable = trainable_parameters(module)
    full = dict(module.backbone.build(module.num_classes).named_parameters())
    return CommReport(
        method=repr(module.peft),
        trainable_params=sum(p.numel() for p in trainable.values()),
        client_bytes=payload_bytes(trainable),
        full_client_bytes=payload_bytes(full),
        clients_per_round=clients_per_round,
        num_rounds=num_rounds,
    )
