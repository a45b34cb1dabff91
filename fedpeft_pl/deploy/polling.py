"""How often the ServerApp asks the SuperLink for replies (the run config's ``pull-interval``).

Flower 1.42's ServerApp grid (``flwr.superlink.grid.HttpGrid``) waits a fixed 3 s between two pulls
in ``send_and_receive``: a round whose last reply reaches the SuperLink just after a pull waits up to
3 s more, 1.5 s on average, and so does each partition query. :class:`PollingGrid` pushes and pulls
with the same grid calls and waits ``interval`` seconds between pulls instead; everything else goes
to Flower's grid unchanged. What remains Flower's own cadence (the SuperNode's 3 s pull when idle, its
0.5 s look for a finished reply, the SuperExec's task poll) is in docs/deploy.md, "What Flower's polling costs".
Imports nothing but the standard library: the grid is Flower's, passed in.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Optional

__all__ = ["PULL_INTERVAL", "PollingGrid"]

PULL_INTERVAL = 0.1  # seconds between two pulls of a round's replies (Flower's HttpGrid: 3)


class PollingGrid:
    """A ServerApp's grid whose ``send_and_receive`` pulls replies every ``interval`` seconds.

    Args:
        grid: Flower's grid, as the ServerApp's main is given it.
        interval: seconds between two pulls while replies are missing (a pull is one small request
            to the SuperLink, which answers from its state).
    """

    def __init__(self, grid: Any, interval: float = PULL_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError(f"pull-interval must be > 0 seconds, got {interval}")
        self.grid = grid
        self.interval = float(interval)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: Optional[float] = None) -> list[Any]:
        """Push ``messages`` and pull their replies until all have come or ``timeout`` seconds have passed
        (None: until all have come), as Flower's own does. Each message's first reply counts; a second copy
        of it, or a reply to a message this call did not send, is left out."""
        waiting = set(self.grid.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Any] = []
        while timeout is None or time.monotonic() < end:
            for reply in self.grid.pull_messages(list(waiting)):
                answered = reply.metadata.reply_to_message_id
                if answered not in waiting:  # a reply delivered twice, or to a message this call did not send
                    continue
                waiting.discard(answered)
                replies.append(reply)
            if not waiting:
                break
            pause = self.interval if timeout is None else min(self.interval, max(0.0, end - time.monotonic()))
            time.sleep(pause)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)
