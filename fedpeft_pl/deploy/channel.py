"""The wire between a thin ClientApp and its warm worker (``fedpeft worker``): a Unix socket, frames of data.

Needs the standard library and numpy only, so that a ClientApp which forwards its messages to a
worker imports no torch, timm or Lightning (:mod:`fedpeft_pl.deploy.thin`).

A frame is ``b"FPW1"``, the length of a JSON header (4 bytes, big-endian), the header, then the
``.npy`` bytes (``np.save`` with ``allow_pickle=False``) of each array the header lists as
``[group, name, nbytes]``. A receiver refuses a frame whose header or arrays exceed its caps, an
operation outside :data:`OPERATIONS`, and anything ``np.load(..., allow_pickle=False)`` refuses:
data only, never code, objects or file paths.

A connection carries one exchange: the ClientApp says ``hello`` (its fedpeft version and the digest of
its run config, :func:`config_digest`), the worker answers ``ok`` or refuses in one line, then one
``train`` or ``evaluate`` request and its reply.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

__all__ = [
    "OPERATIONS",
    "ChannelError",
    "Refused",
    "config_digest",
    "connect",
    "peer_uid",
    "private_directory",
    "receive",
    "send",
]

MAGIC = b"FPW1"
PROTOCOL = 1
OPERATIONS = frozenset({"hello", "train", "evaluate"})
MAX_HEADER_BYTES = 1 << 20  # the JSON header: round config, metrics, names
MAX_MESSAGE_BYTES = 2 << 30  # every array of one frame together (``fedpeft worker --max-message-mib``)
MAX_ARRAYS = 100_000

# the node config keys a SuperNode's operator sets (``--node-config``)
SOCKET_KEY = "worker-socket"  # the worker's socket: the ClientApp forwards its messages there
FALLBACK_KEY = "worker-fallback"  # true: without a worker (none listening, or another version) train in-process

Arrays = dict[str, dict[str, np.ndarray]]  # group ("arrays", "extras", "own", ...) -> name -> array


class ChannelError(RuntimeError):
    """A frame that breaks the protocol, or a peer that went away mid-exchange."""


class Refused(ChannelError):
    """The worker refused the ClientApp (another fedpeft version or another run config)."""


def config_digest(path: Union[str, os.PathLike]) -> str:
    """The first 16 hex digits of the SHA-256 of the run config file's bytes: the ClientApp's and the worker's
    copies of ``fedpeft.yaml`` must be the same experiment."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def fedpeft_version() -> str:
    from fedpeft_pl import __version__

    return __version__


def send(sock: socket.socket, header: Mapping[str, Any], arrays: Mapping[str, Mapping[str, np.ndarray]] = {}) -> None:
    """One frame: ``header`` (JSON) and ``arrays`` (``.npy`` bytes, never pickled)."""
    blobs, listed = [], []
    for group, tensors in arrays.items():
        for name, array in tensors.items():
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(array), allow_pickle=False)
            blob = buffer.getvalue()
            blobs.append(blob)
            listed.append([group, name, len(blob)])
    text = json.dumps({**header, "arrays": listed}).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise ChannelError(f"a frame header of {len(text)} bytes exceeds the cap of {MAX_HEADER_BYTES}")
    sock.sendall(MAGIC + struct.pack("!I", len(text)) + text)
    for blob in blobs:
        sock.sendall(blob)


def receive(sock: socket.socket, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[dict[str, Any], Arrays]:
    """One frame: its header and its arrays by group; ChannelError for anything outside the protocol."""
    start = _exactly(sock, 8)
    if start[:4] != MAGIC:
        raise ChannelError("not a fedpeft worker frame")
    (length,) = struct.unpack("!I", start[4:])
    if length > MAX_HEADER_BYTES:
        raise ChannelError(f"a frame header of {length} bytes exceeds the cap of {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_exactly(sock, length))
    except ValueError as err:
        raise ChannelError(f"a frame header that is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise ChannelError("a frame header must be a JSON object")
    listed = header.pop("arrays", [])
    if not isinstance(listed, list) or len(listed) > MAX_ARRAYS:
        raise ChannelError(f"a frame's array list must be a list of at most {MAX_ARRAYS} entries")
    total = 0
    for entry in listed:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
            and entry[2] >= 0
        ):
            raise ChannelError("a frame lists each array as [group, name, nbytes]")
        total += entry[2]
    if total > max_bytes:
        raise ChannelError(f"a frame of {total} bytes of arrays exceeds the cap of {max_bytes}")
    arrays: Arrays = {}
    for group, name, size in listed:
        try:
            array = np.load(io.BytesIO(_exactly(sock, size)), allow_pickle=False)
        except ValueError as err:  # a pickled object array, or no .npy at all
            raise ChannelError(f"array {group}/{name} is not a plain .npy array: {err}") from err
        if not isinstance(array, np.ndarray):
            raise ChannelError(f"array {group}/{name} is not a plain .npy array")
        arrays.setdefault(group, {})[name] = array
    return header, arrays


def _exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``sock``; ChannelError if the peer closes first."""
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        count = sock.recv_into(view[got:], size - got)
        if count == 0:
            raise ChannelError("the peer closed the connection mid-frame" if got or size else "the peer went away")
        got += count
    return bytes(buffer)


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (``SO_PEERCRED``, Linux)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", credentials)
    return int(uid)


def private_directory(path: Union[str, os.PathLike]) -> Path:
    """``path`` as a folder only this user can enter: made 0700 under a 0077 umask if missing; an existing one
    must be this user's and closed to everyone else (else ValueError, one line)."""
    folder = Path(path)
    old = os.umask(0o077)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    finally:
        os.umask(old)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise ValueError(f"the worker's socket folder {folder} belongs to uid {info.st_uid}, not to this user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ValueError(
            f"the worker's socket folder {folder} is open to others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"chmod 700 it or name a new folder"
        )
    return folder


def connect(path: Union[str, os.PathLike], timeout: float = 10.0) -> socket.socket:
    """A connection to the worker at ``path``; OSError (FileNotFoundError, ConnectionRefusedError) without one."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        sock.close()
        raise
    return sock


def hello(config: Union[str, os.PathLike]) -> dict[str, Any]:
    """What a ClientApp says first: the protocol, its fedpeft version and its run config's digest."""
    return {"op": "hello", "protocol": PROTOCOL, "fedpeft": fedpeft_version(), "config": config_digest(config)}
