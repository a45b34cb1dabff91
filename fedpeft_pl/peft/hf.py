"""Any Hugging Face ``peft`` method (LoRA, DoRA, IA3, LoHa, LoKr, VeRA, ...) as a fedpeft PEFT method."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Optional

import torch
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from timm.models import VisionTransformer
from torch import nn

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft.base import STACKED_LAYERS, PEFTMethod, StackedForward
from fedpeft_pl.peft.lora import freeze_lora_a

ADAPTER = "default"
# LoRA initialisations computed from the base weight, which is still random when the method attaches
_WEIGHT_DEPENDENT_INITS = ("pissa", "olora", "loftq", "eva", "corda", "lora_ga")


class HFPeft(PEFTMethod):
    """A Hugging Face ``peft`` adapter injected into the frozen ViT, plus the classifier.

    Args:
        config: any injectable ``peft`` config, e.g. ``peft.LoraConfig``, ``peft.LoraConfig(use_dora=True)``
            (DoRA), ``peft.IA3Config``, ``peft.LoHaConfig``, ``peft.LoKrConfig`` or ``peft.VeraConfig``.
            ``target_modules`` name modules of the timm ViT: ``qkv`` and ``proj`` in attention,
            ``fc1`` and ``fc2`` in the MLP (or full paths such as ``blocks.0.attn.qkv``).
        freeze_a: FFA-LoRA (Sun et al., ICLR 2024), LoRA configs only: every ``lora_A`` stays at its
            random initialisation and only ``lora_B`` trains and travels, half of LoRA's upload;
            averaging the ``B`` of clients that share ``A`` is exactly averaging their updates
            ``B @ A``. ``A`` is redrawn from its own stream of the run's seed (``seed_everything``),
            so every client of a deployment builds the same ``A``.

    The adapter tensors and the classifier train and travel, nothing else; what the config would
    train besides (``bias: all``, ``modules_to_save``) is refused. peft wraps each targeted layer
    (``attn.qkv`` becomes ``attn.qkv.base_layer``); this class keeps timm's names in the model's
    ``state_dict`` and in ``load_state_dict``, so pre-trained weights load after the method is
    attached and checkpoints, fingerprints and exports see plain timm names. Export merges the
    adapter into the weights through peft's own ``merge`` (a plain timm file).

    The forward runs under ``torch.func.functional_call``, and under ``vmap`` of ``grad`` (local
    DP's per-sample gradients) for LoRA, DoRA, IA3, LoKr and VeRA; peft's LoHa computes its weight
    in an ``autograd.Function`` without ``setup_context``, which ``torch.func`` transforms refuse.

    Example::

        from peft import LoraConfig
        HFPeft(LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"]))

    In YAML::

        model:
          peft:
            class_path: fedpeft_pl.peft.HFPeft
            init_args:
              config:
                class_path: peft.LoraConfig
                init_args: {r: 8, lora_alpha: 8, target_modules: [qkv]}
    """

    def __init__(self, config: PeftConfig, freeze_a: bool = False) -> None:
        if (
            isinstance(config, dict) and "class_path" in config
        ):  # as load_exported passes it back: {"class_path": ..., "init_args": ...}
            config = _config_from_dict(config)
        if not isinstance(config, PeftConfig):
            raise ConfigError(
                f"HFPeft config must be a peft config such as peft.LoraConfig, got {type(config).__name__}"
            )
        if config.is_prompt_learning or config.peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
            raise ConfigError(
                f"HFPeft injects adapters into the ViT's layers; {type(config).__name__} is not such a method "
                "(for prompts use fedpeft_pl.peft.Prompt)"
            )
        if getattr(config, "modules_to_save", None):
            raise ConfigError("HFPeft always trains the classifier itself; remove modules_to_save from the peft config")
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.startswith(_WEIGHT_DEPENDENT_INITS):
            raise ConfigError(
                f"HFPeft cannot use init_lora_weights={init!r}: it derives from the pre-trained weights (and changes "
                "them), which load after the method is attached; use true or 'gaussian'"
            )
        if freeze_a and config.peft_type.value != "LORA":
            raise ConfigError(f"HFPeft freeze_a (FFA-LoRA) needs a peft.LoraConfig, got {type(config).__name__}")
        self.config = config
        self.freeze_a = freeze_a
        self._plain_lora = False  # whether every adapted layer is vanilla LoRA (known once attached)

    def attach(self, model: VisionTransformer) -> None:
        tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[self.config.peft_type]
        try:
            # What peft.inject_adapter_in_model does, but it refuses tuners with state shared across layers
            # (VeRA's random projections); those layers hold that state as submodules, so it works here too.
            tuner_cls(model, copy.deepcopy(self.config), adapter_name=ADAPTER)
        except ValueError as err:
            raise ConfigError(
                f"HFPeft could not apply {type(self.config).__name__} to {type(model).__name__} "
                f"({str(err).splitlines()[0]}); target modules are named on the timm ViT, e.g. qkv, proj, fc1, fc2"
            ) from err
        model.__dict__.pop("peft_config", None)  # peft leaves its configs on the model; the method holds them
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                _register_hook(module, "register_state_dict_post_hook", "_register_state_dict_hook", _timm_names)
                _register_hook(module, "register_load_state_dict_pre_hook", None, _wrapped_names)
                module.register_load_state_dict_post_hook(_refresh_dora_magnitude)
        wrapped = [name for name, p in model.named_parameters() if p.requires_grad and ".base_layer." in name]
        if wrapped:
            raise ConfigError(
                f"the peft config trains the backbone's own tensor {wrapped[0]}; set its bias to 'none' "
                "(for BitFit use fedpeft_pl.peft.Bias)"
            )
        if self.freeze_a:
            freeze_lora_a(p for name, p in model.named_parameters() if ".lora_A." in name)
        self.train_head(model)
        self._plain_lora = self.config.peft_type.value == "LORA" and not any(
            getattr(module, "lora_variant", None) for module in model.modules() if isinstance(module, BaseTunerLayer)
        )

    def stacked_forwards(self) -> Optional[Mapping[type[nn.Module], StackedForward]]:
        """Vanilla LoRA only: peft's layer calls its ``lora_A`` and ``lora_B`` (``nn.Linear``) on the input, so
        their stacked forwards make each client's update its own. DoRA and the other variants read the factors'
        weights directly, and IA3, LoHa, LoKr and VeRA keep theirs in the layer: those train through vmap."""
        return STACKED_LAYERS if self._plain_lora else None

    def merge(
        self, model: VisionTransformer, backbone_names: list[str]
    ) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """peft's merge applied to a copy: the shared frozen weights stay as they are."""
        merged_model = copy.deepcopy(model)
        try:
            for module in merged_model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.merge(safe_merge=True, adapter_names=[ADAPTER])
        except (NotImplementedError, ValueError, AttributeError):
            return None
        state = merged_model.state_dict()
        return {name: state[name].detach().clone() for name in backbone_names}, {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in _changed_fields(self.config).items())
        freeze = ", freeze_a=True" if self.freeze_a else ""
        return f"HFPeft({type(self.config).__name__}({args}){freeze})"

    def export_args(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments, for export metadata (:mod:`fedpeft_pl.export`)."""
        spec = {"class_path": f"peft.{type(self.config).__name__}", "init_args": _changed_fields(self.config)}
        return {"config": spec, "freeze_a": self.freeze_a}


def _register_hook(module: nn.Module, public: str, private: Optional[str], hook: Any) -> None:
    # The public names exist from torch 2.5 on; the private ones cover torch 2.4.
    if hasattr(module, public):
        getattr(module, public)(hook)
    elif private == "_register_state_dict_hook":
        module._register_state_dict_hook(hook)
    else:
        module._register_load_state_dict_pre_hook(hook, with_module=True)


def _timm_names(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """``qkv.base_layer.weight`` -> ``qkv.weight``: the wrapped layer's tensors keep timm's names."""
    wrapped = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(wrapped)]:
        state_dict[prefix + key[len(wrapped) :]] = state_dict.pop(key)


def _wrapped_names(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``qkv.weight`` -> ``qkv.base_layer.weight`` while loading, so timm state dicts load."""
    loads_base_weight = False
    for name in module.get_base_layer().state_dict():
        if prefix + name in state_dict and prefix + "base_layer." + name not in state_dict:
            state_dict[prefix + "base_layer." + name] = state_dict.pop(prefix + name)
            loads_base_weight = loads_base_weight or name == "weight"
    magnitude = getattr(module, "lora_magnitude_vector", None)
    if loads_base_weight and magnitude and not any(k.startswith(prefix + "lora_magnitude_vector.") for k in state_dict):
        module._fedpeft_refresh_dora = True


@torch.no_grad()
def _refresh_dora_magnitude(module: nn.Module, incompatible_keys: Any) -> None:
    """DoRA's magnitude starts as the norm of the base weight; recompute it once pre-trained weights arrive.

    Weights load after the method is attached (:meth:`fedpeft_pl.backbone.Backbone.load_weights`), so
    the magnitude peft computed at injection is that of the random initialisation.
    """
    if not module.__dict__.pop("_fedpeft_refresh_dora", False):
        return
    for adapter, dora in module.lora_magnitude_vector.items():
        current = dora.weight
        dora.update_layer(
            base_layer=module.get_base_layer(),
            lora_A=module.lora_A[adapter].weight,
            lora_B=module.lora_B[adapter].weight,
            scaling=module.scaling[adapter],
        )
        current.copy_(dora.weight)  # keep the parameter object that optimizers and requires_grad refer to
        dora.weight = current


def _changed_fields(config: PeftConfig) -> dict[str, Any]:
    """The config's fields that differ from the class defaults, JSON-serialisable."""
    try:
        defaults = type(config)().to_dict()
    except Exception:  # a config that needs arguments to construct: show every field
        defaults = {}
    changed = {}
    for key, value in config.to_dict().items():
        if key in _BOOKKEEPING or (key in defaults and defaults[key] == value):
            continue
        changed[key] = sorted(value) if isinstance(value, set) else value
    return changed


_BOOKKEEPING = {
    "peft_type",
    "task_type",
    "revision",
    "base_model_name_or_path",
    "inference_mode",
    "peft_version",
    "auto_mapping",
}


def _config_from_dict(spec: dict[str, Any]) -> PeftConfig:
    import peft

    return getattr(peft, spec["class_path"].rsplit(".", 1)[-1])(**spec["init_args"])
