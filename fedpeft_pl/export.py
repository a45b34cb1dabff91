"""Export a trained federated model as one safetensors file, for inference without fedpeft.

Methods whose trained state merges into the backbone's own tensors (Head, Bias, Full, LoRA,
and shallow prompts as timm register tokens) give a *plain timm* file::

    import json, timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open("model.safetensors", "pt") as f:
        meta = f.metadata()
    model = timm.create_model(meta["timm_name"], pretrained=False, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file("model.safetensors"))

Adapters and deep prompts add layers that plain timm does not have; their file also holds the
PEFT tensors and :func:`load_exported` rebuilds the model with fedpeft_pl.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedpeft_pl.comm import payload_bytes
from fedpeft_pl.peft import load_trainable_state, method_spec, trainable_parameters

if TYPE_CHECKING:
    from fedpeft_pl.client import FedPEFTModule

FORMAT = "fedpeft-export-1"


@dataclass(frozen=True)
class Exported:
    path: Path
    plain_timm: bool
    tensors: int
    num_bytes: int


def export_model(module: FedPEFTModule, path: Union[str, Path]) -> Exported:
    """Write ``module``'s model (its current trainable state) to ``path``; see the module docstring."""
    model = module.model
    merged = module.peft.merge(model, module.backbone_names)
    kwargs = module.backbone.create_kwargs(module.num_classes)
    if merged is not None:
        state, overrides = merged
        kwargs.update(overrides)
    else:
        state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    peft = module.peft
    metadata = {
        "format": FORMAT,
        "timm_name": module.backbone.name,
        "timm_kwargs": json.dumps(kwargs),
        "plain_timm": json.dumps(merged is not None),
        "peft": json.dumps(method_spec(peft)),
        "backbone_fingerprint": module.backbone_fingerprint,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: v.contiguous().cpu() for k, v in state.items()}, path, metadata)
    return Exported(path, merged is not None, len(state), payload_bytes(state))


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, with the file's mode what ``open`` would give it: the user's umask for a
    new file (0644 under umask 022), an earlier file's own mode when it is written over.

    safetensors (0.8) saves into a temporary file that it creates with mode 0600 and renames onto its target, so
    its file keeps 0600 whatever the umask, or the mode of a file it replaces. Here its target is a file of ours,
    created as any file is (the umask applies); its file, renamed onto ours, gets our file's mode back and is then
    renamed onto ``path``, so a killed export never leaves half a file there either.
    """
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)  # a killed export's, whose process id this one has
    handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(handle).st_mode)
    finally:
        os.close(handle)
    try:
        if path.exists():
            mode = stat.S_IMODE(path.stat().st_mode)
        save_file(tensors, str(partial), metadata=metadata)
        os.chmod(partial, mode)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def export_checkpoint(
    module: FedPEFTModule, checkpoint_path: Union[str, Path], output: Union[str, Path], weights_only: bool = True
) -> Exported:
    """Load a fedpeft checkpoint's trainable state into ``module`` and export it to ``output``."""
    module.configure_model()
    checkpoint = torch.load(str(checkpoint_path), map_location="cpu", weights_only=weights_only)
    module.on_load_checkpoint(checkpoint)
    load_trainable_state(module, {k: checkpoint["state_dict"][k] for k in trainable_parameters(module)})
    return export_model(module, output)


def load_exported(path: Union[str, Path]) -> torch.nn.Module:
    """The exported model in eval mode: plain timm where possible, else timm plus the PEFT method."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fedpeft export")
    model = timm.create_model(metadata["timm_name"], pretrained=False, **json.loads(metadata["timm_kwargs"]))
    if not json.loads(metadata["plain_timm"]):
        spec = json.loads(metadata["peft"])
        module_name, class_name = spec["class_path"].rsplit(".", 1)
        method = getattr(importlib.import_module(module_name), class_name)(**spec["init_args"])
        method.apply(model)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
