"""Modules that moved into sub-packages, still importable by their old names (with a warning).

A user's script or a Flower app directory written by an earlier version may import
``fedpeft_pl.vectorized`` or ``fedpeft_pl.flower``; each old name is bound to the new module itself
(which keeps its own name and spec), so that reading, and also setting or patching an attribute
through the old name (``monkeypatch.setattr("fedpeft_pl.vectorized.train_clients", ...)``), acts on
the one real module.
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

MOVED = {
    "fedpeft_pl.vectorized": "fedpeft_pl.runners.vectorized",
    "fedpeft_pl.feature_cache": "fedpeft_pl.runners.feature_cache",
    "fedpeft_pl.flower": "fedpeft_pl.deploy.apps",
    "fedpeft_pl.flower_secagg": "fedpeft_pl.deploy.secagg",
    "fedpeft_pl.flower_app": "fedpeft_pl.deploy.writer",
    "fedpeft_pl.secure_aggregation": "fedpeft_pl.deploy.secure_aggregation",
}


class _Forwarder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        # the import system keeps a returned module's own __name__ and __spec__ and binds it under
        # the old name in sys.modules: one module object with two names
        return importlib.import_module(new)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    if not any(isinstance(finder, _Forwarder) for finder in sys.meta_path):
        sys.meta_path.append(_Forwarder())
