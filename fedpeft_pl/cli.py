"""The ``fedpeft`` command: subcommand dispatch and one-line errors.

::

    fedpeft --help                                    # what each subcommand does
    fedpeft fit --config configs/prompt.yaml          # train
    fedpeft comm --config configs/prompt.yaml         # bytes per client, round and run; no training
    fedpeft fit --config configs/prompt.yaml --ckpt_path last    # resume
    fedpeft export --config runs/prompt/version_0/config.yaml --ckpt_path last --output prompt.safetensors
    fedpeft fit --config configs/prompt.yaml --trainer.strategy ddp --trainer.devices 4   # several GPUs
    fedpeft flower-app my-app --config configs/prompt.yaml    # a Flower app for `flwr run my-app <superlink>`
    fedpeft worker --config my-app/fedpeft.yaml --socket /run/fedpeft/node-0/worker.sock   # beside a SuperNode
    fedpeft report runs/quickstart --output report    # compare runs: a Markdown table and two figures

The parser, the LightningCLI subclass and logging live in :mod:`fedpeft_pl.config`. This module
imports each subcommand's code only when that subcommand runs: ``fedpeft --help``, a subcommand's
usage and a mistaken command name answer without importing torch or Lightning, and ``fedpeft comm``
runs without Lightning (:mod:`fedpeft_pl.comm_command`) wherever its output is the same.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

from fedpeft_pl.errors import ConfigError

if TYPE_CHECKING:
    from fedpeft_pl.config import one_line

__all__ = ["main", "one_line"]

COMMANDS = ("fit", "comm", "export", "flower-app", "worker", "report")

USAGE = """usage: fedpeft [--verbose] [--debug] SUBCOMMAND [--config CONFIG ...] [--key value ...]

fedpeft: federated parameter-efficient fine-tuning (prompts, adapters, LoRA, ...) of frozen ViTs,
with PyTorch Lightning. Each subcommand takes --help.

subcommands:
  fit          train: one federated run, logged to TensorBoard, checkpointed each round
  comm         print what each client sends per round and the whole run costs; trains nothing
  export       write a trained checkpoint as one safetensors file (plain timm where the method merges)
  flower-app   write a Flower app directory to deploy a config across machines
  worker       keep a deployment's backbone loaded beside a SuperNode and train for its thin ClientApps
  report       compare finished runs: a Markdown table and accuracy-vs-MiB and -round figures

options:
  --verbose    also show Lightning's own messages (accelerators, model summary, tips)
  --debug      show the traceback instead of the one-line error (or FEDPEFT_DEBUG=1)

examples:
  fedpeft fit --config configs/quickstart.yaml
  fedpeft fit --config configs/quickstart.yaml --ckpt_path last
  fedpeft comm --config configs/prompt.yaml
  fedpeft export --config runs/quickstart/prompt/version_0/config.yaml --ckpt_path last --output prompt.safetensors
  fedpeft report runs/quickstart --output report
