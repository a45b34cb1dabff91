"""The frozen vision transformer that every client shares.

The architecture is built at once (random weights, no download) so that parameter and byte
counts are available without network; :meth:`Backbone.load_weights` fills in pre-trained
weights later, through timm's own pretrained-loading path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from timm.models import VisionTransformer

from fedpeft_pl.errors import ConfigError


@dataclass
class Backbone:
    """Which timm ViT to build and where its weights come from.

    Args:
        name: a timm model name, e.g. ``vit_base_patch16_224.augreg_in21k``.
        pretrained: load the weights that ``name`` points to on the Hugging Face hub.
        weights_file: a local ``.safetensors`` or ``.pth`` state dict for this architecture. It is
            loaded through timm's pretrained path, so a classifier of another size is dropped and
            position embeddings are resized to ``img_size``. Takes precedence over ``pretrained``.
        img_size: input resolution; defaults to the architecture's own.
        kwargs: further ``timm.create_model`` arguments, e.g. ``depth`` or ``embed_dim``.

    Example::

        Backbone("vit_tiny_patch16_224", img_size=32, kwargs={"patch_size": 4, "depth": 2})
    """

    name: str = "vit_base_patch16_224.augreg_in21k"
    pretrained: bool = False
    weights_file: Optional[str] = None
    img_size: Optional[int] = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def loads_weights(self) -> bool:
        """Whether building the model loads pre-trained weights (from the hub or a file), or leaves them random."""
        return self.pretrained or self.weights_file is not None

    def create_kwargs(self, num_classes: int) -> dict[str, Any]:
        """The ``timm.create_model`` arguments for this architecture, weights aside."""
        kwargs = dict(self.kwargs, num_classes=num_classes)
        if self.img_size is not None:
            kwargs["img_size"] = self.img_size
        return kwargs

    def build(self, num_classes: int) -> VisionTransformer:
        """The architecture with random weights; nothing is downloaded."""
        try:
            model = timm.create_model(self.name, pretrained=False, **self.create_kwargs(num_classes))
        except RuntimeError as err:  # timm's "Unknown model" error
            raise ConfigError(
                f"timm has no model named {self.name!r}; pick one from timm.list_models('vit_*')"
            ) from err
        except TypeError as err:
            kind = _architecture_of(self.name)
            if kind is not None and kind != "VisionTransformer":  # the kwargs are not the problem
                raise ConfigError(_not_a_vit(self.name, kind)) from None
            raise ConfigError(f"model.backbone.kwargs do not fit {self.name!r}: {err}") from err
        if not isinstance(model, VisionTransformer):
            raise ConfigError(_not_a_vit(self.name, type(model).__name__))
        if type(model).__name__ == "VisionTransformerDistilled":
            # two heads (class and distillation token): the PEFT methods and the server assume one
            raise ConfigError(
                f"{self.name!r} is a distilled DeiT (two classifier heads), which fedpeft does not support; "
                f"use the plain one, e.g. {self.name.replace('_distilled', '')!r}"
            )
        patch = model.patch_embed.patch_size
        size = model.patch_embed.img_size
        if any(s % p for s, p in zip(size, patch)):
            raise ConfigError(
                f"model.backbone.img_size {size[0] if size[0] == size[1] else size} is not a multiple of the patch "
                "size "
                f"{patch[0] if patch[0] == patch[1] else patch}: the border would be silently cropped; set img_size to "
                "a multiple, "
                f"e.g. {(size[0] // patch[0]) * patch[0]} or {(size[0] // patch[0] + 1) * patch[0]}"
            )
        return model

    def load_weights(self, model: VisionTransformer) -> None:
        """Copy pre-trained weights into ``model`` by parameter name.

        PEFT methods keep the backbone's parameter names (they add tensors, never rename), so
        the weights can be loaded after a method is attached. Tensors the weights do not have
        (the PEFT tensors) keep their initialisation.
        """
        if not self.loads_weights:
            return
        num_classes = model.num_classes
        reference = self._load_reference(num_classes)
        state = reference.state_dict()
        if reference.pretrained_cfg.get("num_classes", num_classes) != num_classes:
            # timm dropped the weights' classifier, so the reference's is a fresh random one drawn
            # from whatever the RNG holds now; keep the model's own, drawn under the run's seed
            classifier = model.default_cfg.get("classifier", "head")
            state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ConfigError(
                f"the weights for {self.name!r} hold tensors this architecture lacks "
                f"({', '.join(result.unexpected_keys[:3])}); check model.backbone.name and kwargs"
            )

    def _load_reference(self, num_classes: int) -> VisionTransformer:
        # the weights overwrite the reference's tensors (load_weights drops a classifier they lack), so
        # timm's random init of every tensor would be work thrown away
        kwargs = dict(self.create_kwargs(num_classes), weight_init="skip")
        if self.weights_file is not None:
            path = _shipped_or_given(os.fspath(self.weights_file))
            if not os.path.isfile(path):
                raise ConfigError(
                    f"model.backbone.weights_file {path!r} does not exist; give the path of a "
                    ".safetensors or .pth state dict"
                )
            # names are all the check needs: built on the meta device, it costs no memory and no random
            # init (seconds for ViT-B/16 on a CPU, before round 1)
            with torch.device("meta"):
                _check_file_fits(path, self.build(num_classes))
            try:
                # custom_load False: the registry's source may be a JAX .npz that timm reads with a
                # model-specific loader; a timm before 1.0.31 kept that flag for an overlaid file
                return timm.create_model(
                    self.name, pretrained=True, pretrained_cfg_overlay={"file": path, "custom_load": False}, **kwargs
                )
            except RuntimeError as err:  # size mismatches from load_state_dict
                first = str(err).strip().splitlines()
                detail = next((line.strip() for line in first if "size mismatch" in line), first[-1])
                raise ConfigError(
                    f"model.backbone.weights_file {path!r} does not fit {self.name!r} "
                    f"({detail}); check model.backbone.name and kwargs"
                ) from err
        try:
            _check_hub_reachable()
            return timm.create_model(self.name, pretrained=True, **kwargs)
        except Exception as err:  # hub and network errors come in many types
            raise ConfigError(
                f"could not fetch pre-trained weights for {self.name!r} from the Hugging Face hub "
                f"({type(err).__name__}); without network, download the weights elsewhere and set "
                "model.backbone.weights_file: path/to/weights.safetensors"
            ) from err


def _not_a_vit(name: str, kind: str) -> str:
    return (
        f"{name!r} is a {kind}, not a timm VisionTransformer; fedpeft fine-tunes ViTs: "
        "pick one from timm.list_models('vit_*')"
    )


def _architecture_of(name: str) -> Optional[str]:
    """The class timm builds for ``name`` with its defaults, or None if it cannot be built."""
    try:
        return type(timm.create_model(name, pretrained=False)).__name__
    except Exception:  # an unknown name or odd arguments: the caller's message stands
        return None


def _check_hub_reachable(timeout: float = 3.0) -> None:
    """Switch the hub to offline mode when it cannot be reached, so that the weights come from the
    local cache or fail at once, instead of after a minute of retries.

    huggingface_hub retries a failed download with back-off and warns at each try; without
    network that is dozens of warnings before the same error. ``HF_HUB_OFFLINE=1`` needs no
    check. One TCP connection decides.
    """
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    import socket

    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at each download; the cache still serves


def _check_file_fits(path: str, model: VisionTransformer) -> None:
    """Refuse a weights file whose tensor names are not this architecture's.

    timm loads non-strictly once it drops a classifier, which would silently leave tensors of
    another architecture unused, or leave this one's at random; this check makes both errors.
    """
    keys = _weight_names(path)
    classifier = model.default_cfg.get("classifier", "head")
    head = {f"{classifier}.{p}" for p in ("weight", "bias")}
    expected = [k for k in model.state_dict() if k not in head]
    missing = [k for k in expected if k not in keys]
    extra = sorted(k for k in keys - set(expected) - head if not k.startswith(f"{classifier}."))
    if len(missing) == len(expected):
        raise ConfigError(
            f"model.backbone.weights_file {path!r} is not a state dict of a timm VisionTransformer like "
            f"{model.default_cfg.get('architecture', '')!r} (none of its tensors is there); check the file"
        )
    if missing or extra:
        example = missing[0] if missing else extra[0]
        raise ConfigError(
            f"model.backbone.weights_file {path!r} does not fit {model.default_cfg.get('architecture', '')!r}: "
            f"{len(missing)} tensors missing, {len(extra)} unexpected (e.g. {example}); check model.backbone.name and "
            "kwargs"
        )


def _weight_names(path: str) -> set[str]:
    try:
        state = timm.models.load_state_dict(path)
    except Exception as err:  # unreadable or foreign formats raise many types
        raise ConfigError(
            f"model.backbone.weights_file {path!r} could not be read as a state dict "
            f"({type(err).__name__}); save it with safetensors or torch.save(model.state_dict())"
        ) from err
    return set(state)


def data_config(model: VisionTransformer) -> dict[str, Any]:
    """Input size, mean, std and interpolation that the backbone's weights expect."""
    config = timm.data.resolve_data_config(model=model)
    height, width = model.patch_embed.img_size
    return {
        "input_size": (3, height, width),
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "interpolation": config.get("interpolation", "bilinear"),
    }


def fingerprint(model: VisionTransformer, names: list[str]) -> str:
    """A short hash of the named tensors' names, shapes and values: the backbone's identity.

    Computed once, right after the weights are loaded and before any training, over the
    backbone's own tensors without its classifier.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    classifier = model.default_cfg.get("classifier", "head")
    for name in sorted(n for n in names if not n.startswith(f"{classifier}.")):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _shipped_or_given(path: str) -> str:
    """``path``; or, where it names the package's own ``fedpeft_pl/assets/...`` and no such file is here,
    the installed copy, so the shipped configs run from any directory."""
    parts = Path(path).parts
    if os.path.isfile(path) or parts[:2] != ("fedpeft_pl", "assets"):
        return path
    shipped = Path(__file__).resolve().parent.joinpath(*parts[1:])
    return str(shipped) if shipped.is_file() else path
