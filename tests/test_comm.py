from pathlib import Path

import pytest
import torch
import yaml

from fedpeft_pl import Backbone, FedPEFTModule, communication_report, payload_bytes, yaml_include
from fedpeft_pl.cli import main
from fedpeft_pl.peft import Bias, Full, Prompt

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ["head", "bias", "adapter", "prompt", "lora", "full"]


def test_payload_bytes_counts_elements_times_dtype_size():
    payload = {
        "fp32": torch.zeros(10, dtype=torch.float32),
        "fp16": torch.zeros(3, 4, dtype=torch.float16),
        "int8": torch.zeros(7, dtype=torch.int8),
        "fp64": torch.zeros(2, dtype=torch.float64),
    }
    assert payload_bytes(payload) == 10 * 4 + 12 * 2 + 7 * 1 + 2 * 8


def vit_b16_report(peft):
    module = FedPEFTModule(100, Backbone("vit_base_patch16_224.augreg_in21k", pretrained=True), peft)
    return communication_report(module, clients_per_round=8, num_rounds=50)


def test_the_papers_vit_b16_communication_figures():
    bias = vit_b16_report(Bias())
    assert bias.trainable_params == 179_812
    assert bias.download_bytes == bias.upload_bytes == 179_812 * 4
    assert round(bias.upload_bytes / 2**20, 3) == 0.686
    assert bias.full_client_bytes == 85_875_556 * 4
    assert round(bias.full_client_bytes / 2**20, 1) == 327.6
    assert bias.round_bytes == 2 * 8 * bias.upload_bytes
    assert bias.run_bytes == 50 * bias.round_bytes
    assert bias.ratio_to_full == pytest.approx(85_875_556 / 179_812)
    assert vit_b16_report(Full()).ratio_to_full == 1.0
    assert vit_b16_report(Prompt(num_tokens=10, deep=True)).upload_bytes == 169_060 * 4


def load(name):
    return yaml_include.load_file(REPO / "configs" / f"{name}.yaml")


def test_the_paper_configs_differ_only_in_method_learning_rate_and_run_name():
    configs = {name: load(name) for name in PAPER_CONFIGS}
    lrs = {name: c["model"]["optimizer"]["init_args"]["lr"] for name, c in configs.items()}
    assert lrs == {"head": 0.005, "bias": 0.01, "adapter": 0.005, "prompt": 0.01, "lora": 0.01, "full": 0.001}
    shared = []
    for name, config in configs.items():
        config["model"].pop("peft")
        config["model"]["optimizer"]["init_args"].pop("lr")
        assert config["trainer"]["logger"]["init_args"].pop("name") == name
        shared.append(config)
    assert all(config == shared[0] for config in shared)
    paper = shared[0]
    assert paper["trainer"]["num_rounds"] == 50 and paper["trainer"]["clients_per_round"] == 8
    assert paper["trainer"]["local_epochs"] == 10  # the paper's code: --epochs 10
    assert paper["data"]["num_clients"] == 64 and paper["data"]["batch_size"] == 64
    assert paper["data"]["partition"] == {
        "class_path": "fedpeft_pl.data.Dirichlet",
        "init_args": {"alpha": 0.1, "min_samples": 10},
    }
    assert paper["model"]["backbone"] == {
        "name": "vit_base_patch16_224.augreg_in21k",
        "pretrained": True,
        "img_size": 224,
    }
    assert paper["model"]["optimizer"]["init_args"] == {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0001}


@pytest.mark.parametrize(
    ("name", "params"),
    [("head", 76_900), ("bias", 179_812), ("prompt", 169_060), ("full", 85_875_556)],
)
def test_comm_on_the_paper_configs(capsys, name, params):
    main(["comm", "--config", str(REPO / "configs" / f"{name}.yaml")])
    out = capsys.readouterr().out
    assert "trainable parameters" in out and f"{params:,}" in out
    assert f"{params * 4:,} bytes" in out
    assert f"{2 * 8 * params * 4:,} bytes" in out
    data = next(line for line in out.splitlines() if line.startswith("data "))  # named, not loaded
    assert "CIFAR100(" in data and "64 clients split by Dirichlet(alpha=0.1" in data, data


