"""``fedpeft comm`` without Lightning: the config parsed as ``fedpeft fit`` parses it, the model sized, the report
printed, and neither Lightning nor torchmetrics imported.

The parser has the ``model``, ``data`` and ``trainer`` groups of the LightningCLI's (:mod:`fedpeft_pl.config`),
built from Lightning-free classes with the same arguments: :class:`~fedpeft_pl.peft_model.PEFTModel` for
``FedPEFTModule``, :class:`~fedpeft_pl.data.spec.FederatedData` for ``FederatedDataModule``, and
:class:`CommTrainer` for ``FederatedTrainer``'s own arguments, beside every argument of Lightning's Trainer
(:data:`LIGHTNING_TRAINER_DEFAULTS`), taken as plain values and never built. The checks and the report are the
ones the trainer makes (:mod:`fedpeft_pl.run_plan`).

It runs one process on a CPU. Where the run or the machine is one whose Lightning side this module does not
reproduce exactly (a GPU or another accelerator on the machine, several devices, a strategy, 16-bit precision,
callbacks, a logger it does not know or one given on the command line, any other non-default Trainer argument,
local DP, which is a Lightning callback) and wherever parsing fails, :func:`run` answers False and the command
runs through the LightningCLI as before, so its output and its one-line errors are the same either way.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from jsonargparse import ArgumentParser, Namespace

from fedpeft_pl import logs, yaml_include
from fedpeft_pl.attacks import Attack
from fedpeft_pl.availability import ClientAvailability
from fedpeft_pl.capabilities import releases_client_statistics
from fedpeft_pl.clock import VirtualClock
from fedpeft_pl.compression import Codec
from fedpeft_pl.data.spec import FederatedData
from fedpeft_pl.peft_model import PEFTModel
from fedpeft_pl.run_plan import communication_plan, federation_settings, refuse_epochs_and_steps
from fedpeft_pl.runners.choice import RunnerChoice
from fedpeft_pl.runners.device_data import DeviceData
from fedpeft_pl.runners.feature_cache import FeatureCache
from fedpeft_pl.schedules import Schedule
from fedpeft_pl.server import Server
from fedpeft_pl.strategies import Strategy

__all__ = ["LIGHTNING_TRAINER_DEFAULTS", "CommTrainer", "comm_parser", "run"]

# a value taken as given and never built: a Lightning object's class_path stays a mapping
Plain = Optional[Union[bool, int, float, str, list, dict]]

# the arguments of lightning.pytorch.Trainer that FederatedTrainer passes on (**kwargs), with their defaults,
# in the LightningCLI parser's order (tests/test_comm.py checks them against Lightning's)
LIGHTNING_TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "strategy": "auto",
    "devices": "auto",
    "num_nodes": 1,
    "precision": None,
    "logger": None,
    "fast_dev_run": False,
    "max_epochs": None,
    "min_epochs": None,
    "max_steps": -1,
    "min_steps": None,
    "max_time": None,
    "limit_train_batches": None,
    "limit_val_batches": None,
    "limit_test_batches": None,
    "limit_predict_batches": None,
    "overfit_batches": 0.0,
    "val_check_interval": None,
    "check_val_every_n_epoch": 1,
    "log_every_n_steps": None,
    "enable_checkpointing": None,
    "enable_progress_bar": None,
    "enable_model_summary": None,
    "accumulate_grad_batches": 1,
    "gradient_clip_val": None,
    "gradient_clip_algorithm": None,
    "deterministic": None,
    "benchmark": None,
    "inference_mode": True,
    "use_distributed_sampler": True,
    "profiler": None,
    "detect_anomaly": False,
    "barebones": False,
    "plugins": None,
    "sync_batchnorm": False,
    "reload_dataloaders_every_n_epochs": 0,
    "default_root_dir": None,
    "enable_autolog_hparams": True,
    "model_registry": None,
}

# Lightning's loggers that a comm run may name: building one does nothing a report shows
_LOGGERS = {
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.csv_logs.CSVLogger",
}
_LOGGER_ARGS = {"save_dir", "name", "version", "prefix", "sub_dir", "default_hp_metric", "log_graph"}
_FULL_PRECISION = (None, 32, "32", "32-true")


class CommTrainer:
    """``FederatedTrainer``'s own arguments (its docstring says what each does), for ``fedpeft comm``'s parser;
    ``privacy`` and ``callbacks`` are Lightning callbacks, taken as given."""

    def __init__(
        self,
        num_rounds: int = 50,
        clients_per_round: int = 8,
        local_epochs: int = 1,
        seed: int = 0,
        aggregation: Optional[Strategy] = None,
        client_sampling: Literal["uniform", "poisson"] = "uniform",
        availability: Optional[ClientAvailability] = None,
        compress_upload: Optional[Codec] = None,
        compress_download: Optional[Codec] = None,
        privacy: Plain = None,
        clock: Optional[VirtualClock] = None,
        schedule: Optional[Schedule] = None,
        attack: Optional[Attack] = None,
        client_runner: Literal["auto", "sequential", "vectorized"] = "auto",
        max_parallel_clients: Optional[int] = None,
        feature_cache: Literal["auto", "memory", "off"] = "auto",
        feature_cache_max_gib: float = 4.0,
        device_data_max_gib: float = 4.0,
        callbacks: Plain = None,
        num_sanity_val_steps: int = 0,
    ) -> None:
        pass


class _Parser(ArgumentParser):
    """jsonargparse's parser as ``fedpeft``'s: no key matched by prefix, ``__base__`` includes; every mistake
    raises (the LightningCLI then reports it in its one line)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        kwargs["exit_on_error"] = False
        kwargs.setdefault("parser_mode", yaml_include.register())
        super().__init__(*args, **kwargs)


