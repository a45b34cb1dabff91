"""The seam between the loop and how clients run: runners, where callbacks run, and no Flower for writing an app."""

import subprocess
import sys

import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping
from test_cli import QUICKSTART, REPO

from fedpeft_pl import ClientResult, FederatedCallback, SequentialRunner
from fedpeft_pl.exchange import open_session
from fedpeft_pl.federation import RoundMessage
from fedpeft_pl.peft import Prompt, trainable_state


class Counting(FederatedCallback):
    runs_on = "client"

    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, trainer, *args):
        self.batches += 1


class ServerOnly(Callback):
    """A plain Lightning callback: it belongs to the server unless it says otherwise."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, trainer, *args):
        self.batches += 1


def test_a_deployed_client_runs_only_the_callbacks_marked_for_clients(tmp_path):
    torch.manual_seed(0)
    module, datamodule = tiny_module(Prompt(num_tokens=2)), tiny_datamodule()
    on_client, server_only = Counting(), ServerOnly()
    early = EarlyStopping(monitor="server/acc", mode="max", patience=0)
    trainer = tiny_trainer(tmp_path, callbacks=[on_client, server_only, early])
    module.configure_model()
    server = trainer.aggregation
    start = trainable_state(module)
    message = RoundMessage(dict(start))  # what the server would send: the global state, no codec
    session = open_session(server.strategy, server.upload, server.download, message, 0, 1, start)
    samples = trainer.train_client(module, datamodule, session)
    assert samples == datamodule.client_num_samples(0)
    assert on_client.batches == datamodule.client_num_batches(0) > 0
    assert server_only.batches == 0
    assert early.wait_count == 0 and early.stopped_epoch == 0
    assert trainer.callbacks[:3] == [on_client, server_only, early]  # the run's own list is restored


def test_a_custom_runner_plugs_into_the_loop(tmp_path):
    """A runner is any object with run(round) -> ClientResults; here one that records what it is given."""

    class Recording(SequentialRunner):
        def __init__(self, loop):
            super().__init__(loop)
            self.rounds = []

        def run(self, round):
            self.rounds.append((round.number, round.clients, round.message is not None))
            results = list(super().run(round))
            assert all(isinstance(r, ClientResult) and r.payload is not None for r in results)
            return results

    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, num_rounds=2)
    runner = Recording(trainer.fit_loop)
    trainer.use_runner(runner)
    trainer.fit(tiny_module(Prompt(num_tokens=2)), datamodule=tiny_datamodule())
    assert [(n, len(c), sent) for n, c, sent in runner.rounds] == [(1, 2, True), (2, 2, True)]


def test_writing_a_flower_app_needs_no_flower(tmp_path):
    code = (
        "import sys; sys.modules['flwr'] = None\n"  # any import of Flower now fails
        "from fedpeft_pl.cli import main\n"
        f"main(['flower-app', {str(tmp_path / 'app')!r}, '--config', {QUICKSTART!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in (tmp_path / "app").iterdir()} == {"pyproject.toml", "fedpeft_app.py", "fedpeft.yaml"}