@pytest.mark.parametrize("method", ["head", "bias", "adapter", "prompt", "lora"])
def test_each_quickstart_overlay_selects_its_method_and_sends_30x_less_than_full(capsys, monkeypatch, method):
    monkeypatch.chdir(REPO)
    overlay = yaml.safe_load((REPO / "configs" / "quickstart" / f"{method}.yaml").read_text())
    main(["comm", "--config", "configs/quickstart.yaml", "--config", f"configs/quickstart/{method}.yaml"])
    out = capsys.readouterr().out
    class_name = overlay["model"]["peft"]["class_path"].rsplit(".", 1)[-1]
    method_line = out.splitlines()[0]
    assert method_line.split(None, 1)[1].startswith(f"{class_name}(")
    ratio = float(out.split("1/")[1].split()[0].replace(",", ""))
    assert ratio >= 30


BEYOND = sorted(
    str(p.relative_to(REPO))
    for sub in ("personal", "beyond")
    for p in (REPO / "configs" / "quickstart" / sub).glob("*.yaml")
)


@pytest.mark.parametrize("overlay", BEYOND)
def test_each_beyond_fedpeft_overlay_composes_and_counts_only_what_travels(capsys, monkeypatch, tmp_path, overlay):
    from fedpeft_pl.config import build_run, resolve_config
    from fedpeft_pl.peft import shared_state, trainable_state

    monkeypatch.chdir(REPO)
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    main(["comm", "--config", quickstart, "--config", overlay])
    out = capsys.readouterr().out
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(resolve_config(["--config", quickstart, "--config", overlay, "--trainer.logger", "false"]))
    _, module, datamodule, _ = build_run(resolved, save_config=False)
    sent = payload_bytes(shared_state(module))
    if module.peft.per_client_views:  # heterogeneous ranks: each client at its own, the mean reported
        clients = range(datamodule.num_clients)
        sent = round(
            sum(payload_bytes(module.peft.client_view(shared_state(module), c, 1, upload=True)) for c in clients)
            / len(clients)
        )
        assert sent < payload_bytes(shared_state(module))
        line = next(
            line for line in out.splitlines() if line.startswith(("per client per direction", "per client, upload"))
        )
    else:
        line = next(line for line in out.splitlines() if line.startswith("per client per direction"))
    assert line.split()[-4] == f"{sent:,}"  # "... 20,480 bytes (0.020 MiB)"
    if "personal" in overlay:
        assert module.local_names and sent < payload_bytes(trainable_state(module))
        assert "personalised: they stay on each client" in out


PRIVATE_OVERLAYS = {
    "local": {"trainer": {"privacy": {"class_path": "fedpeft_pl.privacy.LocalDP", "init_args": {"epsilon": 8.0}}}},
    "central": {
        "trainer": {
            "client_sampling": "poisson",
            "aggregation": {"class_path": "fedpeft_pl.privacy.DPFedAvg", "init_args": {"epsilon": 8.0}},
        }
    },
}


@pytest.mark.parametrize("kind", sorted(PRIVATE_OVERLAYS))
def test_comm_prints_that_a_run_with_reproducible_noise_is_not_private(capsys, monkeypatch, tmp_path, kind):
    monkeypatch.chdir(REPO)
    outputs = {}
    for reproducible in (False, True):
        overlay = yaml.safe_load(yaml.safe_dump(PRIVATE_OVERLAYS[kind]))
        component = overlay["trainer"]["privacy" if kind == "local" else "aggregation"]
        component["init_args"]["reproducible_noise"] = reproducible
        path = tmp_path / f"{kind}-{reproducible}.yaml"
        path.write_text(yaml.safe_dump(overlay))
        main(
            [
                "comm",
                "--config",
                "configs/quickstart.yaml",
                "--config",
                "configs/quickstart/prompt.yaml",
                "--config",
                str(path),
            ]
        )
        outputs[reproducible] = capsys.readouterr().out
    assert "NOT private" in outputs[True]
    assert "NOT private" not in outputs[False]


