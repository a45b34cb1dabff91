"""What one client keeps on its SuperNode between rounds, as numpy arrays: Flower and numpy only.

Both ClientApps use it: the one that trains in its own process (through
:class:`~fedpeft_pl.deploy.flower.NodeStore`, which converts to torch) and the thin one that forwards
its messages to a warm worker (:mod:`fedpeft_pl.deploy.thin`). The state stays with the SuperNode
(its Flower node context, or ``state-dir``), never in the worker, so a restarted worker loses nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

__all__ = ["ArrayStore", "answer_query", "from_record", "to_record"]

_RESIDUAL, _OWN_STATE, _PRIVACY = "fedpeft.upload-codec", "fedpeft.client-state", "fedpeft.privacy"
# the key of an experiment that stays when a resumed ServerApp continues it (the store's folder)
RUN = "fedpeft.run"
# a reply without an update, that says why (a spent privacy budget); what the server sends besides the
# trainable state (FLoRA's merged update)
DECLINED, MODEL_UPDATE = "fedpeft.declined", "fedpeft.model-update"
# a train message's config keys, as fedpeft_pl.comm writes them (comm imports torch; a test holds them equal)
ROUND, CLIENT, MAX_BATCHES, VERSION = "fedpeft.server-round", "fedpeft.client", "fedpeft.max-batches", "fedpeft.version"

Arrays = dict[str, np.ndarray]


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays as Flower's ArrayRecord, as a torch state dict of the same values becomes one."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: Any) -> Arrays:
    """An ArrayRecord's arrays as numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


class ArrayStore:
    """What one client keeps between the rounds it trains in: its own tensors (a personalised method's local
    part, a strategy's per-client tensors), its upload codec's residual and its DP accountant.

    By default in Flower's node context, which lives as long as the SuperNode process and the Flower
    run. With ``state-dir`` in the node config, in a file per round the client trained in
    (``<state-dir>/<run>/client-<c>/round-<r>.npz``, written atomically; no pickle), so the state survives a
    restarted SuperNode and a resumed ServerApp (a new Flower run that continues the same
    experiment, whose key the server sends with its partition query). A round loads the newest file
    of an earlier round, so a round that the server repeats after a resume starts from the state
    the first attempt started from, and writes the same file again.
    """

    def __init__(self, context: Context, client: int, server_round: int) -> None:
        self.state = context.state
        self.server_round = server_round
        directory = context.node_config.get("state-dir")
        run = str(self.state[RUN]["key"]) if RUN in self.state else f"flower-run-{context.run_id}"
        self.folder = Path(str(directory)) / run / f"client-{client}" if directory else None
        self._loaded: Optional[Path] = None

    def load(self) -> dict[str, Any]:
        """``{"own": arrays, "residual": arrays or None, "accountant": dict}``, as the client left them."""
        if self.folder is not None:
            earlier = [p for p in self._files() if _round_of(p) < self.server_round]
            if not earlier:
                return {"own": {}, "residual": None, "accountant": {}}
            self._loaded = max(earlier, key=_round_of)
            return _read(self._loaded)
        state = self.state
        return {
            "own": from_record(state[_OWN_STATE]) if _OWN_STATE in state else {},
            "residual": from_record(state[_RESIDUAL]) if _RESIDUAL in state else None,
            "accountant": json.loads(str(state[_PRIVACY]["accountant"])) if _PRIVACY in state else {},
        }

    def save(self, own: Arrays, residual: Optional[Arrays], accountant: dict[str, Any]) -> None:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            entry: dict[str, Any] = {f"own/{k}": v for k, v in own.items()}
            if residual is not None:
                entry.update({f"residual/{k}": v for k, v in residual.items()})
                entry["has-residual"] = np.array(True)
            entry["accountant"] = np.array(json.dumps(accountant))
            target = self.folder / f"round-{self.server_round}.npz"
            partial = self.folder / f".round-{self.server_round}.{os.getpid()}.partial"
            with open(partial, "wb") as file:
                np.savez(file, allow_pickle=False, **entry)
            os.replace(partial, target)  # a reader, or a killed writer, never leaves half a file
            for path in self._files():  # files older than the one this round started from are never read again
                if self._loaded is not None and _round_of(path) < _round_of(self._loaded):
                    path.unlink(missing_ok=True)
            return
        self.state[_OWN_STATE] = to_record(own)
        if residual is not None:
            self.state[_RESIDUAL] = to_record(residual)
        if accountant:
            self.state[_PRIVACY] = ConfigRecord({"accountant": json.dumps(accountant)})

    def _files(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return list(self.folder.glob("round-*.npz"))


def _round_of(path: Path) -> int:
    return int(path.stem.removeprefix("round-"))


def _read(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as data:
        own = {k.removeprefix("own/"): data[k] for k in data.files if k.startswith("own/")}
        residual = {k.removeprefix("residual/"): data[k] for k in data.files if k.startswith("residual/")}
        has_residual = "has-residual" in data.files
        accountant = json.loads(str(data["accountant"]))
    return {"own": own, "residual": residual if has_residual else None, "accountant": accountant}


def answer_query(message: Message, context: Context) -> Message:
    """The partition this SuperNode plays (the server's client discovery)."""
    if RUN in message.content:  # the experiment's key, for the state this node keeps on disk
        context.state[RUN] = message.content[RUN]
    partition = ConfigRecord({k: int(context.node_config[k]) for k in ("partition-id", "num-partitions")})
    return Message(RecordDict({"partition": partition}), reply_to=message)
