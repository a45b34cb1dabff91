"""Modules that moved into sub-packages, still importable by their old names (with a warning).

A user's script or a Flower app directory written by an earlier version may import
``fedpeft_pl.vectorized`` or ``fedpeft_pl.flower``; each old name is bound to the new module itself
(which keeps its own name and spec, so ``importlib.reload`` of it works), so that reading, and also
setting or patching an attribute through the old name
(``monkeypatch.setattr("fedpeft_pl.vectorized.train_clients", ...)``), acts on the one real module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any, Optional

REMOVED_IN = "0.2.0"
"""The release whose import system no longer knows the old paths; nothing has been released under them."""

MOVED = {
    "fedpeft_pl.vectorized": "fedpeft_pl.runners.vectorized",
    "fedpeft_pl.feature_cache": "fedpeft_pl.runners.feature_cache",
    "fedpeft_pl.flower": "fedpeft_pl.deploy.apps",
    "fedpeft_pl.flower_secagg": "fedpeft_pl.deploy.secagg",
    "fedpeft_pl.flower_app": "fedpeft_pl.deploy.writer",
    "fedpeft_pl.secure_aggregation": "fedpeft_pl.deploy.secure_aggregation",
}


class _Forwarder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, Optional[importlib.machinery.ModuleSpec]] = {}  # old name: the new module's own

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path is removed in fedpeft-pl {REMOVED_IN})",
            DeprecationWarning,
            stacklevel=3,
        )
        # the import system binds the returned module under the old name in sys.modules (one module
        # object with two names); it keeps the module's __name__ but sets its __spec__ to the old
        # name's, which exec_module puts back
        target = importlib.import_module(new)
        self._specs[spec.name] = target.__spec__
        return target

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._specs[module.__spec__.name if module.__spec__ else ""]


def install() -> None:
    if not any(isinstance(finder, _Forwarder) for finder in sys.meta_path):
        sys.meta_path.append(_Forwarder())
