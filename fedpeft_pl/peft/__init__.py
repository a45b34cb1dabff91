"""PEFT methods, one class each. Choose one in YAML with ``model.peft.class_path``."""

from fedpeft_pl.peft.adapter import Adapter
from fedpeft_pl.peft.base import PEFTMethod, load_trainable_state, trainable_parameters, trainable_state
from fedpeft_pl.peft.bias import Bias
from fedpeft_pl.peft.full import Full
from fedpeft_pl.peft.head import Head
from fedpeft_pl.peft.hf import HFPeft
from fedpeft_pl.peft.lora import LoRA
from fedpeft_pl.peft.prompt import Prompt

__all__ = [
    "Adapter",
    "Bias",
    "Full",
    "HFPeft",
    "Head",
    "LoRA",
    "PEFTMethod",
    "Prompt",
    "load_trainable_state",
    "trainable_parameters",
    "trainable_state",
]
