"""Every mistake a user can make here gives one line that says what is wrong, exit status 2, no traceback."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fedpeft_pl.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SHORT = [
    "--trainer.num_rounds",
    "1",
    "--trainer.clients_per_round",
    "2",
    "--trainer.local_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


def image_folder(root: Path, corrupt: bool = False) -> str:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    if corrupt:
        (root / "b" / "broken.png").write_bytes(b"\x89PNG but not really")
    return str(root)


def wrong_architecture(tmp_path: Path) -> str:
    import timm

    path = tmp_path / "wide.safetensors"
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def other_backbone_checkpoint(tmp_path: Path) -> str:
    """A real checkpoint of the quickstart task, trained on a random-init backbone instead of the shipped one."""
    save_dir = tmp_path / "other"
    main(
        [
            "fit",
            "--config",
            QUICKSTART,
            *SHORT,
            "--model.backbone.weights_file",
            "null",
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
        ]
    )
    return str(save_dir / "prompt" / "version_0" / "checkpoints" / "last.ckpt")


def yaml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "extra.yaml"
    path.write_text(text)
    return str(path)


def bad_checkpoint(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "backbone": {}}, path)
        path.write_bytes(path.read_bytes()[:600])
    else:  # a plain state dict, not a fedpeft checkpoint
        torch.save({"head.weight": torch.zeros(10, 128)}, path)
    return str(path)


def offline_download(monkeypatch):
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def base_with_syntax_error(tmp_path):
    (tmp_path / "broken_base.yaml").write_text("trainer:\n  num_rounds: [3\n")
    top = tmp_path / "top.yaml"
    top.write_text("__base__: broken_base.yaml\ntrainer:\n  local_epochs: 1\n")
    return str(top)


CASES = {
    "unknown-yaml-key": (lambda t: ["--config", yaml_file(t, "trainer:\n  num_round: 3\n")], "num_round"),
    "wrong-yaml-type": (
        lambda t: ["--config", yaml_file(t, "trainer:\n  num_rounds: three\n")],
        "trainer.num_rounds: expected int",
    ),
    "wrong-cli-type": (lambda t: ["--data.batch_size", "big"], "data.batch_size: expected int"),
    "m>N": (lambda t: ["--trainer.clients_per_round", "17"], "exceeds data.num_clients (16)"),
    "feature-cache-disk": (
        lambda t: ["--trainer.feature_cache", "disk"],
        "expected one of 'auto', 'memory', 'off', got 'disk'",
    ),
    "feature-cache-memory-prompt": (
        lambda t: ["--trainer.feature_cache", "memory"],
        "trains tensors inside the backbone; set trainer.feature_cache: auto",
    ),
    "alpha=0": (lambda t: ["--data.partition.alpha", "0"], "alpha must be > 0"),
    "alpha<0": (lambda t: ["--data.partition.alpha", "-1"], "alpha must be > 0"),
    "local-epochs=0": (lambda t: ["--trainer.local_epochs", "0"], "trainer.local_epochs must be a positive integer"),
    "rounds=0": (lambda t: ["--trainer.num_rounds", "0"], "trainer.num_rounds must be a positive integer"),
    "no-clients": (lambda t: ["--data.num_clients", "0"], "data.num_clients must be >= 1"),
    "classes": (lambda t: ["--model.num_classes", "100"], "set model.num_classes: 10"),
    "missing-data-dir": (
        lambda t: ["--data.dataset", "fedpeft_pl.data.ImageFolder", "--data.dataset.root", str(t / "resisc45")],
        "is not a directory",
    ),
    "empty-data-dir": (
        lambda t: [
            "--data.dataset",
            "fedpeft_pl.data.ImageFolder",
            "--data.dataset.root",
            str(Path(t, "empty").mkdir() or t / "empty"),
        ],
        "no class folders with images",
    ),
    "unreadable-image": (
        lambda t: [
            "--data.dataset",
            "fedpeft_pl.data.ImageFolder",
            "--data.dataset.root",
            image_folder(t / "img", corrupt=True),
            "--model.num_classes",
            "2",
            "--data.num_clients",
            "2",
        ],
        "1 unreadable image(s)",
    ),
    "peft-class-path": (
        lambda t: ["--model.peft", "fedpeft_pl.peft.Prefix"],
        "model.peft: class_path 'fedpeft_pl.peft.Prefix'",
    ),
    "hub-offline": (
        lambda t: ["--model.backbone.weights_file", "null", "--model.backbone.pretrained", "true"],
        "set model.backbone.weights_file",
    ),
    "weights-file-missing": (
        lambda t: ["--model.backbone.weights_file", str(t / "nope.safetensors")],
        "does not exist",
    ),
    "weights-file-architecture": (lambda t: ["--model.backbone.weights_file", wrong_architecture(t)], "does not fit"),
    "checkpoint-other-backbone": (
        lambda t: ["--ckpt_path", other_backbone_checkpoint(t)],
        "resume with the model.backbone settings",
    ),
    "checkpoint-missing": (lambda t: ["--ckpt_path", str(t / "gone.ckpt")], "does not exist"),
    "epoch-limits": (lambda t: ["--trainer.max_epochs", "5"], "set trainer.num_rounds"),
    "shards-k": (
        lambda t: ["--data.partition", "fedpeft_pl.data.Shards", "--data.partition.classes_per_client", "11"],
        "exceeds",
    ),
    "missing-config": (lambda t: ["--config", str(t / "nope.yaml")], "does not exist"),
    "negative-lr": (
        lambda t: ["--model.optimizer.init_args.lr", "-0.1"],
        "model.optimizer: invalid learning rate: -0.1",
    ),
    "no-gpu": (lambda t: ["--trainer.accelerator", "gpu"], "set trainer.accelerator: cpu"),
    "checkpoint-random-bytes": (lambda t: ["--ckpt_path", bad_checkpoint(t, "random")], "is not a readable checkpoint"),
    "checkpoint-truncated": (lambda t: ["--ckpt_path", bad_checkpoint(t, "truncated")], "is not a readable checkpoint"),
    "checkpoint-state-dict": (lambda t: ["--ckpt_path", bad_checkpoint(t, "plain")], "is not a fedpeft checkpoint"),
    "checkpoint-directory": (lambda t: ["--ckpt_path", str(t)], "is a directory; give a .ckpt file"),
    "not-a-vit": (
        lambda t: ["--model.backbone.name", "resnet18", "--model.backbone.weights_file", "null"],
        "'resnet18' is a ResNet, not a timm VisionTransformer",
    ),
    "convnext": (
        lambda t: ["--model.backbone.name", "convnext_atto", "--model.backbone.weights_file", "null"],
        "'convnext_atto' is a ConvNeXt, not a timm VisionTransformer",
    ),
    "fast-dev-run": (
        lambda t: ["--trainer.fast_dev_run", "true"],
        "trainer.fast_dev_run does not apply to a federated run; remove it",
    ),
    "val-check-interval": (lambda t: ["--trainer.val_check_interval", "0.5"], "set trainer.check_val_every_n_epoch"),
    "distilled-deit": (
        lambda t: ["--model.backbone.name", "deit_tiny_distilled_patch16_224", "--model.backbone.weights_file", "null"],
        "distilled",
    ),
    "img-size-not-multiple": (lambda t: ["--model.backbone.img_size", "30"], "not a multiple of the patch size 8"),
    "sampling-typo": (
        lambda t: ["--trainer.client_sampling", "poison"],
        "trainer.client_sampling: expected one of 'uniform', 'poisson', got 'poison'",
    ),
    "optimizer-typo": (
        lambda t: ["--model.optimizer", "torch.optim.SGDX"],
        "model.optimizer: expected the class path of a torch optimizer",
    ),
    "yaml-syntax": (lambda t: ["--config", yaml_file(t, "trainer:\n  num_rounds: [3\n")], "extra.yaml line 3"),
    "yaml-syntax-in-base": (
        lambda t: ["--config", base_with_syntax_error(t)],
        "broken_base.yaml line 3 (a __base__ file)",
    ),
    "prefix-key": (lambda t: ["--trainer.num_round", "3"], "--trainer.num_round 3; write each key in full"),
    "torchvision-offline": (
        lambda t: ["--data.dataset", "fedpeft_pl.data.CIFAR10", "--data.dataset.root", str(t / "cifar")],
        "could not download CIFAR-10",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_gives_one_line_and_exit_status_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    offline_download(monkeypatch)
    make_args, message = CASES[case]
    args = [
        "fit",
        "--config",
        QUICKSTART,
        *SHORT,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        *make_args(tmp_path),
    ]
    line = one_error(args, capsys)
    assert message in line, line
    assert not list((tmp_path / "runs").glob("*/version_*")), "a run that failed before round 1 left its folder"
    assert not (tmp_path / "cifar").exists(), "a failed download left its data folder"


def one_error(args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fedpeft: error:")]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "weights_only" not in err  # never point at unpickling an untrusted file
    return errors[0]


def test_an_unknown_command_names_every_command(capsys):
    line = one_error(["bogus"], capsys)
    assert "unknown command 'bogus'" in line
    assert all(command in line for command in ("fit", "comm", "export", "flower-app", "report"))


def test_bare_fit_says_to_pass_a_config(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    line = one_error(["fit"], capsys)
    assert "--config" in line and "configs/quickstart.yaml" in line


def test_export_mistakes_name_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert "export needs --ckpt_path" in one_error(["export", "--config", QUICKSTART], capsys)
    checkpoint = other_backbone_checkpoint(tmp_path)
    line = one_error(
        [
            "export",
            "--config",
            QUICKSTART,
            "--model.backbone.weights_file",
            "null",
            "--ckpt_path",
            checkpoint,
            "--output",
            str(tmp_path),
        ],
        capsys,
    )
    assert "is a directory" in line and ".safetensors" in line


def test_pretrained_without_network_fails_fast_and_once(tmp_path):
    """No HF_HUB_OFFLINE set and the hub unreachable: one line within seconds, not a minute of retry warnings.

    A fresh process: huggingface_hub reads HF_HUB_OFFLINE once, at import, and this test session set it.
    """
    import os
    import subprocess
    import sys
    import time

    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    environment.update(HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(REPO))  # nothing listens on the discard port
    started = time.perf_counter()
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("fedpeft")),
            "fit",
            "--config",
            QUICKSTART,
            *SHORT,
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--model.backbone.weights_file",
            "null",
            "--model.backbone.pretrained",
            "true",
        ],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("fedpeft: error:") and "set model.backbone.weights_file" in lines[-1], result.stderr[
        -3000:
    ]
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert seconds < 40, seconds  # the retries alone took 46 s; start-up and data set-up take about 15 s on 2 cores
    assert not list(tmp_path.glob("*/version_*"))
