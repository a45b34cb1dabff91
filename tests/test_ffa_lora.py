"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a seeded random init, only B trains and travels."""

import pytest
import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer
from peft import LoraConfig

from fedpeft_pl import FedAvg, communication_report
from fedpeft_pl.aggregation import ServerAggregation
from fedpeft_pl.peft import FFALoRA, HFPeft, LoRA, load_trainable_state, trainable_parameters, trainable_state
from fedpeft_pl.strategies import ClientUpdate

METHODS = {
    "loralib": lambda: FFALoRA(rank=2, alpha=4),
    "hf": lambda: HFPeft(LoraConfig(r=2, lora_alpha=4, target_modules=["qkv"]), freeze_a=True),
}


def lora_a(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_A" in k}


@pytest.mark.parametrize("name", list(METHODS))
def test_two_builds_under_one_seed_draw_the_same_frozen_a(name):
    builds = []
    for seed, consumed in [(0, 0), (0, 1000), (1, 0)]:
        torch.manual_seed(seed)  # what seed_everything does before the CLI builds the model
        torch.rand(consumed)  # other draws before the build do not move A: it has its own stream
        builds.append(lora_a(tiny_module(METHODS[name]())))
    same, consumed, other_seed = builds
    assert same.keys() == consumed.keys() and len(same) == 2
    assert all(torch.equal(same[k], consumed[k]) for k in same)
    assert not any(torch.equal(same[k], other_seed[k]) for k in same)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_never_changes_and_only_b_and_the_head_travel(tmp_path, name):
    torch.manual_seed(0)
    module = tiny_module(METHODS[name](), lr=0.05)
    trainable = set(trainable_parameters(module))
    assert trainable and all("lora_B" in k or k.startswith("model.head.") for k in trainable)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}

    torch.manual_seed(0)
    plain = tiny_module(
        LoRA(rank=2, alpha=4) if name == "loralib" else HFPeft(LoraConfig(r=2, lora_alpha=4, target_modules=["qkv"]))
    )
    ffa, lora = communication_report(module, 2, 2), communication_report(plain, 2, 2)
    a_bytes = sum(v.numel() * 4 for k, v in trainable_state(plain).items() if "lora_A" in k)
    assert ffa.upload_bytes == lora.upload_bytes - a_bytes
    if name == "loralib":  # q and v of the fused qkv: A (2r x d) and B (2d x r) are the same size
        head_bytes = sum(v.numel() * 4 for k, v in trainable_state(plain).items() if k.startswith("model.head."))
        assert ffa.upload_bytes - head_bytes == (lora.upload_bytes - head_bytes) // 2

    trainer = tiny_trainer(tmp_path, num_rounds=2, clients_per_round=2)
    trainer.fit(module, datamodule=tiny_datamodule(num_clients=8, batch_size=64))
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trainable)  # A and backbone
    assert all(not torch.equal(before[k], after[k]) for k in trainable)
    server = next(cb for cb in trainer.callbacks if isinstance(cb, ServerAggregation))
    assert server.cumulative_bytes == 2 * 2 * (ffa.download_bytes + ffa.upload_bytes)


def lora_deltas(module):
    """Each adapted weight's update ``W_merged - W_frozen``, computed by the method's own export merge."""
    names = module.backbone_names
    merged, _ = module.peft.merge(module.model, names)
    frozen = module.model.state_dict()
    return {k: merged[k] - frozen[k] for k in names if "qkv.weight" in k}


@pytest.mark.parametrize("method", [FFALoRA, LoRA], ids=["ffa", "lora"])
def test_fedavg_of_b_with_a_common_a_is_the_average_of_the_updates(method):
    torch.manual_seed(0)
    module = tiny_module(method(rank=2, alpha=4))
    global_state = trainable_state(module)
    generator = torch.Generator().manual_seed(1)
    updates, deltas = [], []
    for client, samples in enumerate([10, 30, 60]):
        # a client's result: B (and in plain LoRA also A) trained away from the global state
        state = {k: v + torch.randn(v.shape, generator=generator) for k, v in global_state.items()}
        load_trainable_state(module, state)
        updates.append(ClientUpdate(client, samples, state))
        deltas.append(lora_deltas(module))
    load_trainable_state(module, FedAvg().aggregate_fit(1, global_state, updates))
    aggregated = lora_deltas(module)
    weights = [u.num_samples / 100 for u in updates]
    expected = {k: sum(w * d[k] for w, d in zip(weights, deltas)) for k in aggregated}
    exact = all(torch.allclose(aggregated[k], expected[k], atol=1e-5) for k in expected)
    # FFA-LoRA's average is exact; plain LoRA's separate averages of A and B are not
    assert exact == (method is FFALoRA)
