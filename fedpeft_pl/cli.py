"""The ``fedpeft`` command: subcommand dispatch and one-line errors.

::

    fedpeft fit --config configs/prompt.yaml          # train
    fedpeft comm --config configs/prompt.yaml         # bytes per client, round and run; no training
    fedpeft fit --config configs/prompt.yaml --ckpt_path last    # resume
    fedpeft export --config runs/prompt/version_0/config.yaml --ckpt_path last --output prompt.safetensors
    fedpeft fit --config configs/prompt.yaml --trainer.strategy ddp --trainer.devices 4   # several GPUs
    fedpeft flower-app my-app --config configs/prompt.yaml    # a Flower app for `flwr run my-app <superlink>`

The parser, the LightningCLI subclass and logging live in :mod:`fedpeft_pl.config`.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from fedpeft_pl.config import FedPEFTCLI, configure_logging, one_line
from fedpeft_pl.errors import ConfigError

__all__ = ["main", "one_line"]


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``fedpeft`` console script.

    A mistake prints one line and exits with status 2; ``--debug`` (or ``FEDPEFT_DEBUG=1``)
    shows the traceback instead.
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("FEDPEFT_DEBUG"))
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    configure_logging()
    try:
        if argv[:1] == ["flower-app"]:
            _flower_app(argv[1:])
        elif from_command_line:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv[1:] = argv
            FedPEFTCLI()
        else:
            FedPEFTCLI(args=argv)
    except Exception as err:
        cause = _config_error_in(err)
        if cause is None or debug:
            raise
        print(f"fedpeft: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _flower_app(argv: list[str]) -> None:
    """``fedpeft flower-app DIR --config ...``: write a Flower app directory for that config (needs no Flower)."""
    if not argv or argv[0].startswith("-") or argv[0] in ("-h", "--help"):
        print(
            "usage: fedpeft flower-app DIR --config CONFIG [--config OVERLAY ...] [--key value ...]\n"
            "                          [--secure-aggregation [--num-shares N] [--reconstruction-threshold T]\n"
            "                           [--clipping-range C] [--quantization-range Q] [--max-weight W]]\n"
            "Writes DIR/pyproject.toml, DIR/fedpeft_app.py and DIR/fedpeft.yaml (the resolved config) for\n"
            "`flwr run DIR <superlink>`; the arguments after DIR are those of `fedpeft fit`. With\n"
            "--secure-aggregation the server learns only the sum of the clients' updates (Flower's SecAgg+).",
            file=sys.stderr,
        )
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    from fedpeft_pl.flower_app import write_app
    from fedpeft_pl.secure_aggregation import split_arguments

    secure_aggregation, fit_args = split_arguments(argv[1:])
    directory = write_app(argv[0], fit_args, secure_aggregation=secure_aggregation)
    print(f"wrote the Flower app {directory}/ (pyproject.toml, fedpeft_app.py, fedpeft.yaml); run it with: flwr run {directory} <superlink>")


def _config_error_in(err: BaseException) -> Optional[ConfigError]:
    """The ConfigError that caused ``err``, also when jsonargparse or Lightning wrapped it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
