from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from helpers import TINY_KWARGS, tiny_backbone
from safetensors.torch import save_file

from fedpeft_pl import ConfigError, FedPEFTModule
from fedpeft_pl.backbone import Backbone
from fedpeft_pl.peft import LoRA

REPO = Path(__file__).resolve().parents[1]


def save_tiny(path, num_classes=10, img_size=32, fmt="safetensors", **overrides):
    torch.manual_seed(1)
    kwargs = dict(TINY_KWARGS, **overrides)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=img_size, **kwargs)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return state


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_a_local_weights_file_loads_with_new_head_and_resized_position_embeddings(tmp_path, fmt):
    path = tmp_path / f"weights.{fmt}"
    saved = save_tiny(path, num_classes=10, img_size=32, fmt=fmt)
    backbone = tiny_backbone(weights_file=str(path), img_size=48)
    model = backbone.build(num_classes=5)
    backbone.load_weights(model)
    state = model.state_dict()
    torch.testing.assert_close(state["blocks.1.attn.qkv.weight"], saved["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(state["cls_token"], saved["cls_token"])
    assert state["pos_embed"].shape == (1, 1 + 12 * 12, 48)  # resized from 8x8 to 12x12 patches
    assert state["head.weight"].shape == (5, 48)


def test_a_weights_file_loads_where_timm_keeps_the_registrys_npz_loader(tmp_path, monkeypatch):
    """timm before 1.0.31 kept the registry entry's ``custom_load`` (vit_tiny's JAX .npz reader)
    for an overlaid file, and the quickstart's safetensors file failed to load there."""
    path = tmp_path / "weights.safetensors"
    saved = save_tiny(path)
    real = timm.create_model

    def older_timm(*args, pretrained_cfg_overlay=None, **kwargs):
        overlay = dict(pretrained_cfg_overlay or {})
        overlay.setdefault("custom_load", True)
        return real(*args, pretrained_cfg_overlay=overlay, **kwargs)

    monkeypatch.setattr(timm, "create_model", older_timm)
    backbone = tiny_backbone(weights_file=str(path))
    model = backbone.build(num_classes=10)
    backbone.load_weights(model)
    torch.testing.assert_close(model.state_dict()["blocks.1.attn.qkv.weight"], saved["blocks.1.attn.qkv.weight"])


def test_module_loads_weights_in_configure_model_and_keeps_peft_init(tmp_path):
    path = tmp_path / "weights.safetensors"
    saved = save_tiny(path)
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(weights_file=str(path)), LoRA(rank=2))
    lora_a = module.model.blocks[0].attn.qkv.lora_A.detach().clone()
    assert not torch.equal(module.model.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])
    module.configure_model()
    assert torch.equal(module.model.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])
    assert torch.equal(module.model.blocks[0].attn.qkv.lora_A, lora_a)


def test_a_dropped_classifier_keeps_the_head_drawn_under_the_runs_seed(tmp_path):
    # timm drops a weights file's classifier of another size and draws a new one; that draw must not
    # depend on what the RNG holds when the weights load (it did, so DDP, which re-seeds each
    # process before loading, started from another head than one process)
    path = tmp_path / "weights.safetensors"
    save_tiny(path, num_classes=7)
    heads = []
    for consumed in (0, 1000):
        torch.manual_seed(0)
        module = FedPEFTModule(10, tiny_backbone(weights_file=str(path)), LoRA(rank=2))
        head = module.model.head.weight.detach().clone()
        torch.rand(consumed)
        module.configure_model()
        assert torch.equal(module.model.head.weight, head)
        heads.append(head)
    assert torch.equal(heads[0], heads[1])


@pytest.mark.parametrize("shape", [{"depth": 3}, {"embed_dim": 64}], ids=["deeper", "wider"])
def test_a_weights_file_of_another_shape_is_refused(tmp_path, shape):
    path = tmp_path / "other.safetensors"
    save_tiny(path, **shape)
    backbone = tiny_backbone(weights_file=str(path))
    with pytest.raises(ConfigError, match="does not fit"):
        backbone.load_weights(backbone.build(10))


def test_a_weights_file_of_another_family_is_refused(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(path))
    backbone = tiny_backbone(weights_file=str(path))
    with pytest.raises(ConfigError, match="not a state dict"):
        backbone.load_weights(backbone.build(10))


def test_missing_and_unreadable_weights_files_are_config_errors(tmp_path):
    backbone = tiny_backbone(weights_file=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match="does not exist"):
        backbone.load_weights(backbone.build(10))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    backbone = tiny_backbone(weights_file=str(garbage))
    with pytest.raises(ConfigError, match="could not be read"):
        backbone.load_weights(backbone.build(10))


def test_hub_weights_without_network_name_the_local_file_option():
    backbone = tiny_backbone(pretrained=True)
    with pytest.raises(ConfigError, match="weights_file"):
        backbone.load_weights(backbone.build(10))


def test_building_never_downloads():
    model = Backbone("vit_base_patch16_224.augreg_in21k", pretrained=True).build(100)
    assert sum(p.numel() for p in model.parameters()) == 85_875_556


@pytest.mark.parametrize(
    ("name", "message"), [("vit_nonexistent_model", "no model named"), ("resnet18", "not a timm VisionTransformer")]
)
def test_unknown_or_non_vit_models_are_config_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        Backbone(name).build(10)


def test_the_shipped_weights_load_by_their_config_path_from_any_directory(tmp_path, monkeypatch):
    # the quickstart names fedpeft_pl/assets/...; run from another directory that path is the installed copy's
    monkeypatch.chdir(tmp_path)
    backbone = Backbone(
        name="vit_tiny_patch16_224",
        weights_file="fedpeft_pl/assets/vit_pico_mnist.safetensors",
        img_size=32,
        kwargs={"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4},
    )
    model = backbone.build(num_classes=10)
    backbone.load_weights(model)
    shipped = safetensors.torch.load_file(REPO / "fedpeft_pl" / "assets" / "vit_pico_mnist.safetensors")
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], shipped["blocks.0.attn.qkv.weight"])
    # a path of the user's own that does not exist is still an error that names it
    with pytest.raises(ConfigError, match=r"'fedpeft_pl/assets/missing\.safetensors' does not exist"):
        missing = Backbone(name="vit_tiny_patch16_224", weights_file="fedpeft_pl/assets/missing.safetensors")
        missing.load_weights(missing.build(num_classes=10))
