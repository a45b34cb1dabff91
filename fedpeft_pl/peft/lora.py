from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Optional

import loralib
import numpy as np
import torch
import torch.nn.functional as F
from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft.base import STACKED_LAYERS, PEFTMethod, StackedForward, State, product_dtype
from fedpeft_pl.peft.views import PerClientViews
from fedpeft_pl.seeds import LORA_FRESH_A, LORA_FROZEN_A, LORA_RANK, derive_seed

if TYPE_CHECKING:
    from fedpeft_pl.strategies import ClientUpdate

log = logging.getLogger(__name__)

_FACTOR = re.compile(r"blocks\.(\d+)\.attn\.qkv\.lora_([AB])$")


class LoRA(PEFTMethod):
    """Low-rank adaptation (Hu et al. 2022) of the attention projections, via loralib, plus the classifier.

    Plain federated LoRA: every client trains rank-``rank`` factors ``A`` and ``B`` and the
    classifier, and the strategy averages each tensor on its own. The variants are subclasses:
    :class:`FFALoRA` (``A`` frozen), :class:`HetLoRA` (heterogeneous ranks, zero-padding) and
    :class:`FLoRA` (heterogeneous ranks, stacking).

    ``A`` starts random and ``B`` at zero (loralib's initialisation). The update is never
    merged into the frozen weight: that weight is shared by every client in the process, and
    loralib's merge-on-eval would mutate it whenever Lightning switches to evaluation.

    Args:
        rank: rank ``r`` of each update ``B @ A``.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the LoRA branch's input.
        targets: which of the fused qkv projection's parts adapt; ``["q", "v"]`` as in the LoRA paper.
        freeze_a: deprecated: True is the earlier spelling of :class:`FFALoRA`.
        client_ranks: deprecated: the earlier spelling of :class:`HetLoRA` (or, with
            ``aggregation: stack``, :class:`FLoRA`) with this argument.
        rank_choices: deprecated, as ``client_ranks``.
        aggregation: deprecated: ``stack`` is the earlier spelling of :class:`FLoRA`; ``average``
            (the default) is plain LoRA, or :class:`HetLoRA` with ranks. Where these arguments
            describe a variant, the constructor builds it (the object is an instance of the
            variant's class, as if the variant had been named) and warns with a
            ``DeprecationWarning`` and a log line that name the class to write instead.

    Example::

        LoRA(rank=8, alpha=8, targets=["q", "v"])
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        targets: Sequence[Literal["q", "k", "v"]] = ("q", "v"),
        freeze_a: bool = False,
        client_ranks: Optional[dict[int, int]] = None,
        rank_choices: Optional[Sequence[int]] = None,
        aggregation: Literal["average", "stack"] = "average",
    ) -> None:
        variant = _earlier_form(freeze_a, client_ranks, rank_choices, aggregation)
        if variant is not None:
            # the YAML of earlier versions (class_path LoRA with string switches): this object becomes the variant
            # that form meant, built by the variant's own constructor, exactly as if the YAML had named it
            cls, kwargs, message = variant
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            log.warning(message)  # a YAML user sees this: fedpeft hides deprecation warnings raised inside jsonargparse
            self.__class__ = cls
            cls.__init__(self, rank=rank, alpha=alpha, dropout=dropout, targets=targets, **kwargs)
            return
        if rank < 1:
            raise ConfigError(f"{type(self).__name__} rank must be >= 1, got {rank}")
        if not targets or any(t not in ("q", "k", "v") for t in targets):
            raise ConfigError(
                f"{type(self).__name__} targets must be a non-empty list of 'q', 'k' and 'v', got {list(targets)}"
            )
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.targets = tuple(targets)

    def attach(self, model: VisionTransformer) -> None:
        for block in model.blocks:
            qkv = block.attn.qkv
            lora_qkv = loralib.MergedLinear(
                qkv.in_features,
                qkv.out_features,
                r=self.rank,
                lora_alpha=self.alpha,
                lora_dropout=self.dropout,
                enable_lora=[part in self.targets for part in "qkv"],
                merge_weights=False,
                bias=qkv.bias is not None,
            )
            # share the frozen tensors instead of copying them; names stay attn.qkv.weight/bias
            lora_qkv.weight = qkv.weight
            lora_qkv.bias = qkv.bias
            # loralib keeps its index mask as a plain attribute; a buffer follows the module to its device
            mask = lora_qkv.lora_ind
            del lora_qkv.lora_ind
            lora_qkv.register_buffer("lora_ind", mask, persistent=False)
            block.attn.qkv = lora_qkv
        loralib.mark_only_lora_as_trainable(model, bias="none")
        self.train_head(model)

    def stacked_forwards(self) -> Mapping[type[nn.Module], StackedForward]:
        return {**STACKED_LAYERS, loralib.MergedLinear: stacked_merged_linear}

    def merge(
        self, model: VisionTransformer, backbone_names: list[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The frozen qkv weights plus each block's ``B @ A * alpha / rank``, as plain timm tensors."""
        state = model.state_dict()
        merged = {name: state[name].detach().clone() for name in backbone_names}
        with torch.no_grad():
            for index, block in enumerate(model.blocks):
                qkv = block.attn.qkv
                merged[f"blocks.{index}.attn.qkv.weight"] += qkv.merge_AB() * qkv.scaling
        return merged, {}