def comm_parser() -> ArgumentParser:
    """The parser of ``fedpeft comm``'s arguments: those of the LightningCLI's ``comm`` subcommand."""
    parser = _Parser(prog="fedpeft comm")
    parser.add_argument("-c", "--config", action="config")
    parser.add_argument("--seed_everything", type=Union[bool, int], default=0)
    parser.add_class_arguments(CommTrainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True)
    for name, default in LIGHTNING_TRAINER_DEFAULTS.items():
        parser.add_argument(f"--trainer.{name}", type=Plain, default=default)
    parser.add_class_arguments(PEFTModel, "model", fail_untyped=False, sub_configs=True)
    parser.add_class_arguments(FederatedData, "data", fail_untyped=False, sub_configs=True)
    return parser


@dataclass(frozen=True)
class _Run:
    """What the runner choice reads of a run (:class:`~fedpeft_pl.runners.choice.RunFacts`)."""

    device: torch.device
    precision: str
    gradient_clip_val: Optional[Union[int, float]]
    accumulate_grad_batches: int
    clients_train_privately: bool = False
    callbacks: Sequence[Any] = ()  # fedpeft's own, which the choice does not ask


def run(argv: Sequence[str]) -> bool:
    """Run ``fedpeft comm <argv>`` without Lightning and return True; False, having printed nothing, where only
    the LightningCLI can run it exactly (see the module's docstring)."""
    if any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
        return False
    parser = comm_parser()
    try:
        config = parser.parse_args(list(argv))
    except Exception:  # the LightningCLI says what is wrong, in its words
        return False
    lightning = {name: config.trainer[name] for name in LIGHTNING_TRAINER_DEFAULTS}
    # the logger as the LightningCLI merges it, a later --config's init_args over an earlier one's class
    lightning["logger"] = _logger_as_configured(argv, parsed=lightning["logger"])
    device = _plain_device(lightning)
    seed = config.seed_everything
    if (
        device is None
        or config.trainer.privacy is not None
        or config.trainer.callbacks not in (None, [])
        or config.trainer.num_sanity_val_steps != 0
        or (seed is not False and (seed is True or not 0 <= seed <= np.iinfo(np.uint32).max))
    ):
        return False
    logs.configure()
    if seed is not False:  # as Lightning's seed_everything(seed, workers=True), before anything is built
        os.environ["PL_GLOBAL_SEED"] = str(seed)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        os.environ["PL_SEED_WORKERS"] = "1"
    built = parser.instantiate(config) if hasattr(parser, "instantiate") else parser.instantiate_classes(config)
    model, data, trainer = built.model, built.data, built.trainer
    # FederatedTrainer's checks, in its order
    FeatureCache(trainer.feature_cache, trainer.feature_cache_max_gib)
    DeviceData(trainer.device_data_max_gib)
    settings = federation_settings(
        trainer.num_rounds, trainer.clients_per_round, trainer.local_epochs, trainer.seed, trainer.client_sampling
    )
    refuse_epochs_and_steps(dict(lightning))
    server = Server(
        trainer.aggregation,
        trainer.compress_upload,
        trainer.compress_download,
        trainer.clock,
        trainer.schedule,
        trainer.attack,
    )
    choice = RunnerChoice.configured(trainer.client_runner, device, 1, trainer.max_parallel_clients)
    facts = _Run(
        torch.device(device),
        "bf16-mixed" if lightning["precision"] == "bf16-mixed" else "32-true",
        lightning["gradient_clip_val"],
        lightning["accumulate_grad_batches"],
    )
    report = communication_plan(
        model,
        data,
        settings,
        trainer.availability if trainer.availability is not None else ClientAvailability(),
        server,
        lambda: choice.describe(facts, model, choice.runner == "vectorized"),
        [server.strategy],  # fedpeft's callbacks of a run without local DP describe nothing
        releases_client_statistics([server.strategy]),
    )
    print(report.format())
    return True


