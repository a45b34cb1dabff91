"""One client task on every in-process runner: the same ClientContext for a strategy's client hooks,
and the same module in ``on_client_end``, whether the clients train one by one or stacked."""

import pytest
import torch
from helpers import tiny_backbone, tiny_datamodule, tiny_trainer

from fedpeft_pl import FederatedCallback, FedPEFTModule, Scaffold
from fedpeft_pl.peft import Bias, trainable_state

RUNNERS = ("sequential", "vectorized")


class RecordingScaffold(Scaffold):
    """SCAFFOLD with a small proximal term, recording every context its client hooks see."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def _record(self, hook, context):
        self.seen.append(
            (
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
        )

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
    sequential, vectorized = seen["sequential"], seen["vectorized"]
    assert sequential.keys() == vectorized.keys()
    assert {key[2] for key in sequential} == {"loss", "gradient", "end"}
    for key in sequential:
        assert len(sequential[key]) == len(vectorized[key]), key
        for mine, theirs in zip(sequential[key], vectorized[key]):
            # hook, client, round, config, version, steps and lr exactly; the tensors' sums closely
            assert mine[:7] == theirs[:7], key
            for a, b in zip(mine[7:], theirs[7:]):
                assert a.keys() == b.keys(), key
                assert a == pytest.approx(b, rel=1e-5, abs=1e-5), key


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
