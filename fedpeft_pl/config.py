"""Configuration: the LightningCLI subclass, its parser with one-line errors, logging set-up, and
building a run (trainer, module, data module) from YAML without the command line.

:mod:`fedpeft_pl.cli` dispatches subcommands to this; :mod:`fedpeft_pl.deploy.flower` and
:mod:`fedpeft_pl.deploy.writer` build runs through it; it imports neither.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, Optional, Union

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from fedpeft_pl import logs, yaml_include
from fedpeft_pl.client import FedPEFTModule
from fedpeft_pl.data import FederatedDataModule
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.trainer import NOT_IN_ROUNDS, FederatedTrainer

_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Expected a path but",
)


SHIPPED_CONFIGS = (
    "configs/quickstart.yaml (offline, a few minutes on a CPU) "
    "or configs/<method>.yaml (adapter, bias, full, head, lora, prompt)"
)


def one_line(message: str) -> str:
    """Condense a jsonargparse error report into one line that names the key and the problem."""
    if "the following arguments are required" in message:
        return f"no config given: pass --config, e.g. --config {SHIPPED_CONFIGS}"
    yaml_error = _yaml_error(message)
    if yaml_error:
        return yaml_error
    key, detail = _condense(message)
    if key == "data.partition" and "does not correspond to a subclass" in detail:
        # jsonargparse resolves a bare class path against our Partitioner only; Flower's go in as a mapping
        detail += (
            " (fedpeft_pl.data.IID, Dirichlet or Shards); a Flower Datasets partitioner is given with its "
            "arguments in one value: --data.partition '{class_path: flwr_datasets.partitioner.DirichletPartitioner, "
            "init_args: {alpha: 0.1}}'"
        )
    line = f"{key}: {detail}" if key else detail
    if line.startswith("unrecognized arguments"):
        line += "; write each key in full (prefixes are not matched)"
    if re.search(r"unknown option|does not accept option|expected |cannot be used|unrecognized arguments", line):
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
    # typing expressions mean nothing to a user: name the allowed values or the kind of class instead
    literal = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", detail)
    if literal:
        detail = f"expected one of {literal[1]}, got {literal[2]!r}"
    if "typing.Callable" in detail and "Optimizer" in detail:
        reason = detail.rsplit(": ", 1)[-1] if ": " in detail else detail
        detail = f"expected the class path of a torch optimizer, e.g. torch.optim.SGD or torch.optim.AdamW ({reason})"
    return key, detail


def _yaml_error(message: str) -> Optional[str]:
    """A YAML syntax error with the file and line it is in (jsonargparse names neither)."""
    if "Problems parsing config" not in message:
        return None
    for path in _CONFIG_FILES:
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            where, problem = yaml_include.syntax_error(path, err)
            return (
                f"{where}: YAML syntax error ({problem}); fix the file, or check it with "
                f"python -c \"import yaml; yaml.safe_load(open('{path}'))\""
            )
        except OSError:
            continue
    return None


_CONFIG_FILES: list[str] = []  # the --config files of the command being parsed, for _yaml_error


_RST = [
    (
        re.compile(r":(?:class|func|meth|mod|attr|data|obj|paramref|ref|exc|doc):`~?([^`]+)`"),
        lambda m: m[1].rsplit(".", 1)[-1] if "~" in m[0] else m[1],
    ),
    (re.compile(r"``([^`]+)``"), lambda m: m[1]),
]
EPOCH_LIMITS = ("max_epochs", "min_epochs", "max_steps", "min_steps")
# what fedpeft makes of Lightning flags whose own help would mislead
HELP = {
    "check_val_every_n_epoch": "Evaluate the server model every this many rounds (an epoch is a round). Default: 1.",
    "limit_val_batches": (
        "How much of the server's test split to evaluate on each time (a fraction, or a number of batches; "
        "0 turns evaluation off). Default: all of it."
    ),
    "enable_progress_bar": (
        "Show a progress bar per round. Default: where standard error is a terminal (or in a notebook); "
        "off when it goes to a file."
    ),
    "enable_model_summary": "Print Lightning's model summary at start. Default: only with --verbose.",
}


def plain_text(text: str) -> str:
    """Docstring text without reStructuredText roles and literals, for --help."""
    for pattern, replacement in _RST:
        text = pattern.sub(replacement, text)
    return text


class FedPEFTParser(LightningArgumentParser):
    """Reports configuration mistakes as a one-line ConfigError instead of usage text; keys are never
    matched by prefix (``--trainer.num_round`` is a typo, not ``num_rounds``); help is plain text.

    Config files may start from another with ``__base__: other.yaml`` (:mod:`fedpeft_pl.yaml_include`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("parser_mode", yaml_include.register())
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        return plain_text(super().format_help())

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
        # validate/test/predict are left out: a federated run evaluates the server model every round
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "comm": {"model", "datamodule"},
            "export": {"model", "datamodule"},
        }

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("description", "fedpeft: federated parameter-efficient fine-tuning of frozen ViTs.")
        kwargs.setdefault("prog", "fedpeft")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # FederatedTrainer counts rounds and refuses these; hide them from --help (giving one still
        # gets the one-line error that names trainer.num_rounds)
        hidden = {f"trainer.{name}" for name in (*EPOCH_LIMITS, *NOT_IN_ROUNDS)}
        for action in parser._actions:
            if isinstance(action.help, str) and action.help != argparse.SUPPRESS:
                action.help = plain_text(action.help)  # before argparse wraps a role across lines
            setting = action.dest[len("trainer.") :] if action.dest.startswith("trainer.") else None
            if action.dest in hidden:
                action.help = argparse.SUPPRESS
            elif setting in HELP:
                action.help = HELP[setting]

    def _parse_ckpt_path(self) -> None:
        # Lightning's version reads the file with torch.load before anything is checked, so a
        # foreign or broken file ends in a traceback; fedpeft checkpoints carry no hyperparameters,
        # so checking the file is all there is to do here, before anything is built or written
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path != "last":
            from fedpeft_pl.trainer import check_checkpoint_file

            check_checkpoint_file(ckpt_path)


_TqdmHandler = logs.TqdmHandler  # its old name


def _said_once(record: logging.LogRecord) -> bool:
    """Under DDP every process runs the same set-up, accounting and server, and says the same lines:
    rank 0 says them. A process's own news (a client it trained failed or dropped out, its device ran
    out of memory) carries ``extra={"each_process": True}`` and is said wherever it happens."""
    return getattr(rank_zero_only, "rank", 0) == 0 or getattr(record, "each_process", False)


def configure_logging(verbose: bool = False) -> None:
    """fedpeft's log lines on stderr, written above any progress bar, once across DDP processes.

    Lightning's own messages (seed, accelerators, tips, the model summary) and library
    deprecation warnings say nothing about a federated run; they show with ``verbose`` only.
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        # every process accounts the same gathered privacy history, so opacus' advice is rank 0's to give
        warnings.filterwarnings("ignore", category=UserWarning, module=r"opacus\b")
    logs.configure(verbose, said=_said_once)
    if not verbose:
        # Lightning's advice to raise a loader's num_workers (on a many-core machine): data.num_workers is the
        # user's setting, and a test split kept as tensors needs no workers at all; the advice shows with verbose
        warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers", category=PossibleUserWarning)


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
        raise ConfigError(
            f"{os.fspath(config)!r} is not a fedpeft config (a YAML mapping with trainer, model and data)"
        )
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
        raise ConfigError(
            "could not resolve the config; check it with: fedpeft fit <the same arguments> --print_config"
        )
    return text