class FFALoRA(LoRA):
    """FFA-LoRA (Sun et al., ICLR 2024): LoRA with ``A`` frozen at its random initialisation.

    Only ``B`` (and the classifier) trains and travels, half of LoRA's factors. With one ``A`` on
    every client, averaging the clients' ``B`` is exactly averaging their updates ``B @ A``, which
    plain LoRA's separate averaging of ``A`` and ``B`` is not.

    The frozen ``A`` never travels, so every client must build the same one: it is drawn from its
    own stream of the run's seed (``seed_everything``; ``LORA_FROZEN_A`` in :mod:`fedpeft_pl.seeds`),
    independent of whatever else the build draws.

    Args:
        rank: rank ``r`` of each update ``B @ A``.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the LoRA branch's input.
        targets: which of the fused qkv projection's parts adapt.

    Example::

        FFALoRA(rank=8, alpha=8, targets=["q", "v"])
    """

    def __init__(  # LoRA's arguments without the deprecated ones, which YAML would otherwise offer here
        self,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        targets: Sequence[Literal["q", "k", "v"]] = ("q", "v"),
    ) -> None:
        super().__init__(rank=rank, alpha=alpha, dropout=dropout, targets=targets)

    def attach(self, model: VisionTransformer) -> None:
        super().attach(model)
        freeze_lora_a(block.attn.qkv.lora_A for block in model.blocks)


