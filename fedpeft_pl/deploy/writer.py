"""Write a Flower app directory for a ``fedpeft fit`` config: ``fedpeft flower-app DIR --config ...``.

Writing the app needs no Flower; running it does (``pip install "fedpeft-pl[flower]"`` on
every machine). The app's entry points are in :mod:`fedpeft_pl.deploy.apps`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from fedpeft_pl.config import resolve_config
from fedpeft_pl.deploy.polling import PULL_INTERVAL
from fedpeft_pl.deploy.secure_aggregation import SecureAggregation, check_resolved_config

# one default for both the written app and a ServerApp whose run config leaves them out
NODE_TIMEOUT = 300.0
REPLY_TIMEOUT = 3600.0

_PYPROJECT = """\
# A Flower app written by `fedpeft flower-app`; fedpeft.yaml beside it is the whole experiment.
# Every machine needs fedpeft-pl with Flower installed: pip install "fedpeft-pl[flower]"
[project]
name = "{name}"
version = "1.0.0"
description = "fedpeft-pl federated PEFT, deployed with Flower"
dependencies = []

[tool.flwr.app]
publisher = "fedpeft"

[tool.flwr.app.components]
serverapp = "fedpeft_app:server"
clientapp = "fedpeft_app:client"

[tool.flwr.app.config]
node-timeout = {node_timeout:g}
reply-timeout = {reply_timeout:g}
# SuperNodes asked their partition at a time (0: all at once); each query starts a ClientApp process,
# so many SuperNodes on one machine want a few at a time
query-batch = 0
# seconds between the ServerApp's pulls of a round's replies (Flower's own grid waits 3 s)
pull-interval = {pull_interval:g}
# true continues from the newest round checkpoint: flwr run DIR FEDERATION --run-config resume=true
resume = false
{extra}"""

_APP = '''\
"""Flower entry points for the experiment in fedpeft.yaml (written by `fedpeft flower-app`)."""

from pathlib import Path

from fedpeft_pl.deploy.apps import client_app, server_app

CONFIG = Path(__file__).with_name("fedpeft.yaml")
server = server_app(CONFIG)
client = client_app(CONFIG)
'''


def write_app(
    directory: Union[str, os.PathLike],
    fit_args: list[str],
    name: Optional[str] = None,
    secure_aggregation: Optional[SecureAggregation] = None,
) -> Path:
    """Write a Flower app directory for the config that ``fedpeft fit <fit_args>`` would run.

    The config is resolved (every ``--config`` and override merged) into ``fedpeft.yaml``.
    With ``secure_aggregation``, its settings go into the run config and the config is checked
    to compose with it first (:func:`~fedpeft_pl.deploy.secure_aggregation.check_composition`).
    """
    text = resolve_config(fit_args)
    extra = ""
    if secure_aggregation is not None:
        import yaml

        check_resolved_config(yaml.safe_load(text)["trainer"])
        extra = "".join(f"{key} = {_toml(value)}\n" for key, value in secure_aggregation.to_run_config().items())
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fedpeft.yaml").write_text(text)
    (directory / "fedpeft_app.py").write_text(_APP)
    (directory / "pyproject.toml").write_text(
        _PYPROJECT.format(
            name=name or _project_name(directory),
            node_timeout=NODE_TIMEOUT,
            reply_timeout=REPLY_TIMEOUT,
            pull_interval=PULL_INTERVAL,
            extra=extra,
        )
    )
    return directory


def _project_name(directory: Path) -> str:
    name = "".join(c if c.isalnum() else "-" for c in directory.resolve().name.lower()).strip("-")
    return name or "fedpeft-app"


def _toml(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)
