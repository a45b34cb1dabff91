"""A YAML config may start from another: ``__base__: paper.yaml``, then only what differs.

jsonargparse (and so LightningCLI) has no such include. It does load a file named under the
``config`` key inside a config file, but the including file's nested keys then replace whole
branches of the included one (``model: {peft: ...}`` drops the base's ``model.num_classes``), so an
overlay would have to be written in dotted leaf keys and still could not change only an
optimizer's learning rate. This loader, registered as the parser mode of ``fedpeft``'s parser,
resolves ``__base__`` before jsonargparse sees the config:

- the path is relative to the including file; a list names several bases, merged in order, and a
  base may have its own ``__base__``;
- mappings merge key by key, the including file winning; any other value (a list, a scalar)
  replaces the base's;
- a mapping whose ``class_path`` differs from the base's replaces it whole, so the base's
  ``init_args`` never reach another class (as with several ``--config`` files).

Example (``configs/adapter.yaml``)::

    __base__: paper.yaml
    model:
      peft:
        class_path: fedpeft_pl.peft.Adapter
        init_args: {reduction_factor: 8}
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import yaml
from jsonargparse import Path, get_loader, set_loader

from fedpeft_pl.errors import ConfigError

BASE_KEY = "__base__"
PARSER_MODE = "fedpeft_yaml"


def load(text: str) -> Any:
    """jsonargparse's YAML loader, with ``__base__`` resolved."""
    value = get_loader("yaml")(text)
    if isinstance(value, dict) and BASE_KEY in value:
        # jsonargparse loads a config file from within that file's directory, so Path resolves there
        value = _resolve(value, directory=None, seen=())
    return value


def load_file(path: Union[str, os.PathLike]) -> Any:
    """A config file as a dict, ``__base__`` resolved relative to it (for scripts and tests)."""
    path = os.path.abspath(os.fspath(path))
    with open(path, encoding="utf-8") as handle:
        value = get_loader("yaml")(handle.read())
    if isinstance(value, dict) and BASE_KEY in value:
        value = _resolve(value, os.path.dirname(path), seen=(path,))
    return value


def _resolve(config: dict[str, Any], directory: Optional[str], seen: tuple[str, ...]) -> dict[str, Any]:
    bases = config.pop(BASE_KEY)
    merged: dict[str, Any] = {}
    for base in bases if isinstance(bases, list) else [bases]:
        path = _absolute(base, directory)
        if path in seen:
            raise ConfigError(f"config {path} includes itself through {BASE_KEY}")
        try:
            included = get_loader("yaml")(open(path, encoding="utf-8").read())
        except yaml.YAMLError as err:  # named by this file and line, not by the including one
            where, problem = syntax_error(path, err)
            raise ConfigError(f"{where} (a {BASE_KEY} file): YAML syntax error ({problem}); fix that file") from None
        if not isinstance(included, dict):
            raise ConfigError(f"{BASE_KEY} {base!r} is not a YAML mapping of settings")
        if BASE_KEY in included:
            included = _resolve(included, os.path.dirname(path), (*seen, path))
        merged = merge(merged, included)
    return merge(merged, config)


def syntax_error(path: str, err: yaml.YAMLError) -> tuple[str, str]:
    """Where a YAML syntax error is (``path line N``, or the path alone) and what it is."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path} line {mark.line + 1}" if mark is not None else path
    return where, getattr(err, "problem", None) or str(err).splitlines()[0]


def _absolute(base: Any, directory: Optional[str]) -> str:
    if not isinstance(base, str):
        raise ConfigError(f"{BASE_KEY} must name a YAML file (or a list of them), got {base!r}")
    try:
        if directory is None:
            return Path(base, mode="fr").absolute
        return Path(os.path.join(directory, base), mode="fr").absolute
    except TypeError as err:
        raise ConfigError(
            f"{BASE_KEY} {base!r} is not a readable file (paths are relative to the including file)"
        ) from err


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge, other values and another ``class_path`` replace."""
    if "class_path" in base and "class_path" in override and base["class_path"] != override["class_path"]:
        return dict(override)
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def register() -> str:
    """Register the loader with jsonargparse (idempotent); returns the parser mode to use."""
    import yaml

    set_loader(PARSER_MODE, load, (yaml.YAMLError,))
    return PARSER_MODE
