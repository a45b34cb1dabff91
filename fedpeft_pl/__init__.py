"""fedpeft-pl: federated parameter-efficient fine-tuning of frozen vision transformers on Lightning.

The public names below are imported on first use (``from fedpeft_pl import FedAvg`` imports the
strategies, not Lightning), so that ``fedpeft --help`` and every module that needs only part of the
package start without torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedpeft_pl import _moved

if TYPE_CHECKING:
    from fedpeft_pl.aggregation import ServerAggregation
    from fedpeft_pl.availability import ClientAvailability
    from fedpeft_pl.backbone import Backbone
    from fedpeft_pl.client import FedPEFTModule
    from fedpeft_pl.comm import CommReport, communication_report, payload_bytes
    from fedpeft_pl.data import FederatedDataModule
    from fedpeft_pl.errors import ConfigError
    from fedpeft_pl.federation import ClientContext, ClientResult, ClientRunner, Federation, Round
    from fedpeft_pl.hooks import ClientDropped, FederatedCallback, FederatedHooks
    from fedpeft_pl.loop import FederatedLoop
    from fedpeft_pl.runners import SequentialRunner, VectorizedRunner
    from fedpeft_pl.strategies import (
        ClientUpdate,
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedDyn,
        FedMedian,
        FedProx,
        FedTrimmedAvg,
        FedYogi,
        Scaffold,
        Strategy,
    )
    from fedpeft_pl.trainer import FederatedTrainer

__version__ = "0.1.0"

_moved.install()

__all__ = [
    "Backbone",
    "ClientAvailability",
    "ClientContext",
    "ClientDropped",
    "ClientResult",
    "ClientRunner",
    "ClientUpdate",
    "CommReport",
    "ConfigError",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedDyn",
    "FedMedian",
    "FedPEFTModule",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "FederatedCallback",
    "FederatedDataModule",
    "FederatedHooks",
    "FederatedLoop",
    "FederatedTrainer",
    "Federation",
    "Round",
    "Scaffold",
    "SequentialRunner",
    "ServerAggregation",
    "Strategy",
    "VectorizedRunner",
    "communication_report",
    "payload_bytes",
]

# the module of each public name, imported when the name is first read
_MODULES = {
    "aggregation": ("ServerAggregation",),
    "availability": ("ClientAvailability",),
    "backbone": ("Backbone",),
    "client": ("FedPEFTModule",),
    "comm": ("CommReport", "communication_report", "payload_bytes"),
    "data": ("FederatedDataModule",),
    "errors": ("ConfigError",),
    "federation": ("ClientContext", "ClientResult", "ClientRunner", "Federation", "Round"),
    "hooks": ("ClientDropped", "FederatedCallback", "FederatedHooks"),
    "loop": ("FederatedLoop",),
    "runners": ("SequentialRunner", "VectorizedRunner"),
    "strategies": (
        "ClientUpdate",
        "FedAdagrad",
        "FedAdam",
        "FedAvg",
        "FedDyn",
        "FedMedian",
        "FedProx",
        "FedTrimmedAvg",
        "FedYogi",
        "Scaffold",
        "Strategy",
    ),
    "trainer": ("FederatedTrainer",),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fedpeft_pl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedpeft_pl.{module}"), name)
    globals()[name] = value  # found once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
