"""fedpeft's log lines on stderr, written above any progress bar: the handler, without Lightning.

:func:`fedpeft_pl.config.configure_logging` sets it up with Lightning's process rank (one process of a DDP run
speaks); ``fedpeft comm``, one process without Lightning, sets it up with :func:`configure`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import Optional

__all__ = ["TqdmHandler", "configure"]


class TqdmHandler(logging.StreamHandler):
    """Writes log records above any progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def configure(verbose: bool = False, said: Optional[Callable[[logging.LogRecord], bool]] = None) -> None:
    """fedpeft's log lines at INFO on stderr (through the filter ``said``, where given); Lightning's own messages
    and library deprecation warnings with ``verbose`` only."""
    logger = logging.getLogger("fedpeft_pl")
    if not logger.handlers:
        handler = TqdmHandler()
        if said is not None:
            handler.addFilter(said)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    level = logging.INFO if verbose else logging.WARNING
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(lightning|torch|timm|jsonargparse)\b")
