"""Small bases for the parts a user chooses by ``class_path``."""

from __future__ import annotations

from typing import Any


class ShownByArguments:
    """Shown in logs and checkpoints by its public attributes: ``Name(arg=value, ...)``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Component(ShownByArguments):
    """A server-side part that may keep state across rounds: checkpointable through :meth:`state_dict`."""

    def state_dict(self) -> dict[str, Any]:
        """The part's state across rounds, for checkpoints (empty if it keeps none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state :meth:`state_dict` gave."""
