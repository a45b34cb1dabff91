"""The base of the server-side parts chosen by ``class_path`` that may keep state across rounds."""

from __future__ import annotations

from typing import Any


class Component:
    """Checkpointable through :meth:`state_dict` (stateless by default), shown by its arguments in logs."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
