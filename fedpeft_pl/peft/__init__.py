"""PEFT methods, one class each. Choose one in YAML with ``model.peft.class_path``."""

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft.adapter import Adapter
from fedpeft_pl.peft.base import (
    STACKED_LAYERS,
    PEFTMethod,
    StackedForward,
    along,
    load_trainable_state,
    local_names,
    method_spec,
    per_client,
    shared_state,
    trainable_parameters,
    trainable_state,
)
from fedpeft_pl.peft.bias import Bias
from fedpeft_pl.peft.full import Full
from fedpeft_pl.peft.head import Head
from fedpeft_pl.peft.lora import FFALoRA, FLoRA, HetLoRA, LoRA
from fedpeft_pl.peft.personal import Personalized
from fedpeft_pl.peft.prompt import Prompt
from fedpeft_pl.peft.views import PerClientViews

# The paper's methods (configs/<name>.yaml, scripts/grid.py, benchmarks): one list for every script.
METHOD_NAMES = ("head", "bias", "adapter", "prompt", "lora", "full")

__all__ = [
    "METHOD_NAMES",
    "STACKED_LAYERS",
    "Adapter",
    "Bias",
    "FFALoRA",
    "FLoRA",
    "Full",
    "HFPeft",
    "Head",
    "HetLoRA",
    "LoRA",
    "PEFTMethod",
    "PerClientViews",
    "Personalized",
    "Prompt",
    "StackedForward",
    "along",
    "load_trainable_state",
    "local_names",
    "method_spec",
    "per_client",
    "shared_state",
    "trainable_parameters",
    "trainable_state",
]


def __getattr__(name: str):
    # HFPeft imports Hugging Face peft and transformers (about a second); only runs that use it pay that
    if name == "HFPeft":
        try:
            from fedpeft_pl.peft.hf import HFPeft
        except ModuleNotFoundError as err:
            if err.name is None or err.name.split(".")[0] not in ("peft", "transformers"):
                raise
            raise ConfigError(
                "HFPeft needs Hugging Face peft, which is not installed; install it with: pip install 'fedpeft-pl[hf]'"
            ) from None
        return HFPeft
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
