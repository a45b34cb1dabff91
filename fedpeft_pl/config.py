"""Configuration: the LightningCLI subclass, its parser with one-line errors, logging set-up, and
building a run (trainer, module, data module) from YAML without the command line.

:mod:`fedpeft_pl.cli` dispatches subcommands to this; :mod:`fedpeft_pl.flower` and
:mod:`fedpeft_pl.flower_app` build runs through it; it imports neither.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional, Union

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fedpeft_pl import yaml_include
from fedpeft_pl.client import FedPEFTModule
from fedpeft_pl.data import FederatedDataModule
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.trainer import FederatedTrainer

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


def configure_logging() -> None:
    """fedpeft's log lines on stderr, written above any progress bar."""
    logger = logging.getLogger("fedpeft_pl")
    if not logger.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False



@contextlib.contextmanager
def own_argv() -> Iterator[None]:
    """LightningCLI given ``args`` warns about the process's own command line; hide it while building."""
    saved = sys.argv[:]
    sys.argv[1:] = []
    try:
        yield
    finally:
        sys.argv[:] = saved


def build_run(
    config: Union[str, os.PathLike], save_config: bool = True
) -> tuple[FederatedTrainer, FedPEFTModule, FederatedDataModule, dict[str, Any]]:
    """The trainer, module and data module of a ``fedpeft fit`` config file, as the CLI builds them,
    and the config's arguments of ``fit`` itself (``ckpt_path``, ``weights_only``)."""
    configure_logging()
    settings = yaml.safe_load(Path(config).read_text())
    if not isinstance(settings, dict):
        raise ConfigError(f"{os.fspath(config)!r} is not a fedpeft config (a YAML mapping with trainer, model and data)")
    fit_args = {k: settings.pop(k) for k in ("ckpt_path", "weights_only") if k in settings}
    kwargs = {} if save_config else {"save_config_callback": None}
    with own_argv():
        cli = FedPEFTCLI(args=["--config", yaml.safe_dump(settings)], run=False, **kwargs)
    return cli.trainer, cli.model, cli.datamodule, fit_args


def resolve_config(fit_args: list[str]) -> str:
    """The whole config that ``fedpeft fit <fit_args>`` would run, every ``--config`` and override merged, as YAML."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), own_argv():
        try:
            FedPEFTCLI(args=["fit", *fit_args, "--print_config"])
        except SystemExit as done:
            if done.code not in (0, None):
                raise
    text = out.getvalue()
    if "trainer:" not in text:
        raise ConfigError("could not resolve the config; check it with: fedpeft fit <the same arguments> --print_config")
    return text
