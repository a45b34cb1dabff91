"""Client-side algorithms as one class each: SCAFFOLD and FedDyn against hand-written references.

The references below re-implement each algorithm from its paper in plain PyTorch (plain SGD on
the trainable tensors, no framework), on the same client batches; the framework's global state,
its server state and every client's own state must match them after a few rounds.
"""

import torch
import torch.nn.functional as F
from helpers import tiny_backbone, tiny_datamodule, tiny_trainer
from torch.func import functional_call

from fedpeft_pl import FedDyn, FedPEFTModule, Scaffold
from fedpeft_pl.federation import sample_clients
from fedpeft_pl.peft import Bias, trainable_state
from fedpeft_pl.seeds import client_seed

LR, ROUNDS, CLIENTS, PER_ROUND, EPOCHS, SEED = 0.05, 2, 4, 2, 2, 7


def build():
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(), Bias(), optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    datamodule = tiny_datamodule(num_clients=CLIENTS, batch_size=128)
    return module, datamodule


def federated(tmp_path, strategy, rounds=ROUNDS):
    module, datamodule = build()
    start = trainable_state(module)
    trainer = tiny_trainer(
        tmp_path, num_rounds=rounds, clients_per_round=PER_ROUND, local_epochs=EPOCHS, seed=SEED, aggregation=strategy
    )
    trainer.fit(module, datamodule=datamodule)
    return start, trainable_state(module), trainer


def reference():
    """The same module and data as the federated run, set up for training by hand."""
    module, datamodule = build()
    datamodule.data_config = module.data_config
    datamodule.setup("fit")
    module.configure_model()
    return module, datamodule


def local_sgd(module, datamodule, params, server_round, client, loss_term=None, correction=None):
    """Plain SGD on ``params`` over the client's batches (the same data order as the framework); returns steps."""
    steps = 0
    loader = datamodule.client_dataloader(client, client_seed(SEED, server_round, client))
    for _ in range(EPOCHS):
        for images, labels in loader:
            loss = F.cross_entropy(functional_call(module, params, (images,)), labels)
            if loss_term is not None:
                loss = loss + loss_term(params)
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for (name, p), g in zip(params.items(), grads):
                    p -= LR * (correction(name, g) if correction else g)
            steps += 1
    return steps


def test_scaffold_matches_option_two_of_the_paper_computed_by_hand(tmp_path):
    start, trained, trainer = federated(tmp_path, Scaffold())
    module, datamodule = reference()
    x = start
    c = {n: torch.zeros_like(t) for n, t in x.items()}
    c_own = {}
    for server_round in range(1, ROUNDS + 1):
        ys, changes = [], []
        for client in sample_clients(SEED, server_round, CLIENTS, PER_ROUND):
            ci = c_own.get(client, {n: torch.zeros_like(t) for n, t in x.items()})
            y = {n: t.clone().requires_grad_(True) for n, t in x.items()}
            steps = local_sgd(
                module, datamodule, y, server_round, client, correction=lambda n, g, ci=ci, c=c: g - ci[n] + c[n]
            )
            new = {n: ci[n] - c[n] + (x[n] - y[n].detach()) / (steps * LR) for n in x}
            changes.append({n: new[n] - ci[n] for n in x})
            c_own[client] = new
            ys.append({n: t.detach() for n, t in y.items()})
        x = {n: x[n] + sum(y[n] - x[n] for y in ys) / len(ys) for n in x}
        c = {n: c[n] + sum(d[n] for d in changes) / CLIENTS for n in x}
    for name in x:
        torch.testing.assert_close(trained[name], x[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(
            trainer.aggregation.strategy.state_dict()["control"][name], c[name], rtol=1e-5, atol=1e-6
        )
    stored = trainer.fit_loop.client_states
    for client, own in c_own.items():
        for name, value in own.items():
            torch.testing.assert_close(stored.get(client)[f"control.{name}"], value, rtol=1e-5, atol=1e-6)


def test_feddyn_matches_the_paper_computed_by_hand(tmp_path):
    alpha = 0.1
    start, trained, trainer = federated(tmp_path, FedDyn(alpha=alpha))
    module, datamodule = reference()
    x = start
    h = {n: torch.zeros_like(t) for n, t in x.items()}
    grads_own = {}
    for server_round in range(1, ROUNDS + 1):
        ys = []
        for client in sample_clients(SEED, server_round, CLIENTS, PER_ROUND):
            g = grads_own.get(client, {n: torch.zeros_like(t) for n, t in x.items()})
            y = {n: t.clone().requires_grad_(True) for n, t in x.items()}

            def term(p, g=g, x=x):
                return sum(-(g[n] * p[n]).sum() + alpha / 2 * (p[n] - x[n]).pow(2).sum() for n in p)

            local_sgd(module, datamodule, y, server_round, client, loss_term=term)
            grads_own[client] = {n: g[n] - alpha * (y[n].detach() - x[n]) for n in x}
            ys.append({n: t.detach() for n, t in y.items()})
        h = {n: h[n] - alpha / CLIENTS * sum(y[n] - x[n] for y in ys) for n in x}
        x = {n: sum(y[n] for y in ys) / len(ys) - h[n] / alpha for n in x}
    for name in x:
        torch.testing.assert_close(trained[name], x[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(trained[n], start[n]) for n in x)
    stored = trainer.fit_loop.client_states
    assert len(stored) == len(grads_own)
    for client, own in grads_own.items():
        for name, value in own.items():
            torch.testing.assert_close(stored.get(client)[f"grad.{name}"], value, rtol=1e-5, atol=1e-6)


def test_scaffold_control_variates_travel_and_are_counted(tmp_path):
    from fedpeft_pl.comm import communication_report, payload_bytes

    module, _ = build()
    state = trainable_state(module)
    report = communication_report(module, PER_ROUND, ROUNDS, strategy=Scaffold())
    assert report.download_bytes == report.upload_bytes == 2 * payload_bytes(state)
    _, _, trainer = federated(tmp_path, Scaffold(), rounds=1)
    # clients x directions x (state + control variate)
    assert trainer.aggregation.cumulative_bytes == PER_ROUND * 2 * 2 * payload_bytes(state)
