"""Crash and resume, failing clients, small self-identifying checkpoints."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_backbone, tiny_datamodule, tiny_module, tiny_trainer
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedpeft_pl import ConfigError, FedAvg, FederatedCallback, FedPEFTModule
from fedpeft_pl.peft import Prompt, trainable_state

REPO = Path(__file__).resolve().parents[1]
QUICK = [
    "--config",
    "configs/quickstart.yaml",
    "--trainer.num_rounds",
    "4",
    "--trainer.clients_per_round",
    "3",
    "--trainer.local_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]

KILLER = '''
import os, signal
from lightning.pytorch.callbacks import Callback

class KillAt(Callback):
    """SIGKILL this process at a batch in the middle of a round."""

    def __init__(self, server_round: int, batch: int):
        self.server_round, self.batch, self.seen = server_round, batch, 0

    def on_train_batch_end(self, trainer, *args):
        if trainer.current_epoch + 1 == self.server_round:
            self.seen += 1
            if self.seen == self.batch:
                os.kill(os.getpid(), signal.SIGKILL)
'''


def fedpeft(*args, env=None):
    script = Path(sys.executable).with_name("fedpeft")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([str(script), *args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


def logged(run_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: {e.step: e.value for e in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
        if tag != "round/seconds"
    }


@pytest.mark.slow  # processes: whole fits through the console script
def test_a_run_killed_mid_round_resumes_to_the_same_result(tmp_path):
    # the killer's per-batch hook runs only in Lightning's loop (the sequential runner), so every
    # run of this comparison trains there: bit-identical results need the same runner
    quick = [*QUICK, "--trainer.client_runner", "sequential"]
    straight = fedpeft("fit", *quick, "--trainer.logger.init_args.save_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    (tmp_path / "killer.py").write_text(KILLER)
    (tmp_path / "kill.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: killer.KillAt\n      init_args: {server_round: 3, batch: 4}\n"
    )
    crash_dir = str(tmp_path / "crash")
    crashed = fedpeft(
        "fit",
        *quick,
        "--config",
        str(tmp_path / "kill.yaml"),
        "--trainer.logger.init_args.save_dir",
        crash_dir,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert "round 2/4" in crashed.stderr and "round 3/4" not in crashed.stderr

    resumed = fedpeft("fit", *quick, "--trainer.logger.init_args.save_dir", crash_dir, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "round 1/4" not in resumed.stderr and "round 3/4" in resumed.stderr

    run = Path(crash_dir) / "prompt" / "version_0"
    assert not (Path(crash_dir) / "prompt" / "version_1").exists(), "the resumed run must log into the same version"
    reference = Path(tmp_path / "straight" / "prompt" / "version_0")
    final, expected = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (run, reference))
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    assert all(torch.equal(final["state_dict"][k], expected["state_dict"][k]) for k in expected["state_dict"])
    assert logged(run) == logged(reference)
    assert sorted(logged(run)["server/acc"]) == [1, 2, 3, 4]


def test_checkpoints_are_small_load_weights_only_and_name_their_backbone(tmp_path):
    module = tiny_module(Prompt(num_tokens=2))
    trainer = tiny_trainer(tmp_path, num_rounds=1, enable_checkpointing=True)
    trainer.fit(module, datamodule=tiny_datamodule())
    checkpoint = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(trainable_state(module))
    assert checkpoint["optimizer_states"] == []
    assert checkpoint["backbone"] == {"name": "vit_tiny_patch16_224", "fingerprint": module.backbone_fingerprint}
    assert {"python", "numpy", "torch"} <= set(checkpoint["loops"]["fit_loop"]["state_dict"]["rng"])


def test_resuming_against_another_backbone_is_refused(tmp_path):
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path / "a", num_rounds=1, enable_checkpointing=True)
    trainer.fit(tiny_module(Prompt(num_tokens=2)), datamodule=tiny_datamodule())
    other_weights = tmp_path / "other.safetensors"
    torch.manual_seed(123)
    save_file({k: v.contiguous() for k, v in tiny_backbone().build(10).state_dict().items()}, str(other_weights))
    other = FedPEFTModule(10, tiny_backbone(weights_file=str(other_weights)), Prompt(num_tokens=2))
    with pytest.raises(ConfigError, match="fingerprint"):
        tiny_trainer(tmp_path / "b", num_rounds=2, enable_checkpointing=True).fit(
            other, datamodule=tiny_datamodule(), ckpt_path=trainer.checkpoint_callback.last_model_path
        )


class Faulty(FedPEFTModule):
    """Client 0 raises in its training step; client 1's loss turns NaN."""

    def training_step(self, batch, batch_idx):
        client = self.session.client
        if client == 0:
            raise OSError("image file is truncated")
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if client == 1 else loss


