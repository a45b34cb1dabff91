"""One client task on every runner: the same ClientContext for a strategy's client hooks, whether the
clients train one by one, stacked or on Flower SuperNodes, and the same module in ``on_client_end``
on every in-process runner."""

import pytest
import torch
from helpers import tiny_backbone, tiny_datamodule, tiny_trainer

from fedpeft_pl import FederatedCallback, FedPEFTModule, Scaffold
from fedpeft_pl.peft import Bias, trainable_state

RUNNERS = ("sequential", "vectorized")
# every context any RecordingScaffold saw, also those of the strategies a deployed client builds from its config
RECORDED: list[tuple] = []


class RecordingScaffold(Scaffold):
    """SCAFFOLD with a small proximal term, recording every context its client hooks see."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def _record(self, hook, context):
        record = (
            hook,
            context.client,
            context.server_round,
            dict(context.config),
            context.version,
            context.steps,
            context.lr,
            {n: float(t.double().sum()) for n, t in context.received.items()},
            {k: float(t.double().sum()) for k, t in context.extras.items()},
            {k: float(t.double().sum()) for k, t in context.state.items()},
        )
        self.seen.append(record)
        RECORDED.append(record)

    def client_loss(self, params, context):
        self._record("loss", context)
        return 0.001 * sum(((p - context.received[n]) ** 2).sum() for n, p in params.items())

    def client_gradient(self, grads, params, context):
        self._record("gradient", context)
        return super().client_gradient(grads, params, context)

    def client_end(self, trained, context):
        self._record("end", context)
        return super().client_end(trained, context)


class ModuleAtClientEnd(FederatedCallback):
    """What the module holds, and what the client sent, when ``on_client_end`` runs."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], tuple[dict, dict]] = {}

    def on_client_end(self, trainer, pl_module, round, result):
        self.seen[(round.number, result.client)] = (
            {n: t.detach().clone() for n, t in trainable_state(pl_module).items()},
            {n: t.detach().clone() for n, t in result.payload.items()},
        )


def run(tmp_path, runner, strategy=None, callbacks=()):
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(), Bias(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    datamodule = tiny_datamodule(num_clients=4, batch_size=128)
    trainer = tiny_trainer(
        tmp_path / runner,
        num_rounds=2,
        clients_per_round=2,
        local_epochs=1,
        seed=3,
        client_runner=runner,
        callbacks=list(callbacks),
        **({"aggregation": strategy} if strategy is not None else {}),
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module


def by_client_and_hook(seen):
    grouped: dict[tuple, list] = {}
    for record in seen:
        grouped.setdefault((record[2], record[1], record[0]), []).append(record)
    return grouped


def test_client_hooks_see_the_same_context_on_every_in_process_runner(tmp_path):
    seen = {}
    for runner in RUNNERS:
        strategy = RecordingScaffold()
        trainer, _ = run(tmp_path, runner, strategy)
        assert trainer.client_runner == runner
        seen[runner] = by_client_and_hook(strategy.seen)
    assert_same_contexts(seen["sequential"], seen["vectorized"])


def test_on_client_end_sees_the_clients_trained_state_in_the_module(tmp_path):
    seen = {}
    for runner in RUNNERS:
        callback = ModuleAtClientEnd()
        run(tmp_path, runner, callbacks=[callback])
        seen[runner] = callback.seen
        assert len(callback.seen) == 4
        for module_state, sent in callback.seen.values():
            assert module_state.keys() == sent.keys()
            for name in sent:
                torch.testing.assert_close(module_state[name], sent[name], rtol=0, atol=0)
    assert seen["sequential"].keys() == seen["vectorized"].keys()
    for key, (state, _) in seen["sequential"].items():
        for name, tensor in state.items():
            torch.testing.assert_close(seen["vectorized"][key][0][name], tensor, rtol=1e-5, atol=1e-5)


def assert_same_contexts(mine, theirs, fields=(0, 1, 2, 3, 4, 5, 6)):
    """Hook, client, round, config, version, steps and lr (those in ``fields``) exactly; the tensors' sums closely."""
    assert mine.keys() == theirs.keys()
    assert {key[2] for key in mine} == {"loss", "gradient", "end"}
    for key in mine:
        assert len(mine[key]) == len(theirs[key]), key
        for a_record, b_record in zip(mine[key], theirs[key]):
            assert [a_record[i] for i in fields] == [b_record[i] for i in fields], key
            for a, b in zip(a_record[7:], b_record[7:]):
                assert a.keys() == b.keys(), key
                assert a == pytest.approx(b, rel=1e-5, abs=1e-5), key


@pytest.mark.slow
def test_a_flower_client_sees_the_context_of_the_in_process_runners(tmp_path, capsys):
    """The same config on the sequential runner, the vectorised runner and Flower SuperNodes (over the
    loopback grid): every client hook of every client in every round sees the same ClientContext."""
    pytest.importorskip("flwr")
    from flower_loopback import run_loopback
    from test_cli import QUICKSTART, REPO

    from fedpeft_pl.cli import main

    app = tmp_path / "app"
    main(
        [
            "flower-app",
            str(app),
            "--config",
            QUICKSTART,
            "--data.num_clients",
            "3",
            "--trainer.num_rounds",
            "2",
            "--trainer.clients_per_round",
            "2",
            "--trainer.local_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.aggregation",
            f"{__name__}.RecordingScaffold",
            "--model.backbone.weights_file",
            str(REPO / "fedpeft_pl" / "assets" / "vit_pico_mnist.safetensors"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "deployed"),
        ]
    )
    capsys.readouterr()
    seen = {}
    RECORDED.clear()
    run_loopback(app, 3)
    seen["flower"] = by_client_and_hook(RECORDED)
    for runner in RUNNERS:
        RECORDED.clear()
        main(
            [
                "fit",
                "--config",
                str(app / "fedpeft.yaml"),
                "--trainer.client_runner",
                runner,
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / runner),
            ]
        )
        seen[runner] = by_client_and_hook(RECORDED)
    capsys.readouterr()
    assert len(seen["sequential"]) >= 6  # two rounds of two clients, three hooks each
    assert_same_contexts(seen["sequential"], seen["vectorized"])
    # the version too: the train message carries the global version it holds
    assert_same_contexts(seen["sequential"], seen["flower"])