class HetLoRA(PerClientViews, LoRA):
    """LoRA at heterogeneous ranks across clients, aggregated by HetLoRA's zero-padding (Cho et al. 2024).

    The server keeps rank-``rank`` factors; client ``k`` receives the first ``r_k`` rows of each
    ``A`` and columns of each ``B``, trains a rank-``r_k`` LoRA and sends those back (counted in
    bytes at its rank); the server pads them with zeros to ``rank`` and the strategy averages them.

    Scale: ``s = alpha / rank`` for every client, ``rank`` being the global (maximum) rank. A
    client of rank ``r_k`` trains exactly a rank-``r_k`` LoRA with ``alpha_k = alpha * r_k / rank``
    (the server's rank-``rank`` module with ``A`` rows and ``B`` columns past ``r_k`` at zero, which
    get zero gradient and stay zero under SGD, momentum, weight decay and Adam), so a factor means
    the same update on every client and the zero-padded average is an average of like things.

    Runs on the in-process runners (the vectorised runner falls back to the sequential one) and in a
    Flower deployment (each client is sent its own view); ``Personalized``, local DP and secure
    aggregation refuse it.

    Args:
        rank: the global (largest) rank, that of the server's factors.
        alpha: the update is scaled by ``alpha / rank`` on every client.
        dropout: dropout on the LoRA branch's input.
        targets: which of the fused qkv projection's parts adapt.
        client_ranks: the ranks by a per-client map, client id to its rank ``r_k`` (1 to
            ``rank``); clients absent from the map get ``rank``.
        rank_choices: the ranks by a seeded rule: each client's rank is drawn from this list with
            its own stream of the run's seed (``LORA_RANK``, keyed by the client id), so it is the
            same in every process and every round. At most one of the two; without either, every
            client trains at ``rank``.

    Example::

        HetLoRA(rank=8, alpha=8, rank_choices=[2, 4, 8])
        HetLoRA(rank=8, alpha=8, client_ranks={0: 2, 1: 4})
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        targets: Sequence[Literal["q", "k", "v"]] = ("q", "v"),
        client_ranks: Optional[dict[int, int]] = None,
        rank_choices: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
        name = type(self).__name__
        if client_ranks is not None and rank_choices is not None:
            raise ConfigError(
                f"give {name} either client_ranks (a per-client map) or rank_choices (a seeded rule), not both"
            )
        if client_ranks is not None:
            if not isinstance(client_ranks, Mapping):
                raise ConfigError(
                    f"{name} client_ranks must map client ids to ranks, e.g. {{0: 2, 1: 4}}; got {client_ranks!r}"
                )
            client_ranks = {int(c): r for c, r in client_ranks.items()}
            _check_ranks(client_ranks.values(), rank, "client_ranks", name)
            if any(c < 0 for c in client_ranks):
                raise ConfigError(f"{name} client_ranks keys are client ids >= 0, got {sorted(client_ranks)}")
        if rank_choices is not None:
            if isinstance(rank_choices, (str, int)) or not list(rank_choices):
                raise ConfigError(
                    f"{name} rank_choices must be a non-empty list of ranks, e.g. [2, 4, {rank}]; got {rank_choices!r}"
                )
            rank_choices = tuple(rank_choices)
            _check_ranks(rank_choices, rank, "rank_choices", name)
        self.client_ranks = client_ranks
        self.rank_choices = rank_choices
        self._seed: Optional[int] = None  # the run's seed, taken when the model is built

    def attach(self, model: VisionTransformer) -> None:
        super().attach(model)
        self._seed = torch.initial_seed()

    def _run_seed(self) -> int:
        return self._seed if self._seed is not None else torch.initial_seed()

    def client_rank(self, client: int) -> int:
        """Client ``client``'s rank ``r_k``: from the map, the seeded rule, or ``rank``."""
        if self.client_ranks is not None:
            return self.client_ranks.get(client, self.rank)
        if self.rank_choices is not None:
            draw = np.random.default_rng(derive_seed(self._run_seed(), LORA_RANK, client)).integers(
                len(self.rank_choices)
            )
            return int(self.rank_choices[draw])
        return self.rank

    def client_view(self, state: State, client: int, server_round: int, upload: bool) -> State:
        """The client's first ``r_k`` rows of each ``A`` and columns of each ``B``, and the rest as is."""
        r, groups = self.client_rank(client), len(self.targets)
        view = {}
        for name, tensor in state.items():
            factor = _FACTOR.search(name)
            view[name] = tensor if factor is None else _first_ranks(tensor, factor.group(2), groups, r)
        return view

    def from_client_view(self, view: State, client: int, server_round: int, like: State) -> State:
        """The factors zero-padded to ``rank``, and the rest as is."""
        groups = len(self.targets)
        state = {}
        for name in like:
            if name not in view:
                raise ValueError(f"client {client}'s view lacks {name}")
            factor = _FACTOR.search(name)
            tensor = view[name]
            state[name] = tensor if factor is None else _zero_padded(tensor, factor.group(2), groups, self.rank)
        return state


