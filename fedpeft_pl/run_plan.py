"""What a run will send, without Lightning: the trainer settings' own checks and ``fedpeft comm``'s report.

:class:`~fedpeft_pl.trainer.FederatedTrainer` checks its federated settings with :func:`federation_settings`
and :func:`refuse_epochs_and_steps`, and its ``comm`` reports with :func:`communication_plan`; so does
:mod:`fedpeft_pl.comm_command`, which runs ``fedpeft comm`` without building a Lightning Trainer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedpeft_pl.availability import ClientAvailability
from fedpeft_pl.clock import format_seconds
from fedpeft_pl.comm import CommReport, communication_report
from fedpeft_pl.compression import Codec
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import Federation

if TYPE_CHECKING:
    from fedpeft_pl.server import Server

__all__ = [
    "EPOCH_LIMITS",
    "NOT_IN_ROUNDS",
    "communication_plan",
    "federation_settings",
    "refuse_epochs_and_steps",
    "refuse_in_rounds",
]

# Lightning's limits in epochs and steps: a federated run counts rounds
EPOCH_LIMITS = ("max_epochs", "min_epochs", "max_steps", "min_steps")

# Lightning settings in epochs and steps that a federated run has no use for, with what to use
# instead; FederatedTrainer refuses them with that advice, and --help does not list them
NOT_IN_ROUNDS = {
    "fast_dev_run": (
        "for a quick check run --trainer.num_rounds 1 --trainer.clients_per_round 1 --trainer.local_epochs 1"
    ),
    "overfit_batches": "a client trains trainer.local_epochs over its own data",
    "limit_train_batches": (
        "a client trains trainer.local_epochs over its own data; cap stragglers' work with trainer.availability"
    ),
    "val_check_interval": (
        "the server model is evaluated after a round: set trainer.check_val_every_n_epoch (every n rounds)"
    ),
    "reload_dataloaders_every_n_epochs": "each client's loader is set up anew every round",
}


def federation_settings(
    num_rounds: int, clients_per_round: int, local_epochs: int, seed: int, client_sampling: str
) -> dict[str, Any]:
    """The federation's shape less ``num_clients`` (the loop's ``settings``), checked as at fit time where the
    number of clients is known."""
    settings: dict[str, Any] = {
        "num_rounds": num_rounds,
        "clients_per_round": clients_per_round,
        "local_epochs": local_epochs,
        "sampling": client_sampling,
        "seed": seed,
    }
    try:
        Federation(num_clients=max(clients_per_round, 1) if isinstance(clients_per_round, int) else 1, **settings)
    except ConfigError as err:
        raise ConfigError(f"trainer.{err}") from None
    return settings


def refuse_epochs_and_steps(kwargs: MutableMapping[str, Any]) -> None:
    """Refuse Lightning's epoch and step limits and the settings of :data:`NOT_IN_ROUNDS` in ``kwargs``, in one
    line; remove their "no change" values from ``kwargs``."""
    for name in (*EPOCH_LIMITS, *NOT_IN_ROUNDS):
        refuse_in_rounds(name, kwargs.get(name))
        kwargs.pop(name, None)


def refuse_in_rounds(name: str, value: Any) -> None:
    """Refuse, in one line, the Trainer argument ``name`` (an epoch or step limit, or one of
    :data:`NOT_IN_ROUNDS`) unless ``value`` is one of Lightning's "no change" values."""
    if name in EPOCH_LIMITS:
        if value not in (None, -1):
            raise ConfigError(
                f"FederatedTrainer counts rounds, not epochs or steps; remove trainer.{name} and set trainer.num_rounds"
            )
        return
    # Lightning's "no change" values pass: 1.0 is all the batches, or one check an epoch
    unchanged = value in (None, False, 0) or (
        name in ("limit_train_batches", "val_check_interval") and isinstance(value, float) and value == 1.0
    )
    if not unchanged:
        raise ConfigError(f"trainer.{name} does not apply to a federated run; remove it: {NOT_IN_ROUNDS[name]}")


