"""Byte accounting: the single source of every communication figure fedpeft reports.

Two units:

- **payload bytes** (:func:`payload_bytes`): each tensor's element count times its dtype's size,
  summed over the tensors that travel. What the paper counts; ``comm/bytes_*``.
- **wire bytes** (:func:`wire_bytes`): the size of the message as a Flower deployment actually
  serialises it (:mod:`fedpeft_pl.deploy.flower` builds its messages with :func:`train_content` and
  :func:`reply_content`): every object of the message's RecordDict as Flower deflates it for
  transfer (records, arrays with their JSON metadata, array chunks, object headers), each
  distinct object once, as Flower sends it. Not counted: the message's routing envelope
  (metadata with node ids and timestamps, a few hundred bytes a message) and gRPC framing.
  ``comm/wire_bytes_*``. Measured with Flower's own serialiser, never estimated, so it needs
  Flower installed (``pip install "fedpeft-pl[flower]"``); without it wire bytes are not
  reported. Flower is not a core dependency: it brings gRPC, protobuf and cryptography into every
  simulation for a figure that describes a deployment, which needs Flower anyway.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from fedpeft_pl.compression import Codec
from fedpeft_pl.federation import ClientContext
from fedpeft_pl.peft import FLoRA, trainable_parameters

if TYPE_CHECKING:
    from fedpeft_pl.client import FedPEFTModule
    from fedpeft_pl.strategies import Strategy

MIB = 2**20

# keys of a train message's config that are fedpeft's; the rest is the strategy's round config
ROUND, CLIENT, MAX_BATCHES = "fedpeft.server-round", "fedpeft.client", "fedpeft.max-batches"
VERSION = "fedpeft.version"  # the global version the message holds: server updates before it was sent

NO_FLOWER = 'wire bytes are measured with Flower\'s serialiser: pip install "fedpeft-pl[flower]"'


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """The paper's unit: elements times dtype size, summed over the tensors of ``payload``."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def flower_installed() -> bool:
    return importlib.util.find_spec("flwr") is not None


def array_record(payload: Mapping[str, torch.Tensor]) -> Any:
    """``payload`` as the ArrayRecord a deployment sends (CPU, contiguous)."""
    from flwr.app import ArrayRecord

    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in payload.items()})


def train_content(
    arrays: Any,
    round_config: Mapping[str, Any],
    server_round: int,
    client: int,
    max_batches: int,
    extras: Optional[Mapping[str, torch.Tensor]] = None,
    version: int = 0,
) -> Any:
    """The content of the train message the server sends ``client``: the encoded global state, the config and any
    extras.

    Args:
        arrays: the encoded global state, a mapping of tensors or an ArrayRecord made once per round.
        round_config: the strategy's round config.
        extras: tensors a strategy sends besides the state (SCAFFOLD's control variate); none by default.
        version: the global version the state is (server updates before it was sent), which the client's
            strategy hooks see as a simulation's do.

    Example::

        size = wire_bytes(train_content(payload, {}, server_round=1, client=0, max_batches=3))
    """
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    record = arrays if isinstance(arrays, ArrayRecord) else array_record(arrays)
    config = {**round_config, ROUND: server_round, CLIENT: client, MAX_BATCHES: max_batches, VERSION: version}
    content = {"arrays": record, "config": ConfigRecord(config)}
    if extras:
        content["extras"] = extras if isinstance(extras, ArrayRecord) else array_record(extras)
    return RecordDict(content)


def reply_content(
    payload: Mapping[str, torch.Tensor],
    num_examples: int,
    metrics: Mapping[str, float],
    extras: Optional[Mapping[str, torch.Tensor]] = None,
) -> Any:
    """The content of a client's reply: its encoded update, any extras, its sample count and its metrics.

    Metrics travel as doubles, so a reply's size does not depend on their values; a private run's
    clients leave their training loss out.
    """
    from flwr.app import MetricRecord, RecordDict

    record: dict[str, Any] = {"num-examples": int(num_examples), **{k: float(v) for k, v in metrics.items()}}
    content = {"arrays": array_record(payload), "metrics": MetricRecord(record)}
    if extras:
        content["extras"] = array_record(extras)
    return RecordDict(content)


