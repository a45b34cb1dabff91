"""Personalised PEFT (a local part that never travels) and per-client evaluation on held-out splits."""

import numpy as np
import pytest
import torch
from helpers import sgd, tiny_backbone, tiny_datamodule, tiny_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from test_cli import scalars

from fedpeft_pl import ConfigError, FederatedCallback, FedPEFTModule
from fedpeft_pl.comm import communication_report, payload_bytes
from fedpeft_pl.exchange import LOCAL
from fedpeft_pl.peft import Bias, Head, LoRA, Personalized, Prompt, shared_state, trainable_state

HEAD = ("model.head.weight", "model.head.bias")


def personal(method=None, **kwargs):
    torch.manual_seed(0)
    return FedPEFTModule(10, tiny_backbone(), Personalized(method or Prompt(num_tokens=2), **kwargs), optimizer=sgd())


class StartStates(FederatedCallback):
    """The trainable state each client starts its local training from, and which tensors train per batch."""

    def __init__(self):
        self.starts, self.training, self._first = {}, [], False

    def on_client_start(self, trainer, pl_module, round, client):
        self._key, self._first = (round.number, client), True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._first:
            self.starts[self._key] = trainable_state(pl_module)
            self._first = False
        self.training.append(frozenset(n for n, p in pl_module.named_parameters() if p.requires_grad))


