"""fedpeft-pl: federated parameter-efficient fine-tuning of frozen vision transformers on Lightning."""

from fedpeft_pl.aggregation import ClientUpdate, FedAvg, ServerAggregation, Strategy
from fedpeft_pl.backbone import Backbone
from fedpeft_pl.client import FedPEFTModule
from fedpeft_pl.comm import CommReport, communication_report, payload_bytes
from fedpeft_pl.data import FederatedDataModule
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.hooks import FederatedCallback
from fedpeft_pl.loop import FederatedLoop, FederatedTrainer

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "ClientUpdate",
    "CommReport",
    "ConfigError",
    "FedAvg",
    "FedPEFTModule",
    "FederatedCallback",
    "FederatedDataModule",
    "FederatedLoop",
    "FederatedTrainer",
    "ServerAggregation",
    "Strategy",
    "communication_report",
    "payload_bytes",
]
