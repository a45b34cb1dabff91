"""The ``fedpeft`` command as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedpeft_pl.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SHORT = ["--trainer.num_rounds", "2", "--trainer.clients_per_round", "3", "--trainer.local_epochs", "1"]


def fedpeft(*args, cwd=REPO, env=None):
    """Run the installed console script."""
    script = Path(sys.executable).with_name("fedpeft")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([str(script), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow  # processes: whole fits through the console script
def test_fit_through_the_console_script_leaves_tensorboard_logs(tmp_path):
    result = fedpeft(
        "fit",
        "--config",
        QUICKSTART,
        *SHORT,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 2/2 | server acc" in result.stderr
    run = tmp_path / "prompt" / "version_0"
    logged = scalars(run)
    for tag in (
        "comm/bytes_down",
        "comm/bytes_up",
        "comm/cumulative_bytes",
        "server/acc",
        "server/loss",
        "train/loss",
        "server/acc_vs_cumulative_bytes",
    ):
        assert tag in logged, tag
    assert [step for step, _ in logged["server/acc"]] == [1, 2]
    # Prompt: 4 blocks x 10 tokens x 128 dims + a 128x10 head with bias, fp32, 3 clients a round
    client_bytes = (4 * 10 * 128 + 128 * 10 + 10) * 4
    assert [v for _, v in logged["comm/bytes_up"]] == [3 * client_bytes] * 2
    assert [v for _, v in logged["comm/bytes_down"]] == [3 * client_bytes] * 2
    assert [v for _, v in logged["comm/cumulative_bytes"]] == [6 * client_bytes, 12 * client_bytes]
    assert [s for s, _ in logged["server/acc_vs_cumulative_bytes"]] == [6 * client_bytes, 12 * client_bytes]
    assert all(0.0 <= v <= 1.0 for _, v in logged["server/acc"])
    histogram = (run / "client_label_histogram.csv").read_text().splitlines()
    assert len(histogram) == 1 + 16 and histogram[0].startswith("class_0,")
    assert sum(int(n) for line in histogram[1:] for n in line.split(",")) == 1437
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert sorted(checkpoint["state_dict"]) == sorted(
        [f"model.blocks.{i}.prompt.tokens" for i in range(4)] + ["model.head.weight", "model.head.bias"]
    )


def test_comm_prints_the_papers_figures_without_downloading():
    result = fedpeft("comm", "--config", str(REPO / "configs" / "bias.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "179,812" in result.stdout
    assert "719,248 bytes (0.686 MiB)" in result.stdout
    assert "343,502,224 bytes (327.589 MiB)" in result.stdout


def test_the_console_script_exits_2_on_a_mistake(tmp_path):
    result = fedpeft("fit", "--config", QUICKSTART, "--trainer.clients_per_round", "99")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fedpeft: error: trainer.clients_per_round (99)")
    assert "Traceback" not in result.stderr


def test_a_users_own_peft_class_plugs_in_by_class_path(capsys, monkeypatch, tmp_path):
    (tmp_path / "my_peft.py").write_text(
        "from fedpeft_pl.peft import PEFTMethod\n\n"
        "class NormOnly(PEFTMethod):\n"
        "    def attach(self, model):\n"
        "        for name, param in model.named_parameters():\n"
        "            if 'norm' in name:\n"
        "                param.requires_grad_(True)\n"
        "        self.train_head(model)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(REPO)
    main(["comm", "--config", QUICKSTART, "--model.peft", "my_peft.NormOnly"])
    # 4 blocks x 2 LayerNorms + the final norm, each 128 weights + 128 biases; head 128x10 + 10
    assert f"{(4 * 2 + 1) * 256 + 1290:,}" in capsys.readouterr().out
    main(
        [
            "fit",
            "--config",
            QUICKSTART,
            "--model.peft",
            "my_peft.NormOnly",
            *SHORT,
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    config = yaml.safe_load((tmp_path / "prompt" / "version_0" / "config.yaml").read_text())
    assert config["model"]["peft"]["class_path"] == "my_peft.NormOnly"
