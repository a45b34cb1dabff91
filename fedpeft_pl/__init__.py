"""fedpeft-pl: federated parameter-efficient fine-tuning of frozen vision transformers on Lightning."""

from fedpeft_pl import _moved
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