"""


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
    verbose = bool(os.environ.get("FEDPEFT_VERBOSE"))
    if "--verbose" in argv:
        argv.remove("--verbose")
        verbose = True
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    try:
        if not argv[0].startswith("-") and argv[0] not in COMMANDS:
            raise ConfigError(
                f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} (fedpeft --help says what each "
                "does)"
            )
        if argv[0] == "flower-app":
            _flower_app_usage(argv[1:])
        if argv[0] == "worker":  # builds its run itself, once, and serves until stopped
            _worker(argv[1:])
            return
        if argv[0] == "comm" and not verbose and _comm_without_lightning(argv[1:], frozen=from_command_line):
            return
        config = _import_config(frozen=from_command_line)  # every command from here on builds a config
        config.configure_logging(verbose)
        config._CONFIG_FILES[:] = [b for a, b in itertools.pairwise(argv) if a == "--config"] + [
            a.split("=", 1)[1] for a in argv if a.startswith("--config=")
        ]
        if argv[0] == "flower-app":
            _flower_app(argv[1:])
        elif argv[0] == "report":
            from fedpeft_pl.report import report_command

            report_command(argv[1:])
        elif from_command_line:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv[1:] = argv
            config.FedPEFTCLI()
        else:
            config.FedPEFTCLI(args=argv)
    except Exception as err:
        cause = _config_error_in(err)
        if cause is None or debug:
            raise
        print(f"fedpeft: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _comm_without_lightning(argv: list[str], frozen: bool) -> bool:
    """``fedpeft comm`` through :mod:`fedpeft_pl.comm_command`, which imports no Lightning: True where it ran
    (or refused the config in one line), False where the LightningCLI is to run it (see that module)."""
    if any(os.environ.get(name, "0") != "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")):
        return False  # a process of a distributed job: Lightning's rank decides who speaks
    return _imported("fedpeft_pl.comm_command", frozen).run(argv)


def _import_config(frozen: bool) -> ModuleType:
    """:mod:`fedpeft_pl.config`, and with it Lightning, timm and torch.

    With ``frozen`` (the command's own process, not a caller's) the import runs without the cyclic
    garbage collector, and the objects it built are then frozen out of later collections: importing
    torch, Lightning and torchmetrics builds millions of objects that live as long as the process, and
    the collector traversed them again and again, about 1.3 s of the 7 s of CPU from ``fedpeft fit``
    to the quickstart's round 1 (benchmarks/README.md, "Start-up"). What the import left as garbage,
    a few MiB, is never collected.
    """
    return _imported("fedpeft_pl.config", frozen)


def _imported(name: str, frozen: bool) -> ModuleType:
    """The module ``name``, imported as :func:`_import_config` says (without the collector where ``frozen``)."""
    if not frozen or name in sys.modules:
        return importlib.import_module(name)
    enabled = gc.isenabled()
    gc.disable()
    try:
        module = importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return module


def _flower_app_usage(argv: list[str]) -> None:
    """``fedpeft flower-app`` without a directory, or with --help: print its usage and exit (2 unless asked for)."""
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


WORKER_USAGE = """usage: fedpeft worker --config APP/fedpeft.yaml --socket PATH [--max-message-mib N]

A long-lived process beside a SuperNode (or one per GPU, shared by several SuperNodes, which take turns):
builds the run's frozen backbone and PEFT module once and trains and evaluates for the thin ClientApps
of SuperNodes started with --node-config '... worker-socket="PATH"'. The socket's folder is made private
to this user (0700). docs/deploy.md, "A warm worker beside each SuperNode", shows a systemd unit."""


def _worker(argv: list[str]) -> None:
    """``fedpeft worker --config ... --socket ...``: the usage and argument mistakes without importing numpy,
    Flower or torch; then :func:`fedpeft_pl.deploy.worker.run`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(WORKER_USAGE, file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    options = {"--config": None, "--socket": None, "--max-message-mib": "2048"}
    rest = list(argv)
    while rest:
        key, _, value = rest.pop(0).partition("=")
        if key not in options or (not value and not rest):
            raise ConfigError("fedpeft worker takes --config FILE --socket PATH [--max-message-mib N]")
        options[key] = value or rest.pop(0)
    config, path, mib = options["--config"], options["--socket"], options["--max-message-mib"]
    if config is None or path is None:
        raise ConfigError("fedpeft worker needs --config FILE (the app's fedpeft.yaml) and --socket PATH")
    try:
        max_bytes = int(float(mib or "") * 2**20)
    except ValueError as err:
        raise ConfigError(f"--max-message-mib {mib}: not a number") from err
    if not os.path.isfile(config):
        raise ConfigError(f"--config {config}: no such file (the app's fedpeft.yaml)")
    from fedpeft_pl.deploy.worker import run

    run(config, path, max_bytes)


def _flower_app(argv: list[str]) -> None:
    """``fedpeft flower-app DIR --config ...``: write a Flower app directory for that config (needs no Flower)."""
    from fedpeft_pl.deploy.secure_aggregation import split_arguments
    from fedpeft_pl.deploy.writer import write_app

    secure_aggregation, fit_args = split_arguments(argv[1:])
    directory = write_app(argv[0], fit_args, secure_aggregation=secure_aggregation)
    print(
        f"wrote the Flower app {directory}/ (pyproject.toml, fedpeft_app.py, fedpeft.yaml); run it with: flwr run "
        f"{directory} <superlink>"
    )


def _config_error_in(err: BaseException) -> Optional[ConfigError]:
    """The ConfigError that caused ``err``, also when jsonargparse or Lightning wrapped it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def __getattr__(name: str) -> Any:
    if name == "one_line":  # kept importable from here; it lives with the parser
        from fedpeft_pl.config import one_line

        return one_line
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