def communication_plan(
    model: Any,
    datamodule: Any,
    settings: Mapping[str, Any],
    availability: ClientAvailability,
    server: Server,
    describe_runner: Callable[[], tuple[str, str]],
    parts: Sequence[Any],
    releases_client_statistics: bool,
) -> CommReport:
    """What one client sends per round and the whole run costs (``fedpeft comm``), without training or downloading.

    Args:
        model: the PEFT'd module (a :class:`~fedpeft_pl.client.FedPEFTModule` or a
            :class:`~fedpeft_pl.peft_model.PEFTModel`).
        datamodule: the data (a FederatedDataModule or a :class:`~fedpeft_pl.data.spec.FederatedData`), or None.
        settings: the federation's shape less ``num_clients`` (:func:`federation_settings`).
        availability: the clients' dropout and stragglers.
        server: the server: its strategy, codecs, clock and schedule.
        describe_runner: which runner trains the clients and why.
        parts: the strategy and the run's callbacks: those with a ``describe()`` add a note.
        releases_client_statistics: whether the clients' replies carry their training loss.
    """
    # without reading the data: natural clients (data.num_clients null) are found there when the run starts
    if hasattr(datamodule, "known_num_clients"):
        num_clients = datamodule.known_num_clients
    else:
        num_clients = getattr(datamodule, "num_clients", None)
    # checked before anything is said: the settings must fit N where it is known
    federation = Federation(num_clients=num_clients, **settings) if num_clients is not None else None
    notes = (
        ["clients are Poisson-sampled: m is the expected number per round"] if settings["sampling"] == "poisson" else []
    )
    if availability.dropout or availability.stragglers:
        notes.append(f"{availability!r}: dropped clients are sent nothing and send nothing")
    runner, why = describe_runner()
    notes.append(f"clients run on the {runner} runner ({why})")
    notes += [c.describe() for c in parts if hasattr(c, "describe")]
    plan = getattr(server.strategy, "privacy_plan", None)
    if plan is not None and federation is not None:  # the epsilon the run will spend, before it trains
        extra = {}
        if "dimension" in inspect.signature(plan).parameters:  # distributed DP sizes its rounding by it
            local_names = getattr(model, "local_names", ())
            extra["dimension"] = sum(
                p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in local_names
            )
        notes.append(plan(federation, buffered=server.asynchronous, **extra))
    local = [p for n, p in model.named_parameters() if n in getattr(model, "local_names", ())]
    if local:
        notes.append(f"{sum(p.numel() for p in local):,} further parameters are personalised: they stay on each client")
    if type(server.upload) is not Codec or type(server.download) is not Codec:
        notes.append(f"upload {server.upload!r}, download {server.download!r}")
    report = communication_report(
        model,
        settings["clients_per_round"],
        settings["num_rounds"],
        upload=server.upload,
        download=server.download,
        notes=tuple(notes),
        strategy=server.strategy,
        round_config=server.strategy.configure_fit(1, {})[1],
        with_loss=releases_client_statistics,
        num_clients=num_clients,
    )
    clock = server.clock
    if clock is not None:
        down = report.download_wire_bytes or report.download_bytes
        up = report.upload_wire_bytes or report.upload_bytes
        down_s, up_s = clock.median_transfer_seconds(down, up)
        latency = clock.latency.median
        transfers = down_s + up_s + latency
        report = replace(
            report,
            notes=(
                *report.notes,
                f"with {clock!r}: a client task at the median bandwidths spends {format_seconds(down_s)} "
                f"downloading, {format_seconds(up_s)} uploading and {format_seconds(latency)} in latency, "
                f"{format_seconds(transfers)} a round and {format_seconds(transfers * settings['num_rounds'])} "
                f"a run besides its compute (its samples times local epochs at a median "
                f"{clock.speed.median:g} samples/s)",
            ),
        )
    dataset = getattr(datamodule, "dataset", None)
    if dataset is not None:
        partition = getattr(datamodule, "partition", None)
        if num_clients is not None:
            data = f"{dataset!r}, {num_clients} clients split by {partition!r}"
        else:
            data = f"{dataset!r}, a client for each partition {partition!r} finds in the data (data.num_clients null)"
        report = replace(report, data=data)
    return report