def fit(tmp_path, module, rounds=2, clients=3, per_round=3, ckpt_path=None, **data):
    recorder = StartStates()
    datamodule = tiny_datamodule(num_clients=clients, **data)
    trainer = tiny_trainer(
        tmp_path,
        num_rounds=rounds,
        clients_per_round=per_round,
        callbacks=[recorder],
        enable_checkpointing=ckpt_path is not None or rounds == 1,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, recorder


def test_fedper_keeps_the_head_on_each_client_and_sends_only_the_shared_part(tmp_path):
    module = personal(local=["head"])
    initial = trainable_state(module)
    assert module.local_names == frozenset(HEAD)
    report = communication_report(module, 3, 2)
    shared_bytes = payload_bytes(shared_state(module))
    assert report.upload_bytes == report.download_bytes == shared_bytes < payload_bytes(initial)

    trainer, recorder = fit(tmp_path, module)
    assert trainer.aggregation.cumulative_bytes == 2 * 3 * 2 * shared_bytes
    assert not any(name in trainer.aggregation.global_state for name in HEAD)
    # the server never aggregates the head: the module keeps its initial values
    for name in HEAD:
        assert torch.equal(trainable_state(module)[name], initial[name])
    stored = trainer.fit_loop.client_states
    heads = [stored.get(c)[LOCAL + "model.head.weight"] for c in range(3)]
    assert all(not torch.equal(h, initial["model.head.weight"]) for h in heads)
    assert not torch.equal(heads[0], heads[1])
    # round 1 starts every client from the initial head; round 2 from the head that client left
    for client in range(3):
        assert torch.equal(recorder.starts[(1, client)]["model.head.weight"], initial["model.head.weight"])
        assert not torch.equal(recorder.starts[(2, client)]["model.head.weight"], initial["model.head.weight"])
    # while the shared part starts from the same global state on every client
    prompts = [n for n in initial if n not in HEAD]
    for name in prompts:
        assert torch.equal(recorder.starts[(2, 0)][name], recorder.starts[(2, 1)][name])


def test_the_local_part_is_restored_on_resume(tmp_path):
    straight, _ = fit(tmp_path / "straight", personal(local=["head"]), rounds=2)
    first, _ = fit(tmp_path / "split", personal(local=["head"]), rounds=1)
    last = first.checkpoint_callback.last_model_path
    resumed, _ = fit(tmp_path / "split", personal(local=["head"]), rounds=2, ckpt_path=last)
    for client in range(3):
        a, b = straight.fit_loop.client_states.get(client), resumed.fit_loop.client_states.get(client)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedrep_trains_the_head_alone_first_then_the_body_alone(tmp_path):
    module = personal(Bias(), local=["head"], local_epochs=1)
    everything = set(trainable_state(module))
    trainer, recorder = fit(tmp_path, module, rounds=1, clients=2, per_round=2)
    batches = trainer.datamodule.client_num_batches(0)
    phases = recorder.training[: 2 * batches]
    assert all(names == frozenset(HEAD) for names in phases[:batches])
    assert all(names and not names & frozenset(HEAD) for names in phases[batches:])
    # afterwards everything is trainable again, so the full trainable state is what it was
    assert set(trainable_state(module)) == everything


def test_fedsa_lora_shares_a_and_keeps_b_on_the_clients(tmp_path):
    module = personal(LoRA(rank=2), local=["blocks.*.attn.qkv.lora_B"])
    local = module.local_names
    assert local and all("lora_B" in n for n in local)
    assert not any("lora_B" in n for n in shared_state(module))
    trainer, _ = fit(tmp_path, module, rounds=1, clients=2, per_round=2)
    assert all(LOCAL + n in trainer.fit_loop.client_states.get(0) for n in local)


@pytest.mark.parametrize(
    "local, message",
    [
        (["blocks.9"], "matches no trainable tensor"),
        (["head", "pos_embed"], "matches no trainable tensor"),
        ("head", "non-empty list"),
    ],
    ids=["no-match", "one-of-two", "string"],
)
def test_a_wrong_local_part_is_one_clear_error(local, message):
    with pytest.raises(ConfigError, match=message):
        personal(local=local)


def test_a_local_part_that_covers_everything_is_refused():
    with pytest.raises(ConfigError, match="nothing would be federated"):
        personal(Head(), local=["head"])


def test_every_client_is_evaluated_on_its_own_held_out_split(tmp_path):
    module = personal(local=["head"])
    datamodule = tiny_datamodule(num_clients=4, client_test_fraction=0.25)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = tiny_trainer(tmp_path, num_rounds=2, clients_per_round=4, logger=logger)
    trainer.fit(module, datamodule=datamodule)

    for train, test in zip(datamodule.client_indices, datamodule.client_test_indices):
        assert len(test) > 0 and not set(train.tolist()) & set(test.tolist())
    # by hand: each client's personalised model (global prompts + its own head) on its own test split
    accuracies, counts = [], []
    stored = trainer.fit_loop.client_states
    start = trainable_state(module)
    for client in range(4):
        module.load_state_dict(
            {
                "model.head.weight": stored.get(client)[LOCAL + "model.head.weight"],
                "model.head.bias": stored.get(client)[LOCAL + "model.head.bias"],
            },
            strict=False,
        )
        count, metrics = module.evaluate_on(datamodule.client_test_dataloader(client))
        accuracies.append(metrics["acc"])
        counts.append(count)
        module.load_state_dict(start, strict=False)
    logged = {tag: values[-1][1] for tag, values in scalars(tmp_path / "run" / "version_0").items()}
    assert logged["clients/acc_mean"] == pytest.approx(np.average(accuracies, weights=counts), abs=1e-6)
    assert logged["clients/acc_mean_unweighted"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    assert logged["clients/acc_p10"] == pytest.approx(np.percentile(accuracies, 10), abs=1e-6)
    assert logged["clients/acc_std"] == pytest.approx(np.std(accuracies), abs=1e-6)
    assert logged["comm/bytes_eval_down"] == 4 * payload_bytes(shared_state(module))
    assert "server/acc" in logged


def test_a_personalised_model_exports_and_loads_back(tmp_path):
    from fedpeft_pl.export import export_model, load_exported

    module = personal(Prompt(num_tokens=2, deep=True), local=["head"])
    module.configure_model()
    exported = export_model(module, tmp_path / "model.safetensors")
    loaded = load_exported(exported.path)
    images = torch.randn(2, 3, 32, 32)
    module.eval()
    torch.testing.assert_close(loaded(images), module(images))
