"""Hugging Face peft methods through fedpeft_pl.peft.HFPeft on the tiny ViT."""

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import TINY_KWARGS, tiny_backbone, tiny_datamodule, tiny_module, tiny_trainer
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig
from safetensors.torch import load_file, save_file
from torch.func import functional_call

from fedpeft_pl import ConfigError, FedPEFTModule, communication_report, payload_bytes
from fedpeft_pl.backbone import fingerprint
from fedpeft_pl.cli import main
from fedpeft_pl.export import export_model
from fedpeft_pl.peft import HFPeft, trainable_parameters, trainable_state

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "lora": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["qkv"]),
    "dora": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["qkv"], use_dora=True),
    "ia3": lambda: IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"]),
    "loha": lambda: LoHaConfig(r=2, alpha=4, target_modules=["qkv"]),
    "lokr": lambda: LoKrConfig(r=2, alpha=4, target_modules=["qkv"]),
    "vera": lambda: VeraConfig(r=4, target_modules=["qkv", "fc1"]),
}
# the tensors each method adds to a targeted layer; the classifier is the only other trainable module
ADAPTER_TENSORS = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "ia3": ("ia3_l",),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
    "vera": ("vera_lambda_b", "vera_lambda_d"),
}


def plain_tiny() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, **TINY_KWARGS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_round_trains_and_sends_only_the_adapter_and_head_and_exports_merged(tmp_path, name):
    torch.manual_seed(0)
    module = tiny_module(HFPeft(CONFIGS[name]()), lr=0.05)
    trainable = set(trainable_parameters(module))
    for key in trainable:
        assert key.startswith("model.head.") or any(f".{t}.default" in key for t in ADAPTER_TENSORS[name]), key
    assert any(k.startswith("model.head.") for k in trainable)

    report = communication_report(module, clients_per_round=2, num_rounds=1)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable_parameters(module).values())
    assert report.upload_bytes == report.download_bytes == adapter_bytes == payload_bytes(trainable_state(module))

    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    datamodule = tiny_datamodule(num_clients=8, batch_size=64)
    tiny_trainer(tmp_path, num_rounds=1, clients_per_round=2).fit(module, datamodule=datamodule)
    after = module.state_dict()
    assert set(before) == set(after)
    frozen_changed = [k for k in before if k not in trainable and not torch.equal(before[k], after[k])]
    unmoved = [k for k in trainable if torch.equal(before[k], after[k])]
    assert not frozen_changed, f"frozen tensors changed: {frozen_changed}"
    assert not unmoved, f"trainable tensors did not move: {unmoved}"

    module.eval()
    exported = export_model(module, tmp_path / "model.safetensors")
    assert exported.plain_timm
    model = plain_tiny()
    model.load_state_dict(load_file(str(exported.path)))  # strict: plain timm names, nothing missing
    images, _ = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images[:16]), module(images[:16]), rtol=1e-4, atol=1e-5)
    # the merge worked on a copy: the shared frozen weights are still the pre-trained ones
    assert all(torch.equal(before[k], module.state_dict()[k]) for k in before if k not in trainable)


@pytest.mark.parametrize("name", ["lora", "dora", "vera"])
def test_pretrained_weights_load_by_timm_name_after_the_method_is_attached(tmp_path, name):
    torch.manual_seed(1)
    source = plain_tiny()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(weights_file=str(path)), HFPeft(CONFIGS[name]()))
    module.configure_model()
    state = module.model.state_dict()
    for key, tensor in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(state[key], tensor), key
    assert not any("base_layer" in key for key in state)
    assert module.backbone_fingerprint == fingerprint(source, list(source.state_dict()))
    # every method starts as the pre-trained model (DoRA's magnitude follows the loaded weights)
    source.head.load_state_dict(module.model.head.state_dict())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval()(images), source.eval()(images), rtol=1e-4, atol=1e-5)


def test_hf_peft_forward_works_under_functional_call():
    torch.manual_seed(0)
    module = tiny_module(HFPeft(CONFIGS["dora"]()))
    model = module.model.eval()
    params = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in trainable_parameters(model).items()}
    images = torch.randn(3, 3, 32, 32)
    functional = functional_call(model, params, (images,))
    with torch.no_grad():
        for name, param in trainable_parameters(model).items():
            param.copy_(params[name])
        torch.testing.assert_close(functional, model(images))


def test_fedpeft_comm_takes_a_nested_peft_config_by_class_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    overlay = tmp_path / "hf.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "peft": {
                        "class_path": "fedpeft_pl.peft.HFPeft",
                        "init_args": {
                            "config": {
                                "class_path": "peft.LoraConfig",
                                "init_args": {"r": 4, "lora_alpha": 8, "target_modules": ["qkv"]},
                            }
                        },
                    }
                }
            }
        )
    )
    main(["comm", "--config", "configs/quickstart.yaml", "--config", str(overlay)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split(None, 1)[1].startswith("HFPeft(LoraConfig(")
    # quickstart ViT: 4 blocks of embedding 128, qkv 128 -> 384; classifier 128 -> 10
    params = 4 * (4 * 128 + 384 * 4) + 128 * 10 + 10
    assert f"{params:,}" in out and f"{params * 4:,} bytes" in out


def test_export_arguments_rebuild_the_same_method():
    method = HFPeft(LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], use_dora=True), freeze_a=False)
    args = json.loads(json.dumps(method.export_args()))
    assert repr(HFPeft(**args)) == repr(method)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: HFPeft(LoraConfig(r=2, target_modules=["query"])), "target modules"),
        (lambda: HFPeft(LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"])), "modules_to_save"),
        (lambda: HFPeft(LoraConfig(r=2, target_modules=["qkv"], bias="all")), "bias"),
        (lambda: HFPeft(LoraConfig(r=2, target_modules=["qkv"], init_lora_weights="pissa")), "pissa"),
        (lambda: HFPeft(IA3Config(target_modules=["qkv"]), freeze_a=True), "LoraConfig"),
        (lambda: HFPeft({"r": 2}), "peft config"),
    ],
)
def test_bad_hf_peft_settings_are_one_line_config_errors(make, match):
    with pytest.raises(ConfigError, match=match) as info:
        tiny_module(make())
    assert "\n" not in str(info.value)


def test_a_checkpoint_holds_the_adapter_and_head_and_restores_them(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(HFPeft(CONFIGS["dora"]()))
    trainer = tiny_trainer(tmp_path, num_rounds=1, clients_per_round=1)
    trainer.fit(module, datamodule=tiny_datamodule(num_clients=8, batch_size=64))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(trainable_parameters(module))
    torch.manual_seed(0)  # the same backbone (its fingerprint is checked), the adapter at its initialisation
    restored = tiny_module(HFPeft(CONFIGS["dora"]()))
    assert any(not torch.equal(v, module.state_dict()[k]) for k, v in restored.state_dict().items())
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in restored.state_dict().items())


def test_without_hugging_face_peft_installed_hfpeft_is_a_one_line_error_naming_the_extra(monkeypatch, capsys):
    """Hugging Face peft is the ``hf`` extra: a config naming HFPeft without it says how to install it."""
    import sys

    monkeypatch.chdir(REPO)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: importing it raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "fedpeft_pl.peft.hf")
    with pytest.raises(SystemExit) as exited:
        main(["comm", "--config", "configs/quickstart.yaml", "--model.peft", "fedpeft_pl.peft.HFPeft"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'fedpeft-pl[hf]'" in err, err
