"""The small base class every PEFT method derives from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.component import ShownByArguments
from fedpeft_pl.errors import ConfigError

State = dict[str, torch.Tensor]

# forward(module, stacked, *args, **kwargs): the module's output on a folded batch (see PEFTMethod.stacked_forwards)
StackedForward = Callable[..., torch.Tensor]


class PEFTMethod(ShownByArguments, ABC):
    """A parameter-efficient fine-tuning method for a timm ``VisionTransformer``.

    A method attaches itself to the model: it may register new modules and forward hooks,
    but it never renames or re-implements the backbone, so the backbone's parameter names
    stay those of timm. It marks what trains with ``requires_grad``. What travels between
    clients and server is exactly the trainable state (:func:`trainable_state`).

    To add a method, subclass this, implement :meth:`attach`, and name the class by
    ``class_path`` under ``model.peft`` in YAML. The other hooks are optional: :meth:`stacked_forwards`
    (a stacked form for the vectorised engine), :meth:`merge` (export as plain timm) and
    :meth:`local_names` (a local part). A method whose clients exchange different tensors (heterogeneous
    LoRA ranks) derives from :class:`~fedpeft_pl.peft.PerClientViews` instead, which adds the
    per-client exchange hooks.

    Attributes:
        per_client_views: whether clients exchange views of the shared state rather than all of it
            (True exactly for :class:`~fedpeft_pl.peft.PerClientViews`); the runners, the server and
            the byte counts read it.

    Example::

        class NormOnly(PEFTMethod):
            def attach(self, model):
                for name, param in model.named_parameters():
                    param.requires_grad_(".norm" in name or name.startswith("norm."))
                self.train_head(model)
    """

    per_client_views: ClassVar[bool] = False

    def apply(self, model: VisionTransformer) -> None:
        """Freeze the whole model, then let the method add and unfreeze its tensors."""
        model.requires_grad_(False)
        self.attach(model)
        if not any(param.requires_grad for param in model.parameters()):
            raise ConfigError(f"{type(self).__name__} marked no tensor as trainable; nothing would be learned")

    @abstractmethod
    def attach(self, model: VisionTransformer) -> None:
        """Add this method's modules to ``model`` and set ``requires_grad`` on what trains."""

    def merge(
        self, model: VisionTransformer, backbone_names: list[str]
    ) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Plain-timm tensors equivalent to the trained model, and ``timm.create_model`` overrides.

        ``backbone_names`` are the model's own tensor names before the method was attached.
        Returns None when the method's tensors have no plain-timm equivalent. The default covers
        methods that only train existing tensors (Head, Bias, Full).
        """
        state = model.state_dict()
        if set(state) - set(backbone_names):
            return None
        return {name: state[name].detach().clone() for name in backbone_names}, {}

    def local_names(self, trainable: list[str]) -> set[str]:
        """The trainable tensors (model names) that stay on each client; none unless the method is personalised."""
        return set()

    @staticmethod
    def train_head(model: VisionTransformer) -> None:
        model.get_classifier().requires_grad_(True)

    def stacked_forwards(self) -> Optional[Mapping[type[nn.Module], StackedForward]]:
        """This method's stacked form for the vectorised engine, or None (the default): no stacked form.

        The engine trains ``m`` clients at once by running the plain model, fused attention and all,
        on the folded batch ``[m * B, ...]`` (client ``k``'s samples are rows ``k * B`` to
        ``(k + 1) * B - 1``). Only the modules that own a trainable tensor (as a direct parameter)
        compute differently: for each such module, the engine looks its type up here (the first
        class of its MRO found) and calls ``forward(module, stacked, *args, **kwargs)`` instead of
        ``module.forward``. ``stacked`` maps the names of the module's own trainable tensors to
        their per-client stacks ``[m, ...]``; a tensor not in it is the module's own, frozen and
        shared. ``forward`` applies client ``k``'s tensors to rows of client ``k`` only, with
        batched operations (:func:`per_client` views a folded tensor as ``[m, B, ...]``). Forward
        hooks of the module and of every other module run as usual.

        :data:`STACKED_LAYERS` covers ``nn.Linear``, ``nn.LayerNorm`` and ``nn.Conv2d`` (bias
        only), which is all that Head, Bias and Adapter need. A method that returns None, or
        whose trainable tensors have an owner of a type the mapping lacks, trains through
        ``torch.func.vmap`` instead (timm's explicit attention, about 2x slower on a GPU).
        """
        return None


def per_client(x: torch.Tensor, clients: int) -> torch.Tensor:
    """A folded batch ``[m * B, ...]`` viewed as ``[m, B, ...]``."""
    return x.reshape(clients, -1, *x.shape[1:])


def along(stacked: torch.Tensor, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """A per-client vector ``[m, C]`` shaped to broadcast over ``x = [m, B, ...]`` along ``dim`` of the sample."""
    shape = [1] * x.dim()
    shape[0] = stacked.shape[0]
    shape[dim if dim < 0 else dim + 2] = stacked.shape[-1]
    return stacked.reshape(shape)


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product with ``x`` runs in: autocast's where it is on, else ``x``'s. A shared tensor
    expanded over the clients is cast to it first, so autocast has no expanded tensor to copy once per client."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def stacked_linear(module: nn.Linear, stacked: State, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear`` with a per-client weight (a batched matrix product) and/or bias (broadcast per client)."""
    weight, bias = stacked.get("weight"), stacked.get("bias")
    if weight is None and bias is not None:
        # a frozen weight with each client's bias added inside the product, as addmm adds the plain model's:
        # a bias-free product and a separate broadcast add cost BitFit 11% of its step on a CPU at 128 x 8
        # (benchmarks/README.md). The frozen weight is expanded, not copied, over the clients: cast first to the
        # dtype the product runs in (autocast's, else the input's), so autocast has no expanded tensor to cast
        # (which would write, and keep for backward, one copy of the weight per client)
        dtype = product_dtype(x)
        rows = x.to(dtype).reshape(bias.shape[0], -1, x.shape[-1])
        frozen = module.weight.t().to(dtype).expand(bias.shape[0], -1, -1)
        out = torch.baddbmm(bias.unsqueeze(1).to(dtype), rows, frozen)
        return out.reshape(*x.shape[:-1], frozen.shape[-1])
    if weight is None:  # nothing per client: one matrix product over all clients' rows
        return F.linear(x, module.weight, module.bias)
    rows = x.reshape(weight.shape[0], -1, x.shape[-1])  # [m, B * ..., in], client-major
    out = torch.bmm(rows, weight.transpose(1, 2)).reshape(*x.shape[:-1], weight.shape[1])
    if bias is None and module.bias is not None:
        out = out + module.bias.to(out.dtype)
    if bias is not None:
        # in the output's dtype, as F.linear adds its bias (bf16 under autocast): no float32 activations
        grouped = per_client(out, bias.shape[0])
        out = (grouped + along(bias, grouped).to(out.dtype)).flatten(0, 1)
    return out


def stacked_layer_norm(module: nn.LayerNorm, stacked: State, x: torch.Tensor) -> torch.Tensor:
    """``nn.LayerNorm`` with a per-client weight and/or bias: each sample normalised, then its client's affine map."""
    weight, bias = stacked.get("weight"), stacked.get("bias")
    out = F.layer_norm(
        x,
        module.normalized_shape,
        module.weight if weight is None else None,
        module.bias if bias is None else None,
        module.eps,
    )
    if weight is None and bias is None:
        return out
    grouped = per_client(out, (weight if weight is not None else bias).shape[0])  # type: ignore[union-attr]
    if weight is not None:
        grouped = grouped * along(weight, grouped)
        if bias is None and module.bias is not None:
            grouped = grouped + module.bias
    if bias is not None:
        grouped = grouped + along(bias, grouped)
    return grouped.flatten(0, 1)


def stacked_conv2d(module: nn.Conv2d, stacked: State, x: torch.Tensor) -> torch.Tensor:
    """``nn.Conv2d`` with a per-client bias (BitFit's patch embedding); a per-client kernel has no stacked form here."""
    if set(stacked) != {"bias"}:
        raise ValueError("stacked_conv2d trains a per-client bias only")
    out = per_client(module._conv_forward(x, module.weight, None), stacked["bias"].shape[0])
    return (out + along(stacked["bias"], out, dim=0).to(out.dtype)).flatten(0, 1)


# the stacked forwards of torch's layers that PEFT methods train tensors of
STACKED_LAYERS: dict[type[nn.Module], StackedForward] = {
    nn.Linear: stacked_linear,
    nn.LayerNorm: stacked_layer_norm,
    nn.Conv2d: stacked_conv2d,
}


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by name: exactly what a client sends."""
    return {name: param for name, param in module.named_parameters() if param.requires_grad}


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters."""
    return {name: param.detach().clone() for name, param in trainable_parameters(module).items()}


def local_names(module: nn.Module) -> frozenset[str]:
    """Names of ``module``'s trainable tensors that stay on each client (a personalised method's local part)."""
    return frozenset(getattr(module, "local_names", ()))


def shared_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable tensors that travel: all of them unless some are local."""
    local = local_names(module)
    return {name: param.detach().clone() for name, param in trainable_parameters(module).items() if name not in local}


@torch.no_grad()
def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], partial: bool = False) -> None:
    """Copy ``state`` into the trainable parameters in place (the backbone is never copied).

    With ``partial``, ``state`` may hold a subset of them (the shared part of a personalised method).
    """
    params = trainable_parameters(module)
    if partial and state.keys() <= params.keys():
        params = {name: params[name] for name in state}
    if params.keys() != state.keys():
        missing = sorted(params.keys() - state.keys())
        extra = sorted(state.keys() - params.keys())
        raise ValueError(f"trainable state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, param in params.items():
        param.copy_(state[name])


def method_spec(peft: object) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": ...}`` of a PEFT method, as JSON can hold it."""
    return {"class_path": f"{type(peft).__module__}.{type(peft).__qualname__}", "init_args": _init_args(peft)}


def _init_args(peft: object) -> dict[str, Any]:
    export_args = getattr(peft, "export_args", None)
    if export_args is not None:  # a method whose arguments are objects (HFPeft's peft config)
        return dict(export_args())
    args = {k: v for k, v in vars(peft).items() if not k.startswith("_")}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