class FLoRA(HetLoRA):
    """FLoRA (Wang et al., NeurIPS 2024): federated LoRA aggregated by stacking, at heterogeneous ranks or not.

    Every round each client starts a fresh rank-``r_k`` LoRA (``A`` drawn from its own stream
    ``LORA_FRESH_A`` of the run's seed, keyed by round and client; ``B`` zero) on the model so far,
    and the server adds the exact product ``sum_k p_k * s * B_k @ A_k`` (``p_k`` sample weights) to
    a dense per-block update, which FLoRA realises by stacking the ``A``'s vertically and the
    weighted ``B``'s horizontally. The head is aggregated by the strategy. Clients receive only the
    head and the update merged since they last took part (see :meth:`pending_download_bytes`), and
    send their factors at their own rank.

    The ranks and the scale are :class:`HetLoRA`'s. Runs on the in-process runners (the vectorised
    runner falls back to the sequential one) and in a Flower deployment (each client is sent its own
    view and the dense merged update, :meth:`model_update`); ``Personalized``, local DP and secure
    aggregation refuse it.

    Args:
        rank: the global (largest) rank.
        alpha: the update is scaled by ``alpha / rank`` on every client.
        dropout: dropout on the LoRA branch's input.
        targets: which of the fused qkv projection's parts adapt.
        client_ranks: the ranks by a per-client map, as :class:`HetLoRA`'s.
        rank_choices: the ranks by a seeded rule, as :class:`HetLoRA`'s. Without either, every
            client trains at ``rank``.

    Example::

        FLoRA(rank=8, alpha=8, client_ranks={0: 2, 1: 4})
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        targets: Sequence[Literal["q", "k", "v"]] = ("q", "v"),
        client_ranks: Optional[dict[int, int]] = None,
        rank_choices: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__(
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            targets=targets,
            client_ranks=client_ranks,
            rank_choices=rank_choices,
        )
        self._layers: list[loralib.MergedLinear] = []
        # the server's bookkeeping: elements of each round's stacked factors, the last round each client merged
        self._stack_elements: dict[int, int] = {}
        self._synced: dict[int, int] = {}

    def attach(self, model: VisionTransformer) -> None:
        super().attach(model)
        self._layers = [block.attn.qkv for block in model.blocks]
        for layer in self._layers:
            # the merged update lives beside the shared frozen weight, never in it
            delta = torch.zeros(layer.out_features, layer.in_features, dtype=layer.weight.dtype)
            layer.register_buffer("flora_delta", delta, persistent=False)
            layer.register_forward_hook(_add_merged_update)

    def client_view(self, state: State, client: int, server_round: int, upload: bool) -> State:
        """A client receives no factors (it draws its own) and sends its ``r_k`` ones; the rest as is."""
        if upload:
            return super().client_view(state, client, server_round, upload)
        return {name: tensor for name, tensor in state.items() if _FACTOR.search(name) is None}

    def from_client_view(self, view: State, client: int, server_round: int, like: State) -> State:
        """Factors zero-padded to ``rank``; those a received view lacks are fresh (``A`` drawn, ``B`` zero)."""
        r, groups = self.client_rank(client), len(self.targets)
        generator = torch.Generator().manual_seed(derive_seed(self._run_seed(), LORA_FRESH_A, server_round, client))
        fresh = {}
        for name, reference in like.items():
            factor = _FACTOR.search(name)
            if name in view or factor is None:
                continue
            tensor = torch.zeros(_first_ranks(reference, factor.group(2), groups, r).shape, dtype=torch.float32)
            if factor.group(2) == "A":  # loralib's and peft's kaiming-uniform: bound 1 / sqrt(in_features)
                bound = 1.0 / math.sqrt(reference.shape[1])
                tensor.uniform_(-bound, bound, generator=generator)
            fresh[name] = tensor.to(device=reference.device, dtype=reference.dtype)
        return super().from_client_view({**view, **fresh}, client, server_round, like)

    @torch.no_grad()
    def aggregate(
        self, model: VisionTransformer, aggregated: State, updates: list[ClientUpdate], server_round: int
    ) -> State:
        """Add ``sum_k p_k * s * B_k @ A_k`` (each at its own rank) to every block's merged update.

        The global factors are left with ``B`` zero, so the server's model is the merged update plus the
        aggregated head; the strategy's mean of the factors is discarded.
        """
        if any(u.aggregate_of for u in updates):
            raise ConfigError("FLoRA needs every client's own factors; it cannot run under secure aggregation")
        total = sum(u.num_samples for u in updates)
        groups = len(self.targets)
        names: dict[int, dict[str, str]] = {}
        for name in aggregated:
            factor = _FACTOR.search(name)
            if factor is not None:
                names.setdefault(int(factor.group(1)), {})[factor.group(2)] = name
        elements = 0
        for index, layer in enumerate(self._layers):
            a_name, b_name = names[index]["A"], names[index]["B"]
            factors = []
            for update in updates:
                r = self.client_rank(update.client)
                a = _first_ranks(update.state[a_name], "A", groups, r)
                b = _first_ranks(update.state[b_name], "B", groups, r)
                factors.append((update.num_samples / total * layer.scaling, b, a))
                elements += a.numel() + b.numel()
            product = stacked_product(factors, groups).to(layer.flora_delta)
            layer.flora_delta[layer.lora_ind] += product
            aggregated = {**aggregated, b_name: torch.zeros_like(aggregated[b_name])}
        self._stack_elements[server_round] = elements
        return aggregated

    def pending_download_bytes(self, client: int, server_round: int) -> int:
        """What ``client`` has not merged: the stacked factors of every round since it last received, or
        the dense per-block update if that is smaller (a client away for long, or new, gets the dense one:
        sending the stacks would cost more than the ``n * d * d_in`` elements per block they sum to)."""
        if not self._layers:
            return 0
        since = self._synced.get(client, 0)
        stacked = sum(n for r, n in self._stack_elements.items() if since < r < server_round)
        if not stacked:
            return 0
        element = self._layers[0].flora_delta.element_size()
        return min(stacked * element, self.dense_update_bytes())

    def dense_update_bytes(self) -> int:
        """Bytes of the dense merged update of every adapted part (q, v), what a client far behind receives."""
        return sum(
            int(layer.lora_ind.sum()) * layer.in_features * layer.flora_delta.element_size() for layer in self._layers
        )

    def delivered(self, clients: list[int], server_round: int) -> None:
        for client in clients:
            self._synced[client] = server_round - 1

    def server_state(self) -> dict[str, Any]:
        return {
            "merged": [layer.flora_delta.detach().cpu().clone() for layer in self._layers],
            "stack_elements": {str(r): n for r, n in self._stack_elements.items()},
            "synced": {str(c): r for c, r in self._synced.items()},
        }

    @torch.no_grad()
    def load_server_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        for layer, merged in zip(self._layers, state["merged"]):
            layer.flora_delta.copy_(merged)
        self._stack_elements = {int(r): n for r, n in state["stack_elements"].items()}
        self._synced = {int(c): r for c, r in state["synced"].items()}

    def model_update(self) -> State:
        """Each block's dense merged update, what a deployed client adds to its frozen ``qkv``."""
        return {f"blocks.{i}.attn.qkv.flora_delta": layer.flora_delta for i, layer in enumerate(self._layers)}

    @torch.no_grad()
    def load_model_update(self, tensors: State) -> None:
        for i, layer in enumerate(self._layers):
            name = f"blocks.{i}.attn.qkv.flora_delta"
            if name in tensors:
                layer.flora_delta.copy_(tensors[name])

    def merge(
        self, model: VisionTransformer, backbone_names: list[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """LoRA's merge plus each block's merged update."""
        merged, overrides = super().merge(model, backbone_names)
        for index, layer in enumerate(self._layers):
            merged[f"blocks.{index}.attn.qkv.weight"] += layer.flora_delta
        return merged, overrides


def _earlier_form(
    freeze_a: bool, client_ranks: Optional[dict[int, int]], rank_choices: Optional[Sequence[int]], aggregation: str
) -> Optional[tuple[type[LoRA], dict[str, Any], str]]:
    """The variant that LoRA's deprecated arguments describe, the arguments it takes of them, and the warning
    that names it; None for plain LoRA."""
    variants: dict[str, type[LoRA]] = {"average": HetLoRA, "stack": FLoRA}
    if aggregation not in variants:
        raise ConfigError(
            f"LoRA aggregation (deprecated) must be 'average' or 'stack', got {aggregation!r}; "
            "name the variant instead: fedpeft_pl.peft.HetLoRA or FLoRA"
        )
    ranks = {k: v for k, v in (("client_ranks", client_ranks), ("rank_choices", rank_choices)) if v is not None}
    if freeze_a and (ranks or aggregation == "stack"):
        raise ConfigError(
            "FFA-LoRA (LoRA freeze_a) takes one rank on every client and aggregation 'average'; "
            "choose one of fedpeft_pl.peft.FFALoRA, HetLoRA and FLoRA"
        )
    if freeze_a:
        cls: type[LoRA] = FFALoRA
    elif ranks or aggregation == "stack":
        cls = variants[aggregation]
    else:
        return None
    dropped = [*(["freeze_a"] if freeze_a else []), *(["aggregation"] if aggregation != "average" else [])]
    changes = [f"keeping {' and '.join(ranks)}"] if ranks else []
    if dropped:
        changes.append(f"dropping {' and '.join(dropped)}")
    message = (
        f"fedpeft_pl.peft.LoRA with {' and '.join([*ranks, *dropped])} is deprecated: "
        f"write class_path: fedpeft_pl.peft.{cls.__name__}, {' and '.join(changes)}"
    )
    return cls, ranks, message


def stacked_product(factors: Sequence[tuple[float, torch.Tensor, torch.Tensor]], groups: int) -> torch.Tensor:
    """``sum_k w_k * B_k @ A_k`` for each of loralib's ``groups`` (q, k, v parts), by FLoRA's stacking.

    ``factors`` are ``(w_k, B_k, A_k)`` of any ranks ``r_k``: ``A_k`` is ``(groups * r_k, d_in)``,
    ``B_k`` is ``(groups * d, r_k)``. Per group the ``A``'s stack vertically and the weighted ``B``'s
    horizontally, and one product of the stacks is the weighted sum of the clients' products.
    Returns ``(groups * d, d_in)``, in float64.
    """
    parts = []
    for g in range(groups):
        a_stack = torch.cat([a.to(torch.float64).view(groups, -1, a.shape[1])[g] for _, _, a in factors])
        b_stack = torch.cat([w * b.to(torch.float64).view(groups, -1, b.shape[1])[g] for w, b, _ in factors], dim=1)
        parts.append(b_stack @ a_stack)
    return torch.cat(parts)


def _check_ranks(ranks: Iterable[Any], rank: int, what: str, method: str) -> None:
    bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= rank]
    if bad:
        raise ConfigError(
            f"{method} {what} must be ranks between 1 and rank={rank} (the global, largest rank); got {bad}"
        )


def _first_ranks(factor: torch.Tensor, kind: str, groups: int, r: int) -> torch.Tensor:
    """The first ``r`` ranks of a merged-qkv factor: each group's first ``r`` rows of ``A``, the first ``r``
    columns of ``B``."""
    if kind == "B":
        return factor[:, :r].contiguous()
    return factor.view(groups, -1, factor.shape[1])[:, :r].reshape(-1, factor.shape[1])


def _zero_padded(factor: torch.Tensor, kind: str, groups: int, rank: int) -> torch.Tensor:
    """The inverse of :func:`_first_ranks`: the factor at ``rank``, zero past its own rank."""
    if kind == "B":
        return F.pad(factor, (0, rank - factor.shape[1]))
    per_group = factor.view(groups, -1, factor.shape[1])
    return F.pad(per_group, (0, 0, 0, rank - per_group.shape[1])).reshape(-1, factor.shape[1])


def stacked_merged_linear(module: loralib.MergedLinear, stacked: State, x: torch.Tensor) -> torch.Tensor:
    """loralib's ``MergedLinear`` with per-client factors: the frozen projection once over every client's rows,
    plus each client's low-rank update ``x @ A_k^T @ B_k^T`` as two batched products (never the dense ``B_k @ A_k``).

    ``A`` may be the module's own, shared by every client (FFA-LoRA's frozen ``A``).
    """
    result = F.linear(x, module.weight, module.bias)
    b = stacked["lora_B"]  # [m, enabled outputs, r]
    clients = b.shape[0]
    a = stacked.get("lora_A", module.lora_A)  # [m, r * groups, in] or shared [r * groups, in]
    if a.dim() == 2:  # in the product's dtype before it is expanded (product_dtype)
        a = a.to(product_dtype(x)).expand(clients, -1, -1)
    rows = module.lora_dropout(x).reshape(clients, -1, x.shape[-1])  # [m, B * N, in]
    low = torch.bmm(rows, a.transpose(1, 2))  # [m, B * N, r * groups]
    groups = sum(module.enable_lora)
    # loralib's grouped conv1d: output group g uses rank rows g * r to (g + 1) * r of A
    parts = [torch.bmm(lo, bg.transpose(1, 2)) for lo, bg in zip(low.chunk(groups, dim=2), b.chunk(groups, dim=1))]
    update = torch.cat(parts, dim=2).reshape(*x.shape[:-1], -1) * module.scaling
    enabled = module.lora_ind.nonzero().squeeze(1)
    return result.index_add(-1, enabled, update.to(result.dtype))


def _add_merged_update(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output + F.linear(inputs[0], module.flora_delta.to(inputs[0].dtype))


@torch.no_grad()
def freeze_lora_a(factors: Iterable[nn.Parameter]) -> None:
    """Freeze LoRA ``A`` factors, redrawn from the run seed's own stream (FFA-LoRA).

    The draw is the kaiming-uniform of loralib and peft (bound ``1 / sqrt(in_features)``) from a
    generator keyed ``(torch.initial_seed(), LORA_FROZEN_A)``: ``seed_everything`` sets
    ``torch.initial_seed()``, so two builds of one config give the same ``A``.
    """
    generator = torch.Generator().manual_seed(derive_seed(torch.initial_seed(), LORA_FROZEN_A))
    for factor in factors:
        bound = 1.0 / math.sqrt(factor.shape[1])
        draw = torch.empty(factor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        factor.copy_(draw.to(device=factor.device, dtype=factor.dtype))
        factor.requires_grad_(False)