def test_comms_lightning_free_classes_take_the_arguments_of_the_lightning_ones():
    """``fedpeft comm`` parses ``model``, ``data`` and ``trainer`` with Lightning-free stand-ins
    (fedpeft_pl.comm_command): each takes exactly the arguments, types and defaults of its Lightning class."""
    import inspect

    from lightning.pytorch import Trainer

    from fedpeft_pl.comm_command import LIGHTNING_TRAINER_DEFAULTS, CommTrainer
    from fedpeft_pl.data import FederatedDataModule
    from fedpeft_pl.data.spec import FederatedData
    from fedpeft_pl.peft_model import PEFTModel
    from fedpeft_pl.trainer import FederatedTrainer

    def parameters(function):
        return [(p.name, p.default, p.annotation) for p in inspect.signature(function).parameters.values()]

    assert parameters(PEFTModel.__init__) == parameters(FedPEFTModule.__init__)
    assert parameters(FederatedData.__init__) == parameters(FederatedDataModule.__init__)
    ours = {name: (default, annotation) for name, default, annotation in parameters(CommTrainer.__init__)}
    theirs = {name: (default, annotation) for name, default, annotation in parameters(FederatedTrainer.__init__)}
    assert theirs.pop("kwargs")[1] == "Any"
    for name in ("privacy", "callbacks"):  # Lightning callbacks: taken as given, never built
        assert ours.pop(name)[0] is theirs.pop(name)[0] is None
    assert ours == theirs
    lightning = {p.name: p.default for p in inspect.signature(Trainer.__init__).parameters.values()}
    assert {k: v for k, v in lightning.items() if k not in ("self", *theirs, "callbacks")} == LIGHTNING_TRAINER_DEFAULTS


def test_comms_parser_has_every_key_and_default_of_the_lightning_cli(monkeypatch):
    from fedpeft_pl.comm_command import comm_parser
    from fedpeft_pl.config import FedPEFTCLI

    monkeypatch.chdir(REPO)
    cli = FedPEFTCLI(args=["--config", "configs/quickstart.yaml"], run=False)

    def keys(parser):
        return {
            a.dest: a.default
            for a in parser._actions
            if a.dest.split(".")[0] in ("trainer", "model", "data", "seed_everything") and not a.dest.endswith(".help")
        }

    assert keys(comm_parser()) == keys(cli.parser)


COMM_CASES = [
    ["--config", "configs/quickstart.yaml"],
    ["--config", "configs/prompt.yaml", "--trainer.client_sampling", "poisson"],
    ["--config", "configs/quickstart.yaml", "--config", "configs/quickstart/clock.yaml"],
    ["--config", "configs/quickstart.yaml", "--config", "configs/quickstart/fedbuff.yaml"],
    ["--config", "configs/paper.yaml", "--config", "configs/experiments/dp/central.yaml"],
    # a second file that names only the logger's arguments: merged over the first file's logger class
    ["--config", "configs/quickstart.yaml", "--config", "configs/quickstart/personal/fedrep.yaml"],
]


@pytest.mark.parametrize("args", COMM_CASES)
def test_comm_without_lightning_prints_what_the_lightning_cli_prints(capsys, monkeypatch, args):
    from fedpeft_pl.comm_command import run
    from fedpeft_pl.config import FedPEFTCLI

    monkeypatch.chdir(REPO)
    assert run(args)
    ours = capsys.readouterr()
    FedPEFTCLI(args=["comm", *args])
    theirs = capsys.readouterr()
    assert ours.out == theirs.out and "per client per direction" in ours.out


@pytest.mark.parametrize(
    "extra",
    [
        ["--trainer.accelerator", "cpu", "--trainer.devices", "2"],  # several processes: Lightning's to launch
        ["--trainer.precision", "16-mixed"],  # Lightning turns it into bf16-mixed on a CPU, with a warning
        ["--trainer.num_round", "3"],  # a mistake: the LightningCLI says what is wrong
        ["--trainer.devices", "foo"],
        ["--trainer.logger", "false"],  # the logger given on the command line
        ["--config", "configs/quickstart/lora.yaml", "--trainer.logger.init_args.version", "3"],
        ["--config", "configs/quickstart/dp/local-eps8.yaml"],  # local DP: a Lightning callback
        ["--help"],
    ],
)
def test_comm_leaves_to_lightning_what_only_lightning_does_exactly(capsys, monkeypatch, extra):
    from fedpeft_pl.comm_command import run

    monkeypatch.chdir(REPO)
    assert not run(["--config", "configs/quickstart.yaml", *extra])
    assert capsys.readouterr() == ("", "")


def test_the_optimizers_type_is_lightnings():
    """Its parser errors name it, and the one-line condenser (fedpeft_pl.config.one_line) reads them."""
    from lightning.pytorch.cli import OptimizerCallable

    from fedpeft_pl.peft_model import OptimizerCallable as Ours

    assert Ours == OptimizerCallable and str(Ours) == str(OptimizerCallable)


def test_comm_on_a_machine_with_a_gpu_goes_through_lightning(capsys, monkeypatch):
    """There Lightning chooses the device, and says on stderr when a config leaves the GPU unused."""
    from fedpeft_pl.comm_command import run

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not run(["--config", "configs/quickstart.yaml"])
    assert capsys.readouterr() == ("", "")