def wire_bytes(content: Any) -> int:
    """Bytes of ``content`` (a RecordDict, record or Message) as Flower serialises it for transfer.

    Flower (1.41+) sends a message as a tree of content-addressed objects; this sums the deflated
    size of each distinct object, which is what ``push_objects``/``pull_objects`` move.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def _chunk_size() -> int:
    from flwr.app.message import array  # the value Flower's arrays slice by

    return array.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE


def _may_share_objects(payload: Mapping[str, torch.Tensor]) -> bool:
    """Whether Flower could send one object for two parts of ``payload`` (equal arrays or chunks).

    Flower sends each distinct object once: two equal tensors (LoRA's zero ``B`` factors at first)
    cost one array, and equal chunks of a large array one chunk. Equal tensors need equal dtype and
    shape; the check compares those groups' contents exactly. A tensor longer than one chunk may
    repeat a chunk of itself: one of half a chunk or more (with its header) counts as possibly shared.
    """
    limit = _chunk_size() // 2
    groups: dict[tuple[torch.dtype, tuple[int, ...]], list[torch.Tensor]] = {}
    for tensor in payload.values():
        if tensor.numel() * tensor.element_size() > limit:
            return True
        groups.setdefault((tensor.dtype, tuple(tensor.shape)), []).append(tensor)
    for tensors in groups.values():
        for i, first in enumerate(tensors):
            if any(torch.equal(first, other) for other in tensors[i + 1 :]):
                return True
    return False


def _distinct(payload: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of ``payload``'s names, dtypes and shapes whose contents all differ, as trained ones do.

    A message's size depends on its layout and on which of its objects are equal (Flower sends those
    once): at the start some are (LoRA's zero ``B`` factors, adapters' zero up-projections), after
    a round of training none are. Seeded noise gives the layout without any equal array or chunk.
    """
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, tensor in payload.items():
        if tensor.dtype.is_floating_point:
            out[name] = torch.rand(tensor.shape, generator=generator).to(tensor.dtype)
        else:  # codes (Int8) and masks: values every integer dtype and bool can hold
            out[name] = torch.randint(0, 2 if tensor.dtype == torch.bool else 100, tensor.shape, generator=generator)
            out[name] = out[name].to(tensor.dtype)
    return out


class _ReplySizes:
    """Wire bytes of client replies, without serialising every update again.

    The size of an ArrayRecord whose arrays are all distinct objects depends only on the names,
    dtypes and shapes of its tensors (object ids are fixed-length digests), so it is measured once
    per layout with Flower's serialiser and reused; the rest of the reply (sample count, metrics,
    the RecordDict) is serialised every time. A reply whose objects may be shared
    (:func:`_may_share_objects`) or that carries extras is serialised whole. Written here because
    Flower has no size query short of deflating every object (copies and digests of every tensor).
    """

    def __init__(self) -> None:
        self._arrays: dict[tuple, int] = {}
        self._empty: Optional[int] = None

    def __call__(
        self,
        payload: Mapping[str, torch.Tensor],
        num_examples: int,
        metrics: Mapping[str, float],
        extras: Mapping[str, torch.Tensor],
    ) -> int:
        if extras or _may_share_objects(payload):
            return wire_bytes(reply_content(payload, num_examples, metrics, extras))
        from flwr.app import ArrayRecord

        layout = tuple((name, t.dtype, tuple(t.shape)) for name, t in payload.items())
        if layout not in self._arrays:
            self._arrays[layout] = wire_bytes(array_record(payload))
        if self._empty is None:
            self._empty = wire_bytes(ArrayRecord({}))
        return wire_bytes(reply_content({}, num_examples, metrics)) - self._empty + self._arrays[layout]


class WireCounter:
    """Wire bytes of one round, as a deployment would send them (see the module docstring).

    The server callback calls :meth:`start_round`, :meth:`download` and :meth:`upload`; in a
    deployment the Flower loop sets ``measured`` and counts the real messages with :meth:`count` instead.
    ``bytes`` is ``None`` when Flower is not installed or cannot carry a dtype (bfloat16).
    """

    def __init__(self) -> None:
        self.enabled = flower_installed()
        self.measured = False
        self.bytes: Optional[dict[str, int]] = None
        self._arrays: Any = None
        self._arrays_bytes = 0
        self._reply_sizes = _ReplySizes()

    def start_round(self, payload: Mapping[str, torch.Tensor]) -> None:
        self.bytes = {"down": 0, "up": 0} if self.enabled else None
        self._arrays = None
        if self.enabled and not self.measured:
            try:
                self._arrays = array_record(payload)
            except TypeError:  # a dtype Flower's ArrayRecord cannot carry: no deployment sends it
                self.bytes = None
                return
            self._arrays_bytes = wire_bytes(self._arrays)

    def download_size(
        self,
        round_config: Mapping[str, Any],
        server_round: int,
        client: int,
        max_batches: int,
        extras: Mapping[str, torch.Tensor],
        version: int = 0,
    ) -> Optional[int]:
        """One client's train message in wire bytes, without counting it; None where they are not measured here."""
        if self.bytes is None or self.measured:
            return None
        from flwr.app import ConfigRecord

        content = train_content(self._arrays, round_config, server_round, client, max_batches, extras, version)
        if "extras" in content:
            # Flower sends an object once per message, so an extra tensor equal to one of the state's
            # (zeros, at first) costs nothing more: measure the whole message
            return wire_bytes(content)
        # the round's arrays are the same for every client: measured once, plus this message's own objects
        config = content["config"]
        assert isinstance(config, ConfigRecord)
        return self._arrays_bytes + wire_bytes(config) + len(content.deflate())

    def download(
        self,
        round_config: Mapping[str, Any],
        server_round: int,
        client: int,
        max_batches: int,
        extras: Mapping[str, torch.Tensor],
        version: int = 0,
    ) -> Optional[int]:
        """Count one client's train message; its wire bytes, or None where they are not measured here."""
        size = self.download_size(round_config, server_round, client, max_batches, extras, version)
        if size is not None and self.bytes is not None:
            self.bytes["down"] += size
        return size

    def reply_size(
        self,
        payload: Mapping[str, torch.Tensor],
        num_examples: int,
        metrics: Mapping[str, float],
        extras: Mapping[str, torch.Tensor],
    ) -> Optional[int]:
        """One client's reply in wire bytes, without counting it; None where they are not measured here."""
        if self.bytes is None or self.measured:
            return None
        try:
            return int(self._reply_sizes(payload, num_examples, metrics, extras))
        except TypeError:
            self.bytes = None
            return None

    def upload(
        self,
        payload: Mapping[str, torch.Tensor],
        num_examples: int,
        metrics: Mapping[str, float],
        extras: Mapping[str, torch.Tensor],
    ) -> Optional[int]:
        """Count one client's reply; its wire bytes, or None where they are not measured here."""
        size = self.reply_size(payload, num_examples, metrics, extras)
        if size is not None and self.bytes is not None:
            self.bytes["up"] += size
        return size

    def count(self, direction: str, content: Any) -> None:
        """Count a real message's content (a deployment)."""
        self.add(direction, wire_bytes(content))

    def add(self, direction: str, nbytes: int) -> None:
        """Count ``nbytes`` already measured with :func:`wire_bytes` (a deployment's protocol messages)."""
        if self.bytes is not None:
            self.bytes[direction] += nbytes

    def metrics(self) -> dict[str, float]:
        if self.bytes is None:
            return {}
        return {"comm/wire_bytes_down": self.bytes["down"], "comm/wire_bytes_up": self.bytes["up"]}


@dataclass(frozen=True)
class CommReport:
    """What one configuration sends, before any training."""

    method: str
    trainable_params: int
    download_bytes: int  # one client, one round, server to client
    upload_bytes: int  # one client, one round, client to server
    full_client_bytes: int  # full fine-tuning of this backbone, uncompressed, one direction
    clients_per_round: int
    num_rounds: int
    notes: tuple[str, ...] = ()
    # the same messages as a Flower deployment serialises them, once training has made every array
    # distinct; None without Flower
    download_wire_bytes: Optional[int] = None
    upload_wire_bytes: Optional[int] = None
    # round 1's download, whose equal arrays (zero-initialised factors) Flower sends once
    first_download_wire_bytes: Optional[int] = None
    data: Optional[str] = None  # the data set and how it is split among the clients, in words

    @property
    def round_bytes(self) -> int:
        """Both directions, all sampled clients, one round."""
        return self.clients_per_round * (self.download_bytes + self.upload_bytes)

    @property
    def run_bytes(self) -> int:
        """The bytes the whole run moves, both directions, every round."""
        return self.num_rounds * self.round_bytes

    @property
    def ratio_to_full(self) -> float:
        """How many times fewer bytes than uncompressed full fine-tuning, both directions."""
        return 2 * self.full_client_bytes / (self.download_bytes + self.upload_bytes)

    @property
    def first_round_savings(self) -> int:
        """Wire bytes that deduplication saves on one client's download of round 1."""
        if self.download_wire_bytes is None or self.first_download_wire_bytes is None:
            return 0
        return self.download_wire_bytes - self.first_download_wire_bytes

    @property
    def run_wire_bytes(self) -> Optional[int]:
        """Both directions, all rounds: round 1's download as deduplicated, every later message without."""
        if self.download_wire_bytes is None or self.upload_wire_bytes is None:
            return None
        per_client = self.num_rounds * (self.download_wire_bytes + self.upload_wire_bytes) - self.first_round_savings
        return self.clients_per_round * per_client

    def format(self) -> str:
        """The report as the lines ``fedpeft comm`` prints."""
        rows = [("method", self.method)]
        if self.data is not None:
            rows.append(("data", self.data))
        rows.append(("trainable parameters", f"{self.trainable_params:,}"))
        if self.download_bytes == self.upload_bytes:
            rows.append(("per client per direction", _size(self.download_bytes)))
        else:
            rows += [
                ("per client, download", _size(self.download_bytes)),
                ("per client, upload", _size(self.upload_bytes)),
            ]
        rows += [
            (f"per round ({self.clients_per_round} clients, both directions)", _size(self.round_bytes)),
            (f"whole run ({self.num_rounds} rounds)", _size(self.run_bytes)),
            ("full fine-tuning per client per direction", _size(self.full_client_bytes)),
            ("bytes relative to full fine-tuning", f"1/{self.ratio_to_full:,.1f} ({100 / self.ratio_to_full:.3f}%)"),
        ]
        if self.download_wire_bytes is not None and self.upload_wire_bytes is not None:
            rows += [
                ("wire, per client, download", _size(self.download_wire_bytes)),
                ("wire, per client, upload", _size(self.upload_wire_bytes)),
            ]
            if self.first_round_savings:
                rows.append(
                    (
                        "wire, round 1 deduplication",
                        f"{self.first_round_savings:,} bytes fewer per client download: equal arrays "
                        "(zero-initialised factors) are sent once while they are equal",
                    )
                )
            rows.append((f"wire, whole run ({self.num_rounds} rounds)", _size(self.run_wire_bytes or 0)))
        rows += [("note", note) for note in self.notes]
        if self.download_wire_bytes is None:
            rows.append(
                (
                    "note",
                    "wire bytes not measured: "
                    + (NO_FLOWER if not flower_installed() else "Flower cannot carry this dtype"),
                )
            )
        else:
            rows.append(
                (
                    "note",
                    "bytes are tensor elements times dtype size (the paper's unit); wire bytes are the "
                    "messages as Flower serialises them (client 0's, once training has made its arrays "
                    "differ; ids and counts are varints, so other messages differ by a few bytes)",
                )
            )
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _size(num_bytes: int) -> str:
    return f"{num_bytes:,} bytes ({num_bytes / MIB:,.3f} MiB)"


def communication_report(
    module: FedPEFTModule,
    clients_per_round: int,
    num_rounds: int,
    upload: Optional[Codec] = None,
    download: Optional[Codec] = None,
    notes: tuple[str, ...] = (),
    strategy: Optional[Strategy] = None,
    round_config: Optional[Mapping[str, Any]] = None,
    max_batches: int = 1,
    num_examples: int = 1,
    with_loss: bool = True,
    num_clients: Optional[int] = None,
) -> CommReport:
    """Bytes that ``module``'s PEFT method sends with the given codecs, next to full fine-tuning.

    Counts come from the built architecture, the codecs' actual payloads and the tensors the
    strategy sends besides the state (SCAFFOLD's control variates), so no weights are
    downloaded and compressed sizes are exact. Wire bytes (with Flower installed) are those of
    the train message to client 0 with ``round_config`` and ``max_batches``, and of its reply
    with ``num_examples`` and, if ``with_loss``, the training loss, with every array distinct, as
    after training; round 1's download is measured as well on the initial state, where Flower
    sends equal arrays once (LoRA's zero ``B`` factors), and the whole run counts it so.

    Where clients exchange their own views of the state (heterogeneous LoRA ranks), each of the
    ``num_clients`` clients (``clients_per_round`` if not given) is counted at its own view: the
    per-client figures are their mean (what a uniformly sampled client sends), with one note per
    rank, and wire bytes are those of client 0.
    """
    local = frozenset(getattr(module, "local_names", ()))  # a personalised method's local part never travels
    trainable = {name: p.detach() for name, p in trainable_parameters(module).items() if name not in local}
    with torch.device("meta"):  # only the shapes and dtypes of full fine-tuning count: no memory, no init
        full = dict(module.backbone.build(module.num_classes).named_parameters())
    upload, download = upload or Codec(), download or Codec()
    extras_down: dict[str, torch.Tensor] = {}
    extras_up: dict[str, torch.Tensor] = {}
    if strategy is not None:
        extras_down = strategy.client_extras(1, trainable)
        context = ClientContext(0, 1, trainable, extras=extras_down, steps=1, lr=1.0)
        extras_up = strategy.client_end(trainable, context)
    down_state = up_state = trainable
    peft = getattr(module, "peft", None)
    mean_down = mean_up = None
    if getattr(peft, "per_client_views", False):
        clients = range(num_clients or clients_per_round)
        sizes: dict[int, list[tuple[int, int]]] = {}
        for client in clients:
            down = payload_bytes(download.encode(peft.client_view(trainable, client, 1, upload=False)))
            up = payload_bytes(upload.encode(peft.client_view(trainable, client, 1, upload=True)))
            sizes.setdefault(peft.client_rank(client), []).append((down, up))
        mean_down = round(sum(d for each in sizes.values() for d, _ in each) / len(clients))
        mean_up = round(sum(u for each in sizes.values() for _, u in each) / len(clients))
        notes = (
            *notes,
            f"per-client figures are the mean over {len(clients)} clients, each at its own rank",
            *(
                f"rank {rank} ({len(each)} clients): {each[0][0]:,} bytes down, {each[0][1]:,} bytes up per round"
                for rank, each in sorted(sizes.items())
            ),
        )
        if isinstance(peft, FLoRA):
            dense = peft.dense_update_bytes()
            notes += (
                "FLoRA: each client also downloads the update merged since it last took part (the stacked factors, "
                f"or the dense update if smaller, at most {dense:,} bytes): counted in comm/bytes_down, not here",
            )
        down_state = peft.client_view(trainable, 0, 1, upload=False)
        up_state = peft.client_view(trainable, 0, 1, upload=True)
    wire_down = wire_up = wire_first = None
    if flower_installed():
        metrics = {"train_loss": 0.0, "steps": 0.0} if with_loss else {"steps": 0.0}
        config = round_config or {}
        try:
            first = download.encode(down_state)
            wire_first = wire_bytes(train_content(first, config, 1, 0, max_batches, extras_down, version=0))
            wire_down = wire_bytes(
                train_content(_distinct(first), config, 2, 0, max_batches, _distinct(extras_down), version=1)
            )
            wire_up = wire_bytes(
                reply_content(_distinct(upload.encode(up_state)), num_examples, metrics, _distinct(extras_up))
            )
        except TypeError:  # bfloat16: Flower's ArrayRecord cannot carry it
            wire_down = wire_up = wire_first = None
    return CommReport(
        method=repr(module.peft),
        trainable_params=sum(p.numel() for p in trainable.values()),
        download_bytes=(mean_down if mean_down is not None else payload_bytes(download.encode(trainable)))
        + payload_bytes(extras_down),
        upload_bytes=(mean_up if mean_up is not None else payload_bytes(upload.encode(trainable)))
        + payload_bytes(extras_up),
        full_client_bytes=payload_bytes(full),
        clients_per_round=clients_per_round,
        num_rounds=num_rounds,
        notes=notes,
        download_wire_bytes=wire_down,
        upload_wire_bytes=wire_up,
        first_download_wire_bytes=wire_first,
    )
