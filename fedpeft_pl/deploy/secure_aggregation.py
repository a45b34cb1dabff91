"""Secure aggregation settings for a Flower deployment, and which runs they compose with (needs no Flower).

With secure aggregation on, the ServerApp drives Flower's own SecAgg+ protocol
(``flwr.server.workflow.SecAggPlusWorkflow``) for every round's sampled SuperNodes, and each
ClientApp answers through Flower's ``secaggplus_mod``: every client quantises its
sample-weighted update to integers, adds pairwise and private masks and uploads only the masked
vector, so the server can reconstruct the weighted mean of the updates of the clients that
finished, never one client's update. The protocol is Flower's; :mod:`fedpeft_pl.deploy.secagg`
only builds its instructions from fedpeft's round message and hands its result to the server.

The settings are deployment settings, not part of the experiment: they live in the Flower app's
run config (``[tool.flwr.app.config]`` of the written ``pyproject.toml``), which both the
ServerApp and every ClientApp read, so that a ClientApp refuses to send a plain update when the
deployment asks for secure aggregation, and ``flwr run --run-config`` can change them at launch.
``fedpeft.yaml`` stays the same experiment that ``fedpeft fit`` simulates.

Example::

    fedpeft flower-app my-app --config configs/quickstart.yaml --secure-aggregation \\
        --num-shares 3 --reconstruction-threshold 2
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

from fedpeft_pl.errors import ConfigError

ENABLE = "secure-aggregation"
_PREFIX = "secagg-"
# command-line flag of `fedpeft flower-app` -> field
FLAGS = {
    "--num-shares": "num_shares",
    "--reconstruction-threshold": "reconstruction_threshold",
    "--clipping-range": "clipping_range",
    "--quantization-range": "quantization_range",
    "--max-weight": "max_weight",
}


@dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+ settings, as Flower's ``SecAggPlusWorkflow`` takes them.

    Args:
        num_shares: shares of each client's secret (its neighbours in the protocol's graph, itself
            included); an int > 2, or a float in (0, 1] for that fraction of the round's clients.
        reconstruction_threshold: shares needed to rebuild a secret; an int >= 2 below
            ``num_shares``, or a float fraction of ``num_shares``. A round survives dropouts while
            every client keeps at least this many live neighbours; the server learns an individual
            update only by colluding with at least this many clients.
        clipping_range: every element of a client's weighted update (its update times
            ``num_samples / max_weight``) is clipped to ``[-clipping_range, clipping_range]``.
        quantization_range: levels of the fixed-point encoding of ``[-clipping_range, clipping_range]``;
            the aggregate's rounding error is about ``2 * clipping_range / quantization_range``
            divided by the sum of the clients' weights.
        max_weight: the largest client sample count expected; weights are ``num_samples / max_weight``.

    Example::

        SecureAggregation(num_shares=3, reconstruction_threshold=2).to_run_config()
    """

    num_shares: Union[int, float] = 1.0
    reconstruction_threshold: Union[int, float] = 0.5
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 1000.0

    def __post_init__(self) -> None:
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, bool) or not isinstance(shares, (int, float)):
            raise ConfigError(f"secure aggregation num_shares must be a number, got {shares!r}")
        if isinstance(shares, int) and shares <= 2:
            raise ConfigError(f"secure aggregation num_shares must be an int > 2 or a fraction in (0, 1], got {shares}")
        if isinstance(shares, float) and not 0 < shares <= 1:
            raise ConfigError(f"secure aggregation num_shares as a fraction must be in (0, 1], got {shares}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ConfigError(f"secure aggregation reconstruction_threshold must be a number, got {threshold!r}")
        if isinstance(threshold, int) and not (2 <= threshold and (isinstance(shares, float) or threshold < shares)):
            raise ConfigError(
                f"secure aggregation reconstruction_threshold must be an int >= 2 below num_shares ({shares}), got "
                f"{threshold}"
            )
        if isinstance(threshold, float) and not 0 < threshold <= 1:
            raise ConfigError(
                f"secure aggregation reconstruction_threshold as a fraction must be in (0, 1], got {threshold}"
            )
        if not self.clipping_range > 0:
            raise ConfigError(f"secure aggregation clipping_range must be > 0, got {self.clipping_range}")
        if not isinstance(self.quantization_range, int) or not 1 < self.quantization_range < 2**32:
            raise ConfigError(
                f"secure aggregation quantization_range must be an int in (1, 2**32), got {self.quantization_range}"
            )
        if not self.max_weight > 0:
            raise ConfigError(f"secure aggregation max_weight must be > 0, got {self.max_weight}")

    def to_run_config(self) -> dict[str, Any]:
        """The Flower run config entries (``secure-aggregation = true`` and ``secagg-*``)."""
        return {ENABLE: True, **{_PREFIX + k.replace("_", "-"): v for k, v in asdict(self).items()}}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Optional[SecureAggregation]:
        """The settings in a Flower run config, or None when secure aggregation is off."""
        if not run_config.get(ENABLE, False):
            return None
        fields = {
            k: run_config[_PREFIX + k.replace("_", "-")]
            for k in cls.__dataclass_fields__
            if _PREFIX + k.replace("_", "-") in run_config
        }
        return cls(**fields)


def split_arguments(argv: list[str]) -> tuple[Optional[SecureAggregation], list[str]]:
    """Take ``--secure-aggregation`` and its settings (``--num-shares N`` ...) out of ``flower-app`` arguments."""
    enabled, values, rest = False, {}, []
    items = iter(argv)
    for arg in items:
        flag, _, inline = arg.partition("=")
        if arg == "--" + ENABLE:
            enabled = True
        elif flag in FLAGS:
            value = inline if inline else next(items, None)
            if value is None:
                raise ConfigError(f"{flag} needs a value")
            values[FLAGS[flag]] = _number(flag, value)
        else:
            rest.append(arg)
    if values and not enabled:
        raise ConfigError(
            f"{', '.join('--' + k.replace('_', '-') for k in values)} only apply with --secure-aggregation"
        )
    return (SecureAggregation(**values) if enabled else None), rest


def _number(flag: str, value: str) -> Union[int, float]:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{flag} must be a number, got {value!r}") from None


def check_composition(strategy: Union[type, Any], upload: Optional[Any]) -> None:
    """Refuse, with one line, a run whose server needs what secure aggregation hides.

    SecAgg+ gives the server only the sample-weighted sum of the updates, so the strategy must be
    a function of that sum (it declares ``needs_individual_updates`` false: FedAvg, FedProx,
    FedAdagrad, FedAdam, FedYogi, and DPFedAvg, whose clients clip their updates before masking),
    and its clients must send nothing else (``sends_client_extras``). The clients' uploads are
    SecAgg+'s masked fixed-point vectors, so an upload codec cannot apply. The rules are
    :func:`fedpeft_pl.capabilities.check_run`'s.

    Args:
        strategy: the strategy, or its class (built with its defaults).
        upload: the upload codec (or its class, or None).
    """
    from fedpeft_pl.capabilities import RunParts, check_run

    def built(part: Any) -> Any:
        return part() if isinstance(part, type) else part

    check_run(RunParts(strategy=built(strategy), upload=built(upload), secure_aggregation=True))


def check_resolved_config(trainer: Mapping[str, Any]) -> None:
    """:func:`check_composition` on the ``trainer`` section of a resolved config (before anything is built)."""
    from fedpeft_pl.strategies import FedAvg

    if trainer.get("privacy") is not None:
        raise ConfigError(
            "secure aggregation cannot run with local DP (trainer.privacy) yet: each client reports the epsilon it "
            "spent beside an update the masked sum hides; remove one of them, or use DPFedAvg for central DP"
        )
    aggregation = trainer.get("aggregation")
    strategy = FedAvg() if aggregation is None else _built(aggregation)
    upload = trainer.get("compress_upload")
    check_composition(strategy, None if upload is None else _built(upload))


def _class(spec: Union[str, Mapping[str, Any]]) -> type:
    path = spec["class_path"] if isinstance(spec, Mapping) else spec
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"cannot import {path}: {err}") from None


def _built(spec: Union[str, Mapping[str, Any]]) -> Any:
    """The part a config's ``class_path`` (with its ``init_args``, parts of parts included) names, built."""
    init_args = spec.get("init_args") or {} if isinstance(spec, Mapping) else {}
    arguments = {
        key: _built(value) if isinstance(value, Mapping) and "class_path" in value else value
        for key, value in init_args.items()
    }
    try:
        return _class(spec)(**arguments)
    except ConfigError:
        raise
    except Exception as err:  # arguments this part refuses: the run would refuse them too
        raise ConfigError(f"cannot build {spec!r}: {type(err).__name__}: {err}") from None
