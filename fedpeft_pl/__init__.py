"""fedpeft-pl: federated parameter-efficient fine-tuning of frozen vision transformers on Lightning."""

from fedpeft_pl.aggregation import ServerAggregation
from fedpeft_pl.availability import ClientAvailability
from fedpeft_pl.backbone import Backbone
from fedpeft_pl.client import FedPEFTModule
from fedpeft_pl.comm import CommReport, communication_report, payload_bytes
from fedpeft_pl.data import FederatedDataModule
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.hooks import ClientDropped, FederatedCallback
from fedpeft_pl.loop import FederatedLoop, FederatedTrainer
from fedpeft_pl.strategies import (
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "ClientAvailability",
    "ClientDropped",
    "ClientUpdate",
    "CommReport",
    "ConfigError",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedMedian",
    "FedPEFTModule",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "FederatedCallback",
    "FederatedDataModule",
    "FederatedLoop",
    "FederatedTrainer",
    "ServerAggregation",
    "Strategy",
    "communication_report",
    "payload_bytes",
]