class Updates(FederatedCallback):
    def __init__(self):
        self.updates, self.failed, self.after = {}, [], None

    def on_client_end(self, trainer, pl_module, round, result):
        self.updates[result.client] = (result.num_samples, trainable_state(pl_module))

    def on_client_failed(self, trainer, pl_module, round, result):
        self.failed.append((result.client, type(result.error).__name__))

    def on_validation_start(self, trainer, pl_module):
        self.after = trainable_state(pl_module)


def test_a_failing_client_and_a_nan_update_are_left_out_and_the_run_goes_on(tmp_path, caplog):
    from helpers import sgd, tiny_backbone

    module = Faulty(10, tiny_backbone(), Prompt(num_tokens=2), optimizer=sgd())
    recorder = Updates()
    trainer = tiny_trainer(tmp_path, num_rounds=1, clients_per_round=4, callbacks=[recorder])
    with caplog.at_level(logging.WARNING, logger="fedpeft_pl"):
        trainer.fit(module, datamodule=tiny_datamodule(num_clients=4))
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "client 0 failed and is left out of this round: OSError: image file is truncated" in messages
    assert "client 1 sent NaN or Inf values" in messages
    assert recorder.failed == [(0, "OSError")]
    healthy = [2, 3]
    from fedpeft_pl import ClientUpdate

    expected = FedAvg().aggregate_fit(1, {}, [ClientUpdate(c, *recorder.updates[c]) for c in healthy])
    assert all(torch.equal(recorder.after[k], v) for k, v in expected.items())
    assert trainer.current_epoch == 1


def test_a_round_in_which_every_client_fails_stops_the_run(tmp_path):
    class AlwaysFails(FedPEFTModule):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("broken everywhere")

    from helpers import tiny_backbone

    trainer = tiny_trainer(tmp_path, num_rounds=1, clients_per_round=2)
    with pytest.raises(RuntimeError, match="all 2 clients of round 1 failed"):
        trainer.fit(AlwaysFails(10, tiny_backbone(), Prompt(num_tokens=2)), datamodule=tiny_datamodule())


