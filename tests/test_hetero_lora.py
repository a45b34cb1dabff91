"""Heterogeneous LoRA ranks across clients: HetLoRA's zero-padding and FLoRA's stacking (issue 16, point 2)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_datamodule, tiny_module, tiny_trainer

from fedpeft_pl.aggregation import ServerAggregation
from fedpeft_pl.comm import payload_bytes
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.exchange import client_start
from fedpeft_pl.hooks import FederatedCallback
from fedpeft_pl.peft import (
    FLoRA,
    HetLoRA,
    LoRA,
    Personalized,
    load_trainable_state,
    trainable_parameters,
    trainable_state,
)
from fedpeft_pl.peft.lora import stacked_product
from fedpeft_pl.strategies import ClientUpdate, FedAvg

EMBED, BLOCKS, GROUPS = 48, 2, 2  # the tiny ViT; q and v adapted


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        (HetLoRA, {"client_ranks": {0: 9}}),
        (HetLoRA, {"client_ranks": {0: 0}}),
        (HetLoRA, {"client_ranks": {-1: 2}}),
        (HetLoRA, {"client_ranks": [2, 4]}),
        (HetLoRA, {"rank_choices": []}),
        (FLoRA, {"rank_choices": [2, 16]}),
        (FLoRA, {"client_ranks": {0: 2}, "rank_choices": [2]}),
        # LoRA's deprecated arguments: combinations that name no variant
        (LoRA, {"rank_choices": [2], "freeze_a": True}),
        (LoRA, {"aggregation": "stack", "freeze_a": True}),
        (LoRA, {"aggregation": "mean"}),
    ],
)
def test_bad_rank_settings_are_one_line_config_errors(method, kwargs):
    with pytest.raises(ConfigError) as err:
        method(rank=8, **kwargs)
    assert "\n" not in str(err.value)


def test_personalized_refuses_per_client_views():
    with pytest.raises(ConfigError, match="heterogeneous"):
        Personalized(HetLoRA(rank=4, rank_choices=[2, 4]), local=["head"])


def test_seeded_rule_gives_each_client_its_own_rank_from_the_run_seed_alone():
    def ranks(seed, consumed=0):
        torch.manual_seed(seed)  # seed_everything before the build
        torch.rand(consumed)
        method = HetLoRA(rank=8, rank_choices=[2, 4, 8])
        tiny_module(method)
        return [method.client_rank(c) for c in range(32)]

    first = ranks(0)
    assert first == ranks(0, consumed=1000) and set(first) == {2, 4, 8}
    assert first != ranks(1)
    mapped = HetLoRA(rank=8, client_ranks={3: 2})
    assert [mapped.client_rank(c) for c in (2, 3)] == [8, 2]


def _train(module, batch, steps, optimizer):
    images, labels = batch
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(module(images), labels).backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_padded_client_trains_exactly_a_rank_r_lora(optimizer):
    """HetLoRA's client: the rank-8 module with rows and columns past r_k at zero is a rank-2 LoRA
    of scale alpha / 8 (alpha_k = alpha * 2 / 8), and those rows and columns stay exactly zero."""
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        "adam": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-2),
    }[optimizer]
    torch.manual_seed(0)
    method = HetLoRA(rank=8, alpha=8, client_ranks={0: 2})
    padded = tiny_module(method)
    global_state = trainable_state(padded)
    global_state = {k: v + 0.05 * torch.randn_like(v) for k, v in global_state.items()}  # a trained global B
    load_trainable_state(padded, client_start(method, global_state, client=0, server_round=1))
    torch.manual_seed(0)
    genuine = tiny_module(LoRA(rank=2, alpha=2))
    genuine.load_state_dict({k: v for k, v in padded.state_dict().items() if "lora_" not in k}, strict=False)
    load_trainable_state(genuine, method.client_view(global_state, 0, 1, upload=True))

    batch = (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    _train(padded, batch, 3, make(trainable_parameters(padded).values()))
    _train(genuine, batch, 3, make(trainable_parameters(genuine).values()))

    trained = trainable_state(padded)
    sent = method.client_view(trained, 0, 1, upload=True)
    for name, tensor in trainable_state(genuine).items():
        assert sent[name].shape == tensor.shape
        torch.testing.assert_close(sent[name], tensor, rtol=1e-5, atol=1e-6)
    for name, tensor in trained.items():
        if name.endswith("lora_B"):
            assert not tensor[:, 2:].any()
        elif name.endswith("lora_A"):
            assert not tensor.view(GROUPS, 8, -1)[:, 2:].any()


def test_flora_stacking_is_the_weighted_sum_of_the_clients_products():
    generator = torch.Generator().manual_seed(0)
    d, d_in = 5, 3
    factors = []
    for w, r in [(0.2, 1), (0.3, 2), (0.5, 4)]:
        b = torch.randn(GROUPS * d, r, generator=generator, dtype=torch.float64)
        a = torch.randn(GROUPS * r, d_in, generator=generator, dtype=torch.float64)
        factors.append((w, b, a))
    by_hand = torch.zeros(GROUPS * d, d_in, dtype=torch.float64)
    for w, b, a in factors:
        r = b.shape[1]
        for g in range(GROUPS):
            for i in range(d):
                for j in range(d_in):
                    by_hand[g * d + i, j] += w * sum(b[g * d + i, t] * a[g * r + t, j] for t in range(r))
    torch.testing.assert_close(stacked_product(factors, GROUPS), by_hand)


def test_flora_aggregation_adds_each_clients_product_at_its_own_rank_and_scale():
    torch.manual_seed(0)
    method = FLoRA(rank=4, alpha=8, client_ranks={0: 1, 1: 4})
    module = tiny_module(method)
    global_state = trainable_state(module)
    generator = torch.Generator().manual_seed(1)
    updates = []
    for client, samples in [(0, 10), (1, 30)]:
        view = method.client_view(global_state, client, 1, upload=True)
        view = {k: torch.randn(v.shape, generator=generator) for k, v in view.items()}
        updates.append(ClientUpdate(client, samples, method.from_client_view(view, client, 1, global_state)))
    aggregated = method.aggregate(module.model, FedAvg().aggregate_fit(1, global_state, updates), updates, 1)
    scale = 8 / 4
    for index, layer in enumerate(method._layers):
        prefix = f"model.blocks.{index}.attn.qkv."
        expected = torch.zeros(3 * EMBED, EMBED, dtype=torch.float64)
        for update, weight in zip(updates, [0.25, 0.75]):
            # loralib's own product of a client's factors (zero-padded to rank 4: the same product)
            layer.lora_A.data.copy_(update.state[prefix + "lora_A"])
            layer.lora_B.data.copy_(update.state[prefix + "lora_B"])
            expected += weight * scale * layer.merge_AB().double()
        torch.testing.assert_close(layer.flora_delta.double(), expected, rtol=1e-5, atol=1e-6)
        assert not aggregated[prefix + "lora_B"].any()
    head = "model.head.weight"
    torch.testing.assert_close(aggregated[head], 0.25 * updates[0].state[head] + 0.75 * updates[1].state[head])
    # the server's checkpoint carries the merged update
    saved = method.server_state()
    torch.manual_seed(0)
    other = FLoRA(rank=4, alpha=8, client_ranks={0: 1, 1: 4})
    tiny_module(other)
    other.load_server_state(saved)
    assert all(torch.equal(a.flora_delta, b.flora_delta) for a, b in zip(method._layers, other._layers))
    assert other._stack_elements == method._stack_elements


class Uploads(FederatedCallback):
    def __init__(self):
        self.rounds = []

    def on_round_start(self, trainer, pl_module, round):
        self.rounds.append({})

    def on_client_end(self, trainer, pl_module, round, result):
        self.rounds[-1][result.client] = (result.num_samples, {k: v.clone() for k, v in result.payload.items()})


def _factor_elements(rank):
    return BLOCKS * rank * GROUPS * (EMBED + EMBED)  # A: groups*r x d_in, B: groups*d x r per block


RANKS = {c: 2 if c % 2 == 0 else 8 for c in range(8)}  # rounds 1 and 2 sample one client of each rank


@pytest.mark.parametrize("variant", [HetLoRA, FLoRA], ids=["hetlora", "flora"])
def test_each_client_exchanges_its_own_rank_and_the_server_aggregates_as_the_paper_says(tmp_path, variant):
    torch.manual_seed(0)
    method = variant(rank=8, alpha=8, client_ranks=RANKS)
    module = tiny_module(method)
    start = trainable_state(module)
    uploads = Uploads()
    rounds = 2 if variant is FLoRA else 1
    trainer = tiny_trainer(tmp_path, num_rounds=rounds, clients_per_round=2, callbacks=[uploads], limit_val_batches=1)
    trainer.fit(module, datamodule=tiny_datamodule(num_clients=8, batch_size=64))
    server = next(cb for cb in trainer.callbacks if isinstance(cb, ServerAggregation))
    head = payload_bytes({k: v for k, v in start.items() if k.startswith("model.head.")})
    sent = uploads.rounds[-1]
    assert sorted(RANKS[c] for c in sent) == [2, 8]
    for client, (_, payload) in sent.items():  # float32 factors at the client's own rank, and the head
        assert payload_bytes(payload) == head + 4 * _factor_elements(RANKS[client])
    assert trainer.callback_metrics["comm/bytes_up"] == sum(payload_bytes(p) for _, p in sent.values())
    if variant is HetLoRA:  # HetLoRA: the zero-padded, sample-weighted mean; each downloads its own rank
        assert trainer.callback_metrics["comm/bytes_down"] == trainer.callback_metrics["comm/bytes_up"]
        total = sum(n for n, _ in sent.values())
        for name, value in server.global_state.items():
            padded = [method.from_client_view(p, c, 1, start)[name] for c, (_, p) in sent.items()]
            expected = sum(n / total * t for (n, _), t in zip(sent.values(), padded))
            torch.testing.assert_close(value, expected)
        return
    # FLoRA: round 2 sends each client the head and round 1's stacked factors (smaller than the dense update here)
    stack_bytes = 4 * sum(_factor_elements(RANKS[c]) for c in uploads.rounds[0])
    dense_bytes = 4 * BLOCKS * GROUPS * EMBED * EMBED
    assert stack_bytes < dense_bytes
    assert trainer.callback_metrics["comm/bytes_down"] == 2 * (head + stack_bytes)
    # B back to zero; the merged update is the exact sum over rounds of sum_k p_k * s * B_k @ A_k (s = 8 / 8)
    assert all(not server.global_state[k].any() for k in server.global_state if k.endswith("lora_B"))
    for index, layer in enumerate(method._layers):
        prefix = f"model.blocks.{index}.attn.qkv."
        products = torch.zeros(GROUPS * EMBED, EMBED, dtype=torch.float64)
        for round_sent in uploads.rounds:
            total = sum(n for n, _ in round_sent.values())
            for n, payload in round_sent.values():
                b, a = payload[prefix + "lora_B"].double(), payload[prefix + "lora_A"].double()
                r = b.shape[1]
                for g in range(GROUPS):
                    products[g * EMBED : (g + 1) * EMBED] += (
                        n / total * b[g * EMBED : (g + 1) * EMBED] @ a[g * r : (g + 1) * r]
                    )
        torch.testing.assert_close(layer.flora_delta[layer.lora_ind].double(), products, rtol=1e-4, atol=1e-7)
    # each round a client starts from a fresh A of its own rank, drawn for that round
    a_name = "model.blocks.0.attn.qkv.lora_A"
    fresh = [client_start(method, server.global_state, 1, r)[a_name].view(GROUPS, 8, -1) for r in (1, 2)]
    assert not torch.equal(fresh[0], fresh[1]) and not fresh[0][:, 8:].any()
    assert fresh[0][:, :8].any() and torch.equal(
        fresh[0], client_start(method, start, 1, 1)[a_name].view(GROUPS, 8, -1)
    )