def _plain_device(lightning: dict[str, Any]) -> Optional[str]:
    """The device type of one process on one device (a CPU) that these Trainer arguments give, as Lightning resolves
    them; None where the arguments are any others, or Lightning might resolve, refuse or remark on them otherwise."""
    for name, default in LIGHTNING_TRAINER_DEFAULTS.items():
        value = lightning[name]
        if name in ("accelerator", "devices", "precision", "logger"):
            continue
        if name in ("enable_checkpointing", "enable_progress_bar", "enable_model_summary"):
            ok = value is None or isinstance(value, bool)
        elif name == "default_root_dir":
            ok = value is None or isinstance(value, str)
        elif name in ("check_val_every_n_epoch", "accumulate_grad_batches"):
            ok = _integer(value) and value >= 1
        elif name == "log_every_n_steps":
            ok = value is None or (_integer(value) and value >= 0)
        elif name == "limit_val_batches":
            ok = value is None or (_integer(value) and value >= 0) or (isinstance(value, float) and 0 <= value <= 1)
        elif name == "gradient_clip_val":
            ok = value is None or ((_integer(value) or isinstance(value, float)) and value >= 0)
        else:
            ok = value is default or (type(value) is type(default) and value == default)
        if not ok:
            return None
    if lightning["precision"] not in (*_FULL_PRECISION, "bf16-mixed") or not _plain_logger(lightning["logger"]):
        return None
    # with an accelerator on the machine Lightning has more to say (that a GPU goes unused, on stderr) and more
    # to choose: those runs go through it
    if importlib.util.find_spec("torch_xla") is not None or torch.backends.mps.is_available():
        return None
    if torch.cuda.is_available():
        return None
    if lightning["accelerator"] in ("auto", "cpu") and lightning["devices"] in (1, "1", "auto"):
        return "cpu"
    return None


_UNKNOWN = object()


def _logger_as_configured(argv: Sequence[str], parsed: Any) -> Any:
    """``trainer.logger`` as the LightningCLI merges it from the ``--config`` files: a later file's mapping over an
    earlier one's (its ``init_args`` key by key) unless it names another ``class_path``, as :mod:`yaml_include`
    merges ``__base__``; ``_UNKNOWN`` where the logger is given any other way (on the command line, a dotted key)
    or the result disagrees with ``parsed``, the last file's value as this module's parser took it."""
    value = _logger_in_files(argv)
    if isinstance(parsed, dict) and isinstance(value, dict):
        init_args, merged = parsed.get("init_args") or {}, value.get("init_args") or {}
        agree = parsed.get("class_path", value.get("class_path")) == value.get("class_path") and all(
            k in merged and merged[k] == v for k, v in init_args.items()
        )
    else:
        agree = parsed == value
    return value if agree else _UNKNOWN


def _logger_in_files(argv: Sequence[str]) -> Any:
    value: Any = LIGHTNING_TRAINER_DEFAULTS["logger"]
    args = list(argv)
    for i, arg in enumerate(args):
        if "logger" in arg:
            if not arg.startswith(("--config=", "-c=")):
                return _UNKNOWN
        if arg in ("--config", "-c"):
            source = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith(("--config=", "-c=")):
            source = arg.split("=", 1)[1]
        else:
            continue
        try:
            loaded = yaml_include.load_file(source) if os.path.isfile(source) else yaml_include.load(source)
        except Exception:
            return _UNKNOWN
        if not isinstance(loaded, dict) or any("logger" in key for key in loaded if key != "trainer"):
            return _UNKNOWN
        trainer = loaded.get("trainer")
        if not isinstance(trainer, dict) or "logger" not in trainer:
            if isinstance(trainer, dict) and any("logger" in key for key in trainer):
                return _UNKNOWN
            continue
        given = trainer["logger"]
        if isinstance(value, dict) and isinstance(given, dict):
            value = yaml_include.merge(value, given)
        else:
            value = given
    return value


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain_logger(value: Any) -> bool:
    """Whether ``trainer.logger`` is none, Lightning's default or a TensorBoard or CSV logger given plain arguments."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, Namespace):
        value = value.as_dict()
    if not isinstance(value, dict) or set(value) - {"class_path", "init_args"}:
        return False
    init_args = value.get("init_args") or {}
    if isinstance(init_args, Namespace):
        init_args = init_args.as_dict()
    return (
        value.get("class_path") in _LOGGERS
        and isinstance(init_args, dict)
        and set(init_args) <= _LOGGER_ARGS
        and all(v is None or isinstance(v, (str, int, float, bool)) for v in init_args.values())
    )
