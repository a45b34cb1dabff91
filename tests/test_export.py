import json
import os
from pathlib import Path

import pytest
import timm
import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer
from safetensors import safe_open
from safetensors.torch import load_file

from fedpeft_pl.cli import main
from fedpeft_pl.export import export_model, load_exported
from fedpeft_pl.peft import Adapter, Bias, FLoRA, Full, Head, LoRA, Prompt

REPO = Path(__file__).resolve().parents[1]


def trained(peft, tmp_path):
    torch.manual_seed(0)
    module = tiny_module(peft, lr=0.05)
    datamodule = tiny_datamodule()
    tiny_trainer(tmp_path, num_rounds=1).fit(module, datamodule=datamodule)
    images, _ = next(iter(datamodule.val_dataloader()))
    return module.eval(), images[:16]


def plain_timm(path):
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    model = timm.create_model(metadata["timm_name"], pretrained=False, **json.loads(metadata["timm_kwargs"]))
    model.load_state_dict(load_file(str(path)))  # strict: every tensor has a home, none is missing
    return model.eval()


@pytest.mark.parametrize(
    "peft",
    [
        Head(),
        Bias(),
        Full(),
        LoRA(rank=2, alpha=4),
        FLoRA(rank=2, alpha=4, client_ranks={0: 1}),  # the merged update, outside the trainable state, too
        Prompt(num_tokens=3, deep=False),
    ],
    ids=["head", "bias", "full", "lora", "flora", "prompt-shallow"],
)
def test_mergeable_methods_export_to_plain_timm_with_the_same_predictions(tmp_path, peft):
    module, images = trained(peft, tmp_path)
    exported = export_model(module, tmp_path / "model.safetensors")
    assert exported.plain_timm
    with torch.no_grad():
        torch.testing.assert_close(plain_timm(exported.path)(images), module(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "peft", [Adapter(reduction_factor=4), Prompt(num_tokens=3, deep=True)], ids=["adapter", "prompt-deep"]
)
def test_other_methods_export_with_their_tensors_and_reload_through_fedpeft(tmp_path, peft):
    module, images = trained(peft, tmp_path)
    exported = export_model(module, tmp_path / "model.safetensors")
    assert not exported.plain_timm
    with torch.no_grad():
        torch.testing.assert_close(load_exported(exported.path)(images), module(images))


def test_fedpeft_export_writes_the_checkpoints_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    save_dir = str(tmp_path / "runs")
    main(
        [
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--config",
            "configs/quickstart/lora.yaml",
            "--trainer.num_rounds",
            "1",
            "--trainer.clients_per_round",
            "2",
            "--trainer.local_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            save_dir,
        ]
    )
    run = Path(save_dir) / "lora" / "version_0"
    output = tmp_path / "lora.safetensors"
    capsys.readouterr()
    main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--output", str(output)])
    said = capsys.readouterr()
    assert "plain timm" in said.out
    # export reads the checkpoint 'last' names; it resumes nothing and trains nothing
    assert said.err.strip() == f"reading the checkpoint {run / 'checkpoints' / 'last.ckpt'}", said.err
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    lora_b = checkpoint["state_dict"]["model.blocks.0.attn.qkv.lora_B"]
    assert lora_b.abs().sum() > 0
    merged = load_file(str(output))["blocks.0.attn.qkv.weight"]
    from fedpeft_pl.backbone import Backbone

    shipped = Backbone(
        "vit_tiny_patch16_224",
        weights_file="fedpeft_pl/assets/vit_pico_mnist.safetensors",
        img_size=32,
        kwargs={"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4},
    )
    reference = shipped.build(10)
    shipped.load_weights(reference)
    assert not torch.equal(merged, reference.state_dict()["blocks.0.attn.qkv.weight"]), "the LoRA update was merged"
    assert os.path.getsize(output) < 4 * 2**20


@pytest.fixture
def umask():
    """Sets the process's umask for one test, and puts the earlier one back."""
    earlier = os.umask(0o022)
    yield os.umask
    os.umask(earlier)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)], ids=["022", "027", "002"])
def test_the_exported_file_gets_the_users_umask_like_any_new_file(tmp_path, umask, mask, mode):
    module = tiny_module(Head())
    module.configure_model()
    umask(mask)
    exported = export_model(module, tmp_path / "model.safetensors")
    neighbour = tmp_path / "notes.txt"
    neighbour.write_text("a file the user writes beside it\n")
    assert oct(exported.path.stat().st_mode & 0o777) == oct(neighbour.stat().st_mode & 0o777) == oct(mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.txt"]  # no partial file left
    assert load_file(str(exported.path)).keys() == module.model.state_dict().keys()


def test_an_exported_file_written_over_keeps_its_mode(tmp_path, umask):
    module = tiny_module(Head())
    module.configure_model()
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"an earlier export")
    path.chmod(0o640)  # its owner shares it with the group only
    export_model(module, path)
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)  # neither 0600 nor the umask's 0644
    assert load_file(str(path)).keys() == module.model.state_dict().keys()
