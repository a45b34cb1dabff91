"""PEFT methods, one class each. Choose one in YAML with ``model.peft.class_path``."""

from fedpeft_pl.peft.adapter import Adapter
from fedpeft_pl.peft.base import (
    PEFTMethod,
    load_trainable_state,
    local_names,
    shared_state,
    trainable_parameters,
    trainable_state,
)
from fedpeft_pl.peft.bias import Bias
from fedpeft_pl.peft.full import Full
from fedpeft_pl.peft.head import Head
from fedpeft_pl.peft.lora import LoRA
from fedpeft_pl.peft.personal import Personalized
from fedpeft_pl.peft.prompt import Prompt

__all__ = [
    "Adapter",
    "Bias",
    "Full",
    "Head",
    "LoRA",
    "PEFTMethod",
    "Personalized",
    "Prompt",
    "load_trainable_state",
    "local_names",
    "shared_state",
    "trainable_parameters",
    "trainable_state",
]