class NanInRoundTwo(FedPEFTModule):
    """Client 1's loss turns NaN in round 2 only."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.session.client == 1 and self.trainer.current_epoch == 1 else loss


class Residuals(FederatedCallback):
    def __init__(self):
        self.after_round = []

    def on_round_end(self, trainer, pl_module, server_round):
        residuals = trainer.aggregation.upload._residuals
        self.after_round.append({c: {k: v.clone() for k, v in r.items()} for c, r in residuals.items()})


def test_a_rejected_update_leaves_the_clients_error_feedback_residual_as_it_was(tmp_path, caplog):
    from helpers import sgd, tiny_backbone

    from fedpeft_pl.compression import Int8

    module = NanInRoundTwo(10, tiny_backbone(), Prompt(num_tokens=2), optimizer=sgd())
    recorder = Residuals()
    trainer = tiny_trainer(
        tmp_path, num_rounds=2, clients_per_round=2, callbacks=[recorder], compress_upload=Int8(error_feedback=True)
    )
    with caplog.at_level(logging.WARNING, logger="fedpeft_pl"):
        trainer.fit(module, datamodule=tiny_datamodule(num_clients=2))
    assert "round 2: client 1 sent NaN or Inf values" in "\n".join(r.getMessage() for r in caplog.records)
    first, second = recorder.after_round
    for name, residual in first[1].items():  # the NaN update left it untouched, so it cannot poison later uploads
        assert torch.isfinite(residual).all() and torch.equal(second[1][name], residual), name
    assert any(not torch.equal(second[0][n], first[0][n]) for n in first[0])  # client 0's moved on


def test_a_client_refuses_to_keep_a_residual_for_a_non_finite_update():
    """What a deployed client runs: it encodes its own update, so it must not keep a NaN residual either."""
    from fedpeft_pl.compression import Int8
    from fedpeft_pl.exchange import encode_update

    codec = Int8(error_feedback=True)
    received = {"w": torch.zeros(3)}
    encode_update(codec, {"w": torch.tensor([1.0, 0.003, -0.3])}, received, client=4)
    kept = codec.client_state([4])[4]["w"].clone()
    encode_update(codec, {"w": torch.tensor([1.0, float("nan"), -0.3])}, received, client=4)
    assert torch.equal(codec.client_state([4])[4]["w"], kept)
    # a finite update sent beside a non-finite strategy tensor (SCAFFOLD's control variate) is rejected too
    encode_update(
        codec,
        {"w": torch.tensor([0.5, 0.2, 0.1])},
        received,
        client=4,
        extras={"control.w": torch.full((3,), float("inf"))},
    )
    assert torch.equal(codec.client_state([4])[4]["w"], kept)


def test_non_finite_tensors_are_found_exactly():
    from fedpeft_pl.federation import first_non_finite

    huge = torch.full((4, 4), 3e38)  # finite, though its norm overflows
    assert first_non_finite({"a": torch.randn(3), "huge": huge, "steps": torch.tensor([7])}) is None
    assert first_non_finite({}) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = torch.randn(5)
        broken[2] = bad
        assert first_non_finite({"a": torch.randn(3), "huge": huge, "b": broken, "c": broken.clone()}) == "b"
    assert first_non_finite({"half": torch.tensor([1.0, float("nan")], dtype=torch.float16)}) == "half"


def test_a_round_logged_but_not_checkpointed_before_a_crash_is_logged_once_after_the_resume(tmp_path, caplog):
    """The run dies between logging round 3 and writing its checkpoint (Lightning saves after the loggers
    have the round): the resumed run trains round 3 again, and TensorBoard shows it once, from the resume."""
    import shutil

    from lightning.pytorch.loggers import TensorBoardLogger
    from test_cli import scalars

    class StepProbe(FederatedCallback):  # a callback's own value, stepped by something other than the round
        def on_round_end(self, trainer, pl_module, round):
            trainer.logger.log_metrics({"probe/round": float(round.number)}, step=1000 + 10 * round.number)

    def fit(rounds, ckpt_path=None):
        torch.manual_seed(0)
        logger = TensorBoardLogger(save_dir=str(tmp_path), name="run", version=0, prefix="")
        trainer = tiny_trainer(
            tmp_path, num_rounds=rounds, enable_checkpointing=True, logger=logger, callbacks=[StepProbe()]
        )
        module = tiny_module(Prompt(num_tokens=2), lr=0.05)
        trainer.fit(module, datamodule=tiny_datamodule(num_clients=4, batch_size=128), ckpt_path=ckpt_path)
        return trainer

    folder = tmp_path / "run" / "version_0"
    first = fit(2)
    round_two = tmp_path / "round-2-last.ckpt"
    shutil.copy(first.checkpoint_callback.last_model_path, round_two)
    fit(3, ckpt_path="last")  # logs round 3 and writes its checkpoint ...
    shutil.copy(round_two, folder / "checkpoints" / "last.ckpt")  # ... which the crash never wrote
    (folder / "checkpoints" / "round=3.ckpt").unlink()
    crashed = scalars(folder)
    assert [s for s, _ in crashed["round/clients_aggregated"]] == [1, 2, 3]
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        resumed = fit(3, ckpt_path="last")
    assert resumed.current_epoch == 3
    assert f"resuming from {folder / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert "round(s) 3 to 3 were logged after the checkpoint of round 2" in caplog.text
    logs = scalars(folder)
    for tag in [t for t in logs if t.startswith(("round/", "comm/", "server/"))]:
        if tag == "server/acc_vs_cumulative_bytes":  # stepped by bytes: one point a round, increasing
            steps = [s for s, _ in logs[tag]]
            assert len(steps) == 3 and steps == sorted(set(steps)), (tag, steps)
        else:
            assert [s for s, _ in logs[tag]] == [1, 2, 3], tag
    assert logs["comm/cumulative_bytes"] == crashed["comm/cumulative_bytes"]
    # what was logged before the checkpoint under other steps is kept, round 3's once
    assert [(s, v) for s, v in logs["probe/round"]] == [(1010, 1.0), (1020, 2.0), (1030, 3.0)]
    # a resume whose checkpoint holds every logged round leaves the log as it is
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
        fit(3, ckpt_path="last")
    assert "were logged after the checkpoint" not in caplog.text
    assert [s for s, _ in scalars(folder)["round/clients_aggregated"]] == [1, 2, 3]
