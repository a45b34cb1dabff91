"""The vectorised runner inside a federated run: the same global state, bytes and metrics as the sequential runner."""

import logging

import pytest
import torch
from helpers import sgd, tiny_backbone, tiny_trainer
from lightning.pytorch.loggers import CSVLogger

from fedpeft_pl import (
    ClientAvailability,
    ConfigError,
    FedDyn,
    FederatedDataModule,
    FedPEFTModule,
    FedProx,
    Scaffold,
)
from fedpeft_pl.data import Digits, Dirichlet
from fedpeft_pl.peft import Adapter, Bias, Full, Head, LoRA, Personalized, Prompt, trainable_state
from fedpeft_pl.privacy import LocalDP

METHODS = {
    "head": Head(),
    "bias": Bias(),
    "adapter-sequential": Adapter(reduction_factor=4),
    "adapter-parallel": Adapter(reduction_factor=4, placement="parallel"),
    "prompt-shallow": Prompt(num_tokens=2, deep=False),
    "prompt-deep": Prompt(num_tokens=2, deep=True),
    "lora": LoRA(rank=2, alpha=4),
    "full": Full(),
}


def run(tmp_path, name, peft, runner, optimizer=None, **kwargs):
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(), peft, optimizer=optimizer or sgd(0.05, weight_decay=1e-4))
    # unequal clients (Dirichlet), short last batches (batch 24), stragglers
    datamodule = FederatedDataModule(
        Digits(), num_clients=4, partition=Dirichlet(alpha=0.5, min_samples=10), batch_size=24
    )
    logger = CSVLogger(str(tmp_path), name=name)
    trainer = tiny_trainer(
        tmp_path,
        num_rounds=2,
        clients_per_round=3,
        local_epochs=2,
        logger=logger,
        client_runner=runner,
        availability=ClientAvailability(stragglers=0.5, straggler_work=(0.3, 0.6)),
        **kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return trainable_state(module), trainer, metrics


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_vectorised_runner_reaches_the_sequential_runners_state(tmp_path, method):
    sequential, seq_trainer, seq_metrics = run(tmp_path, "seq", METHODS[method], "sequential")
    vectorised, vec_trainer, vec_metrics = run(tmp_path, "vec", METHODS[method], "vectorized")
    for name, tensor in sequential.items():
        torch.testing.assert_close(vectorised[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    assert vec_trainer.aggregation.cumulative_bytes == seq_trainer.aggregation.cumulative_bytes
    # the clients' optimizer steps count as Lightning counts them (they trigger the round checkpoints)
    assert vec_trainer.global_step == seq_trainer.global_step > 0
    for key in ("server/acc", "server/loss"):
        assert vec_metrics[key] == pytest.approx(seq_metrics[key], abs=1e-5), key


def test_client_side_strategies_and_personal_parts_run_vectorised(tmp_path):
    peft = Personalized(Prompt(num_tokens=2), local=["head"])
    sequential, seq_trainer, _ = run(tmp_path, "seq", peft, "sequential", aggregation=Scaffold())
    peft = Personalized(Prompt(num_tokens=2), local=["head"])
    vectorised, vec_trainer, _ = run(tmp_path, "vec", peft, "vectorized", aggregation=Scaffold())
    for name, tensor in sequential.items():
        torch.testing.assert_close(vectorised[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    for client in range(4):
        a, b = seq_trainer.fit_loop.client_states.get(client), vec_trainer.fit_loop.client_states.get(client)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)


def nesterov(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "optimizer"),
    [(FedDyn, nesterov), (FedProx, adamw)],
    ids=["feddyn-sgd-nesterov", "fedprox-adamw"],
)
def test_client_side_strategies_on_the_stacked_path(tmp_path, strategy, optimizer):
    """LoRA trains on the stacked path; each strategy's client hooks and each optimizer end where the
    sequential runner does."""
    states, trainers = {}, {}
    for runner in ("sequential", "vectorized"):
        states[runner], trainers[runner], _ = run(
            tmp_path, runner, LoRA(rank=2, alpha=4), runner, optimizer=optimizer, aggregation=strategy()
        )
    assert "stacked path" in trainers["vectorized"].describe_client_runner()[1]
    for name, tensor in states["sequential"].items():
        torch.testing.assert_close(states["vectorized"][name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    for client in range(4):
        a = trainers["sequential"].fit_loop.client_states.get(client)
        b = trainers["vectorized"].fit_loop.client_states.get(client)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.slow  # two private fits
def test_local_dp_runs_vectorised_with_the_sequential_runners_noise_and_accounting(tmp_path, caplog):
    """With reproducible noise both runners draw each client's noise from the same stream: same state, same budget."""
    runs = {}
    for runner in ("sequential", "vectorized"):
        privacy = LocalDP(
            epsilon=8.0, max_grad_norm=0.5, reproducible_noise=True, chunk_size=5
        )  # several chunks a batch
        with caplog.at_level(logging.INFO, logger="fedpeft_pl"):
            state, _trainer, _metrics = run(tmp_path, runner, LoRA(rank=2, alpha=4), runner, privacy=privacy)
        runs[runner] = state, privacy
    assert "vectorised client runner:" not in caplog.text  # no fall-back to the sequential runner
    (sequential, seq_privacy), (vectorised, vec_privacy) = runs["sequential"], runs["vectorized"]
    for name, tensor in sequential.items():
        torch.testing.assert_close(vectorised[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    assert seq_privacy._histories.keys() == vec_privacy._histories.keys()
    for client in seq_privacy._histories:
        assert vec_privacy.spent(client) == pytest.approx(seq_privacy.spent(client), rel=1e-12)


@pytest.mark.slow  # two private fits
def test_vectorised_local_dp_noise_is_secret_by_default(tmp_path, monkeypatch):
    """Two identical private runs on the vectorised runner end apart because of the noise alone: the
    Poisson batches are made to follow the seed here, and without noise the two runs are identical."""
    attach = LocalDP.attach

    def seeded_batches(self, module, datamodule):
        attach(self, module, datamodule)
        datamodule.secret_sampling = False  # the batches follow the seed; only the noise is secret

    monkeypatch.setattr(LocalDP, "attach", seeded_batches)

    def twice(**privacy):
        return [
            run(tmp_path, f"v{i}", LoRA(rank=2, alpha=4), "vectorized", privacy=LocalDP(**privacy))[0] for i in range(2)
        ]

    noiseless = twice(epsilon=None, noise_multiplier=0.0)
    assert all(torch.equal(noiseless[0][n], noiseless[1][n]) for n in noiseless[0])
    noisy = twice(epsilon=8.0)
    assert any(not torch.equal(noisy[0][n], noisy[1][n]) for n in noisy[0]), "two private runs drew the same noise"


def test_runner_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="client_runner must be"):
        tiny_trainer(tmp_path, client_runner="parallel")
    with pytest.raises(ConfigError, match="max_parallel_clients applies to the vectorised runner"):
        tiny_trainer(tmp_path, client_runner="sequential", max_parallel_clients=4)


def test_auto_chooses_the_vectorised_runner_on_cuda_also_across_processes():
    from fedpeft_pl.runners.choice import choose_client_runner

    assert choose_client_runner("auto", "cuda", 1) == ("vectorized", "auto: one CUDA device")
    runner, why = choose_client_runner("auto", "cuda", 2)
    assert runner == "vectorized" and "2 CUDA processes" in why and "share" in why
    assert choose_client_runner("auto", "cpu", 1) == (
        "vectorized",
        "auto: one CPU process, where the stacked engine trains a round faster",
    )
    for device, world_size in (("cpu", 2), ("mps", 1)):
        runner, why = choose_client_runner("auto", device, world_size)
        assert runner == "sequential" and "not measured faster" in why
    assert choose_client_runner("vectorized", "cpu", 1) == ("vectorized", "set in the config")
    assert choose_client_runner("sequential", "cuda", 1) == ("sequential", "set in the config")
    with pytest.raises(ConfigError, match="'auto', 'sequential' or 'vectorized'"):
        choose_client_runner("parallel", "cpu", 1)


def test_the_default_runner_in_one_cpu_process_is_vectorised_and_says_why(tmp_path):
    from fedpeft_pl.runners import VectorizedRunner

    trainer = tiny_trainer(tmp_path, max_parallel_clients=4)
    assert trainer.client_runner == "vectorized" and type(trainer.fit_loop.runner) is VectorizedRunner
    assert trainer.fit_loop.runner.max_parallel_clients == 4
    module = FedPEFTModule(10, tiny_backbone(), Bias())
    notes = trainer.comm(module, FederatedDataModule(Digits(), num_clients=4)).notes
    assert (
        "clients run on the vectorized runner (auto: one CPU process, where the stacked engine trains a round "
        "faster; stacked path: Bias has a stacked form)"
    ) in notes
    # on CPUs auto vectorises only what has the stacked path
    full = FedPEFTModule(10, tiny_backbone(), Full())
    assert (
        "clients run on the sequential runner (auto: on CPUs only the stacked path is measured faster, and Full has "
        "no stacked form (PEFTMethod.stacked_forwards))"
    ) in trainer.comm(full, FederatedDataModule(Digits(), num_clients=4)).notes
    # what only Lightning's loop runs still goes to the sequential runner, and the run says so
    notes = tiny_trainer(tmp_path, gradient_clip_val=1.0).comm(module, FederatedDataModule(Digits(), num_clients=4))
    assert (
        "clients run on the sequential runner (gradient clipping (trainer.gradient_clip_val) runs in Lightning's loop)"
        in notes.notes
    )


def test_steps_that_need_lightnings_loop_go_to_the_sequential_runner(tmp_path):
    """What the engine would skip (a module's training_step, a user callback's per-step hook, gradient
    clipping or accumulation, a non-elementwise optimizer, fp16 without a scaler) hands the run to
    the sequential runner; fedpeft's own callbacks do not."""

    from lightning.pytorch.callbacks import Callback

    from fedpeft_pl.runners.choice import autocast_for, lightning_step_customised

    def module(**kwargs):
        return FedPEFTModule(10, tiny_backbone(), Bias(), **kwargs)

    assert (
        lightning_step_customised(tiny_trainer(tmp_path, enable_progress_bar=True, enable_checkpointing=True), module())
        is None
    )

    class OwnStep(FedPEFTModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    class PerStep(Callback):
        def on_train_batch_end(self, *args):
            pass

    assert "overrides training_step" in lightning_step_customised(
        tiny_trainer(tmp_path), OwnStep(10, tiny_backbone(), Bias())
    )
    assert "callback PerStep has on_train_batch_end" in lightning_step_customised(
        tiny_trainer(tmp_path, callbacks=[PerStep()]), module()
    )
    assert "gradient clipping" in lightning_step_customised(tiny_trainer(tmp_path, gradient_clip_val=1.0), module())
    assert "accumulation" in lightning_step_customised(tiny_trainer(tmp_path, accumulate_grad_batches=2), module())
    lbfgs = lightning_step_customised(
        tiny_trainer(tmp_path), module(optimizer=lambda params: torch.optim.LBFGS(params))
    )
    assert lbfgs == "the optimizer LBFGS is not elementwise"
    assert autocast_for("16-mixed", "cuda") is False

    # what the run says: the runner that will train, and why
    trainer = tiny_trainer(tmp_path, client_runner="vectorized", gradient_clip_val=1.0)
    notes = trainer.comm(module(), FederatedDataModule(Digits(), num_clients=4)).notes
    assert (
        "clients run on the sequential runner (gradient clipping (trainer.gradient_clip_val) runs in Lightning's loop)"
        in notes
    )
    with pytest.raises(ConfigError, match="max_parallel_clients must be >= 1"):
        tiny_trainer(tmp_path, max_parallel_clients=0)  # checked whichever runner auto picks


def test_the_run_says_which_path_of_the_engine_trains(tmp_path):
    """fedpeft comm (and the start line, through the same describe_client_runner) names the stacked or vmap path."""
    trainer = tiny_trainer(tmp_path, client_runner="vectorized")
    data = FederatedDataModule(Digits(), num_clients=4)
    notes = trainer.comm(FedPEFTModule(10, tiny_backbone(), LoRA(rank=2)), data).notes
    assert "clients run on the vectorized runner (set in the config; stacked path: LoRA has a stacked form)" in notes
    notes = trainer.comm(FedPEFTModule(10, tiny_backbone(), Full()), data).notes
    assert (
        "clients run on the vectorized runner (set in the config; vmap path: Full has no stacked form "
        "(PEFTMethod.stacked_forwards))"
    ) in notes
