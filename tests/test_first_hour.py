"""What a new user meets in the first hour: a quiet console, a run folder nothing spoils, help that
speaks fedpeft, a report of the runs, and round metrics that Lightning callbacks can watch."""

import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import tiny_datamodule, tiny_module, tiny_trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from fedpeft_pl.cli import main
from fedpeft_pl.peft import Prompt

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
ONE_ROUND = ["--trainer.num_rounds", "1", "--trainer.clients_per_round", "2", "--trainer.local_epochs", "1"]


def fedpeft(*args, cwd=REPO):
    script = Path(sys.executable).with_name("fedpeft")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([str(script), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


# fedpeft's main as on README's own install (pip install -e ., no extras): matplotlib neither imports nor is
# found by its metadata (torchmetrics asks the metadata, then imports it)
WITHOUT_MATPLOTLIB = """
import importlib.metadata, sys
sys.modules["matplotlib"] = None
installed = importlib.metadata.version
def version(name):
    if name.lower() == "matplotlib":
        raise importlib.metadata.PackageNotFoundError(name)
    return installed(name)
importlib.metadata.version = version
from fedpeft_pl.cli import main
main()
"""


def run_as_suggested(command: str, cwd: Path) -> None:
    """Run a command the closing summary suggests, as written, where the run was started."""
    args = shlex.split(command)
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    if args[0] == "fedpeft":
        done = subprocess.run(
            [sys.executable, "-c", WITHOUT_MATPLOTLIB, *args[1:]],
            cwd=cwd,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (command, done.stderr[-3000:])
        return
    assert args[0] == "tensorboard", command
    # a server runs until stopped: it counts as working once it serves the run's curves
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("tensorboard")), *args[1:]],
        cwd=cwd,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        said = ""
        while "http://" not in said and server.poll() is None:
            said += server.stderr.readline()
        address = re.search(r"http://\S+?/", said)
        assert address, (command, said[-3000:])
        for _ in range(120):
            tags = urllib.request.urlopen(address.group(0) + "data/plugin/scalars/tags", timeout=30).read().decode()
            if "server/acc" in tags:
                break
            time.sleep(1)  # it reads the logs after it starts serving
        assert "server/acc" in tags, tags
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow  # a quickstart run, then every command its summary suggests
def test_the_quickstart_redirected_to_a_file_is_short_whole_and_ends_in_a_summary_whose_commands_work(tmp_path):
    log = tmp_path / "out.log"
    script = Path(sys.executable).with_name("fedpeft")
    with open(log, "w") as out:  # one file for both streams, as `nohup fedpeft fit ... > out.log 2>&1` gives
        done = subprocess.run(
            [
                str(script),
                "fit",
                "--config",
                QUICKSTART,
                "--trainer.num_rounds",
                "2",
                "--trainer.local_epochs",
                "1",
                "--trainer.clients_per_round",
                "3",
                # from a folder of the user's own, where the run folder is the quickstart's runs/quickstart
                "--model.backbone.weights_file",
                str(REPO / "fedpeft_pl" / "assets" / "vit_pico_mnist.safetensors"),
            ],
            cwd=tmp_path,
            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert len(text.encode()) < 3000, text
    for noise in (
        "Seed set",
        "GPU available",
        "TPU available",
        "Tip",
        "FLOPs",
        "Validation DataLoader",
        "it/s",
        "\r",
        "site-packages",
    ):
        assert noise not in text, noise
    lines = text.splitlines()
    assert lines[0].startswith("data: Digits")
    assert any(line.startswith("method: Prompt") and "sends" in line for line in lines)
    rounds = [line for line in lines if "round " in line and "/2" in line and "MiB" in line]
    assert len(rounds) == 2
    for number, line in enumerate(rounds, 1):
        assert re.fullmatch(
            rf"round {number}/2 \| server acc [0-9.]+ loss [0-9.]+ \| train loss [0-9.]+ \| sent .* MiB\) \| [0-9.]+ s",
            line,
        ), line
    run = tmp_path / "runs" / "quickstart" / "prompt" / "version_0"
    summary = "\n".join(lines[lines.index(rounds[-1]) + 1 :])
    assert re.search(r"final server accuracy [0-9.]+", summary), summary
    assert re.search(r"[0-9.]+ MiB sent", summary) and re.search(r"in [0-9.]+ s", summary), summary
    assert "run folder: runs/quickstart/prompt/version_0" in summary
    # README's own next steps, as the summary words them, each working as written
    suggested = [line.split("#")[0].strip() for line in lines[lines.index("next:") + 1 :] if line.startswith("  ")]
    assert [command.split()[:2] for command in suggested] == [
        ["tensorboard", "--logdir"],
        ["fedpeft", "report"],
        ["fedpeft", "export"],
    ]
    assert suggested[0] == "tensorboard --logdir runs/quickstart" and "fedpeft report runs/quickstart" in summary
    for command in suggested:
        run_as_suggested(command, tmp_path)
    assert "| Prompt |" in (tmp_path / "report" / "report.md").read_text()
    assert not list((tmp_path / "report").glob("*.png"))  # no matplotlib, no figures
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt", "round=2.ckpt"]


@pytest.mark.slow  # processes: the console script
def test_comm_prints_only_its_report_and_verbose_brings_lightning_back():
    quiet = fedpeft("comm", "--config", str(REPO / "configs" / "bias.yaml"))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stderr.strip() == "", quiet.stderr
    assert "bytes" in quiet.stdout and "Seed set" not in quiet.stdout
    verbose = fedpeft("comm", "--config", str(REPO / "configs" / "bias.yaml"), "--verbose")
    assert verbose.returncode == 0
    assert "Seed set to 0" in verbose.stderr + verbose.stdout


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_refused_resume_leaves_the_earlier_run_byte_identical(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    runs = tmp_path / "runs"
    main(
        [
            "fit",
            "--config",
            QUICKSTART,
            *ONE_ROUND,
            "--trainer.logger.init_args.save_dir",
            str(runs),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    before = tree_hashes(runs)
    other_method = ["--config", "configs/quickstart/bias.yaml", "--trainer.logger.init_args.name", "prompt"]
    last = runs / "prompt" / "version_0" / "checkpoints" / "last.ckpt"
    changes = [  # (what changes, the checkpoint, what the one line names)
        (other_method, "last", "trainable tensors of Bias()"),
        (other_method, str(last), "trainable tensors of Bias()"),
        (
            ["--trainer.aggregation", "fedpeft_pl.strategies.Scaffold"],
            "last",
            "trainer.aggregation FedAvg, this run has Scaffold",
        ),
        (
            ["--trainer.compress_upload", "fedpeft_pl.compression.Int8"],
            "last",
            "trainer.compress_upload none, this run has Int8",
        ),
        (["--trainer.privacy", "fedpeft_pl.privacy.LocalDP"], "last", "written without local DP"),
    ]
    for change, ckpt, named in changes:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "fit",
                    "--config",
                    QUICKSTART,
                    *change,
                    *ONE_ROUND,
                    "--trainer.num_rounds",
                    "2",
                    "--trainer.logger.init_args.save_dir",
                    str(runs),
                    "--ckpt_path",
                    ckpt,
                ]
            )
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "resume with the configuration that wrote it" in err and named in err, err[-2000:]
        assert tree_hashes(runs) == before, (change, ckpt)
    # and README's export of that run still works
    main(
        [
            "export",
            "--config",
            str(runs / "prompt" / "version_0" / "config.yaml"),
            "--ckpt_path",
            "last",
            "--output",
            str(tmp_path / "model.safetensors"),
        ]
    )
    assert (tmp_path / "model.safetensors").stat().st_size > 0


def test_the_progress_bar_writes_to_standard_error_not_standard_output(capsys):
    """fedpeft fit ... > out.txt: standard output gets no bar text; the bar is with the round lines on stderr."""
    from fedpeft_pl.progress import FederatedProgressBar

    bar = FederatedProgressBar().init_train_tqdm()
    bar.reset(total=3)
    bar.set_description("Round 1/2")
    bar.update(2)
    bar.refresh()
    bar.close()
    captured = capsys.readouterr()
    assert "Round 1/2" in captured.err and captured.out == ""


def test_round_metrics_reach_lightning_callbacks(tmp_path):
    """comm/* and round/* are in callback_metrics, so EarlyStopping and a monitoring ModelCheckpoint can watch them."""
    stop = EarlyStopping(
        monitor="comm/cumulative_bytes", mode="max", stopping_threshold=1.0, check_on_train_epoch_end=True
    )
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="round/clients_aggregated", mode="max", filename="best")
    trainer = tiny_trainer(tmp_path, num_rounds=3, enable_checkpointing=True, callbacks=[stop, best])
    trainer.fit(tiny_module(Prompt(num_tokens=2)), datamodule=tiny_datamodule())
    assert trainer.current_epoch == 1, "EarlyStopping on comm/cumulative_bytes stops after round 1"
    assert trainer.callback_metrics["round/clients_aggregated"] == 2
    assert trainer.callback_metrics["comm/bytes_up"] > 0
    assert best.best_model_score == 2 and Path(best.best_model_path).name == "best.ckpt"


def test_top_level_help_speaks_fedpeft(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "federated" in text.lower() and "Lightning Trainer command line tool" not in text
    for command in ("fit", "comm", "export", "flower-app", "report"):
        assert re.search(rf"^\s+{command}\s+\S", text, re.MULTILINE), command
    for gone in ("validate", "predict"):
        assert not re.search(rf"^\s+{gone}\s", text, re.MULTILINE), gone


def test_fit_help_is_plain_text_and_hides_epoch_limits(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and not re.search(r":\w+:\s*`", text), re.findall(r".{40}:\w+:\s*`.{20}", text)
    for hidden in (
        "--trainer.max_epochs",
        "--trainer.max_steps",
        "--trainer.min_epochs",
        "--trainer.min_steps",
        "--trainer.fast_dev_run",
        "--trainer.limit_train_batches",
        "--trainer.val_check_interval",
    ):
        assert hidden not in text, hidden
    summary = text[text.index("\n  --trainer.enable_model_summary") :][:300]
    assert "--verbose" in summary, summary  # what fedpeft does, not Lightning's default
    ckpt = text[text.index("\n  --ckpt_path") :][:400]
    assert "last" in ckpt, ckpt


@pytest.mark.parametrize("verbose", [False, True])
def test_lightnings_advice_on_loader_workers_stays_off_the_quiet_console(tmp_path, monkeypatch, verbose):
    """On a many-core machine Lightning advises more workers for the evaluation loader; only --verbose shows it."""
    import warnings

    import lightning.fabric.utilities.data

    from fedpeft_pl.config import configure_logging

    monkeypatch.setattr(lightning.fabric.utilities.data, "_num_cpus_available", lambda: 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_logging(verbose)
        tiny_trainer(tmp_path).fit(tiny_module(Prompt(num_tokens=2)), datamodule=tiny_datamodule())
    advice = [str(w.message) for w in caught if "does not have many workers" in str(w.message)]
    assert bool(advice) == verbose, advice
