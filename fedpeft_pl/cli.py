"""The ``fedpeft`` command: LightningCLI with federated defaults and a ``comm`` subcommand.

::

    fedpeft fit --config configs/prompt.yaml          # train
    fedpeft comm --config configs/prompt.yaml         # bytes per client, round and run; no training
    fedpeft fit --config configs/prompt.yaml --ckpt_path last    # resume
    fedpeft export --config runs/prompt/version_0/config.yaml --ckpt_path last --output prompt.safetensors
    fedpeft fit --config configs/prompt.yaml --trainer.strategy ddp --trainer.devices 4   # several GPUs
    fedpeft flower-app my-app --config configs/prompt.yaml    # a Flower app for `flwr run my-app <superlink>`
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, NoReturn, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fedpeft_pl import yaml_include
from fedpeft_pl.client import FedPEFTModule
from fedpeft_pl.data import FederatedDataModule
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.loop import FederatedTrainer


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Expected a path but",
)


def one_line(message: str) -> str:
    """Condense a jsonargparse error report into one line that names the key and the problem."""
    key, detail = _condense(message)
    line = f"{key}: {detail}" if key else detail
    if re.search(r"unknown option|does not accept option|expected |cannot be used", line):
        line += "; add --print_config to see every valid key and its value"
    return line


def _condense(text: str) -> tuple[Optional[str], str]:
    text = text.strip()
    key = None
    match = re.match(r'Parser key "([^"]+)":\s*', text)
    if match:
        key, text = match.group(1), text[match.end() :]
    lines = [line.strip().lstrip("-").strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(_NOISE)] or [text]
    detail = lines[0]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("Problem with given class_path"):
            inner_key, detail = _condense("\n".join(lines[i + 1 :]))
            if inner_key:
                key = f"{key}.{inner_key}" if key else inner_key
            elif not detail.startswith("unknown option"):
                path = re.search(r"'([^']+)'", line)
                detail = f"class_path {path.group(1) if path else ''!r} cannot be used: {detail}"
            break
    detail = re.sub(
        r"Expected a <class '([\w.]+)'>\. Got value: (.*)", lambda m: f"expected {m[1]}, got {m[2]!r}", detail
    )
    detail = re.sub(r"Option '([^']+)' is not accepted", r"unknown option '\1'", detail)
    return key, detail


class FedPEFTParser(LightningArgumentParser):
    """Reports configuration mistakes as a one-line ConfigError instead of usage text.

    Config files may start from another with ``__base__: other.yaml`` (:mod:`fedpeft_pl.yaml_include`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_mode", yaml_include.register())
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse is probing; it catches this itself
            super().error(message, ex)
        raise ConfigError(one_line(message)) from ex


class FedPEFTCLI(LightningCLI):
    """LightningCLI over FedPEFTModule, FederatedDataModule and FederatedTrainer."""

    def __init__(self, args: Optional[list[str]] = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(
            FedPEFTModule,
            FederatedDataModule,
            trainer_class=FederatedTrainer,
            parser_class=FedPEFTParser,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "comm": {"model", "datamodule"}, "export": {"model", "datamodule"}}


class _TqdmHandler(logging.StreamHandler):
    """Writes log records above any progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def _configure_logging() -> None:
    logger = logging.getLogger("fedpeft_pl")
    if not logger.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


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
    _configure_logging()
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
    """``fedpeft flower-app DIR --config ...``: write a Flower app directory for that config."""
    if not argv or argv[0].startswith("-") or argv[0] in ("-h", "--help"):
        print(
            "usage: fedpeft flower-app DIR --config CONFIG [--config OVERLAY ...] [--key value ...]\n"
            "Writes DIR/pyproject.toml, DIR/fedpeft_app.py and DIR/fedpeft.yaml (the resolved config) for\n"
            "`flwr run DIR <superlink>`; the arguments after DIR are those of `fedpeft fit`.",
            file=sys.stderr,
        )
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    try:
        from fedpeft_pl.flower import write_app
    except ImportError as err:
        raise ConfigError(str(err)) from err
    directory = write_app(argv[0], argv[1:])
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
