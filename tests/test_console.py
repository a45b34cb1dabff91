"""The closing summary suggests what fits the run's loggers: TensorBoard's viewer only for a TensorBoard
logger, ``fedpeft report`` only for the loggers it reads, and where the logs are for any other."""

from types import SimpleNamespace

import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from fedpeft_pl.console import summary_lines


class ElsewhereLogger(Logger):
    """A logger whose run has an id and no folder of its own, as MLFlowLogger's and WandbLogger's (neither is
    installed with the dev extra)."""

    def __init__(self, save_dir):
        super().__init__()
        self._save_dir = save_dir

    @property
    def name(self):
        return "412"

    @property
    def version(self):
        return "6e85039b"

    @property
    def save_dir(self):
        return self._save_dir

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass


def finished(folder, *loggers, checkpoint=True):
    """A trainer after 2 rounds, as the summary sees it, whose config.yaml LightningCLI wrote into ``folder`` and
    whose last checkpoint is ``folder/checkpoints/last.ckpt``."""
    for logger in loggers:
        assert logger.version is not None  # chosen at the fit's start, before its folder has files
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("trainer: {num_rounds: 2}\n")
    last = folder / "checkpoints" / "last.ckpt"
    last.parent.mkdir(exist_ok=True)
    last.write_bytes(b"")
    return SimpleNamespace(
        callback_metrics={"server/acc": torch.tensor(0.75)},
        aggregation=SimpleNamespace(cumulative_bytes=2**20),
        current_epoch=2,
        loggers=list(loggers),
        checkpoint_callback=SimpleNamespace(last_model_path=str(last) if checkpoint else ""),
        default_root_dir=str(folder),
    )


def suggested(lines):
    """The commands under ``next:``, without their comments."""
    if "next:" not in lines:
        return []
    return [line.split("#")[0].strip() for line in lines[lines.index("next:") + 1 :]]


def test_a_tensorboard_run_suggests_tensorboard_report_and_export(tmp_path):
    logger = TensorBoardLogger(save_dir=str(tmp_path / "runs"), name="prompt")
    run = tmp_path / "runs" / "prompt" / "version_0"
    lines = summary_lines(finished(run, logger), 3.0)
    assert lines[0] == "done: 2 rounds, 1.000 MiB sent, in 3.0 s; final server accuracy 0.7500"
    assert f"run folder: {run}" in lines
    assert suggested(lines) == [
        f"tensorboard --logdir {tmp_path / 'runs'}",
        f"fedpeft report {tmp_path / 'runs'} --output report",
        f"fedpeft export --config {run / 'config.yaml'} --ckpt_path last --output model.safetensors",
    ]


def test_a_csv_run_suggests_the_report_and_no_tensorboard(tmp_path):
    logger = CSVLogger(save_dir=str(tmp_path / "runs"), name="prompt")
    run = tmp_path / "runs" / "prompt" / "version_0"
    lines = summary_lines(finished(run, logger), 3.0)
    assert f"run folder: {run}" in lines
    assert not any("tensorboard" in line for line in lines), lines
    assert suggested(lines) == [
        f"fedpeft report {tmp_path / 'runs'} --output report",
        f"fedpeft export --config {run / 'config.yaml'} --ckpt_path last --output model.safetensors",
    ]


def test_another_loggers_run_says_where_its_logs_are_and_names_its_checkpoint(tmp_path):
    store = tmp_path / "mlruns"
    lines = summary_lines(finished(store, ElsewhereLogger(str(store))), 3.0)
    assert f"logs: ElsewhereLogger (name 412, version 6e85039b) in {store}" in lines
    assert not any("tensorboard" in line or "fedpeft report" in line or "run folder" in line for line in lines)
    # 'last' looks in a TensorBoard or CSV logger's folder only: this run's checkpoint goes by its path
    assert suggested(lines) == [
        f"fedpeft export --config {store / 'config.yaml'} --ckpt_path {store / 'checkpoints' / 'last.ckpt'} "
        "--output model.safetensors"
    ]


def test_two_loggers_of_one_run_get_one_report(tmp_path):
    board = TensorBoardLogger(save_dir=str(tmp_path / "runs"), name="prompt")
    table = CSVLogger(save_dir=str(tmp_path / "csv"), name="prompt")
    lines = summary_lines(finished(tmp_path / "runs" / "prompt" / "version_0", board, table), 3.0)
    commands = [command.split()[:2] for command in suggested(lines)]
    assert commands == [["tensorboard", "--logdir"], ["fedpeft", "report"], ["fedpeft", "export"]]


def test_without_a_written_config_or_a_last_checkpoint_no_export_is_suggested(tmp_path):
    run = tmp_path / "runs" / "prompt" / "version_0"
    logger = CSVLogger(save_dir=str(tmp_path / "runs"), name="prompt")
    no_checkpoint = summary_lines(finished(run, logger, checkpoint=False), 3.0)
    assert [command.split()[1] for command in suggested(no_checkpoint)] == ["report"]
    trainer = finished(run, logger)
    (run / "config.yaml").unlink()  # the trainer was built in Python, not by LightningCLI
    no_config = summary_lines(trainer, 3.0)
    assert [command.split()[1] for command in suggested(no_config)] == ["report"]
