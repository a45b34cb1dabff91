import loralib
import pytest
import timm
import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer

from fedpeft_pl import ConfigError, FederatedCallback, payload_bytes
from fedpeft_pl.peft import (
    Adapter,
    Bias,
    FFALoRA,
    Full,
    Head,
    HetLoRA,
    LoRA,
    PEFTMethod,
    PerClientViews,
    Prompt,
    trainable_parameters,
    trainable_state,
)

METHODS = {
    "head": Head(),
    "bias": Bias(),
    "adapter-sequential": Adapter(reduction_factor=4),
    "adapter-houlsby": Adapter(reduction_factor=4, sublayers=["attn", "mlp"]),
    "adapter-parallel": Adapter(reduction_factor=4, placement="parallel"),
    "prompt-deep": Prompt(num_tokens=3, deep=True),
    "prompt-shallow": Prompt(num_tokens=3, deep=False, dropout=0.1),
    "lora": LoRA(rank=2, alpha=4),
    "ffa-lora": FFALoRA(rank=2, alpha=4),
    "hetlora": HetLoRA(rank=2, alpha=4, client_ranks={1: 1}),
    "full": Full(),
}


def vit_b16(peft: PEFTMethod) -> torch.nn.Module:
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    peft.apply(model)
    return model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())


@pytest.mark.parametrize(
    ("peft", "expected"),
    [
        (Full(), 85_875_556),
        (Head(), 76_900),
        (Bias(), 179_812),
        (Prompt(num_tokens=10, deep=True), 169_060),
        (Prompt(num_tokens=10, deep=False), 7_680 + 76_900),
        (LoRA(rank=8, targets=["q", "v"]), 12 * (2 * 8 * 768 + 2 * 768 * 8) + 76_900),
        (Adapter(reduction_factor=64), 12 * (768 * 12 + 12 + 12 * 768 + 768) + 76_900),
        (Adapter(reduction_factor=64, sublayers=["attn", "mlp"]), 24 * (768 * 12 + 12 + 12 * 768 + 768) + 76_900),
    ],
    ids=["full", "head", "bias", "prompt-deep", "prompt-shallow", "lora", "adapter", "adapter-houlsby"],
)
def test_vit_b16_trainable_parameter_counts(peft, expected):
    assert count(vit_b16(peft)) == expected


def test_prompt_deep_count_splits_into_prompts_and_head():
    params = trainable_parameters(vit_b16(Prompt(num_tokens=10, deep=True)))
    prompts = sum(p.numel() for n, p in params.items() if "prompt" in n)
    assert prompts == 92_160 and sum(p.numel() for p in params.values()) - prompts == 76_900


@pytest.mark.parametrize("peft", list(METHODS.values()), ids=list(METHODS))
def test_backbone_parameter_names_survive_attach(peft):
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)
    peft.apply(model)
    assert set(plain.state_dict()) <= set(model.state_dict())


@pytest.mark.parametrize("name", ["adapter-sequential", "adapter-houlsby", "adapter-parallel", "lora", "ffa-lora"])
def test_adapters_and_lora_start_as_the_identity(name):
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)
    model.load_state_dict(plain.state_dict())
    METHODS[name].apply(model)
    model.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), plain.eval()(x))


def test_adapter_init_is_trainable_not_all_zero():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=1)
    Adapter(reduction_factor=4).apply(model)
    adapter = model.blocks[0].mlp.adapter
    assert adapter.down.weight.abs().sum() > 0, "an all-zero down-projection never receives a gradient"
    assert adapter.up.weight.abs().sum() == 0


def test_prompts_leave_before_pooling():
    """Prompt tokens run through the blocks but pooling sees the usual token layout."""
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2, global_pool="avg"
    )
    Prompt(num_tokens=5, deep=True).apply(model)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = output.shape[1]

        return hook

    model.blocks[1].register_forward_hook(record("block"))
    model.norm.register_forward_hook(record("norm"))
    model(torch.randn(2, 3, 32, 32))
    assert seen == {"block": 1 + 5 + 64, "norm": 1 + 64}


def test_deep_prompts_replace_rather_than_accumulate():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=3)
    Prompt(num_tokens=4, deep=True).apply(model)
    outputs = []

    def record(module, args, output):
        outputs.append(output.shape[1])

    for block in model.blocks:
        block.register_forward_hook(record)
    model(torch.randn(1, 3, 32, 32))
    assert outputs == [1 + 4 + 64] * 3


def test_lora_is_never_merged_into_the_shared_weight():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=1)
    LoRA(rank=2).apply(model)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, loralib.MergedLinear)
    with torch.no_grad():
        qkv.lora_B.normal_()
    weight = qkv.weight.detach().clone()
    model.eval()
    model.train()
    model.eval()
    assert not qkv.merged
    assert torch.equal(qkv.weight, weight)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_round_moves_every_trainable_tensor_and_nothing_else(tmp_path, name):
    """After one round only the method's tensors changed, each of them moved, the backbone is bit-identical."""
    torch.manual_seed(0)
    module = tiny_module(METHODS[name], lr=0.05)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainable = set(trainable_parameters(module))
    trainer = tiny_trainer(tmp_path, num_rounds=1, clients_per_round=2)
    trainer.fit(module, datamodule=tiny_datamodule(num_clients=4, batch_size=64))
    after = module.state_dict()
    frozen_changed = [k for k in before if k not in trainable and not torch.equal(before[k], after[k])]
    unmoved = [k for k in trainable if torch.equal(before[k], after[k])]
    assert not frozen_changed, f"frozen tensors changed: {frozen_changed}"
    assert not unmoved, f"trainable tensors did not move: {unmoved}"


@pytest.mark.parametrize(
    "make",
    [
        lambda: Adapter(reduction_factor=0),
        lambda: Adapter(placement="diagonal"),
        lambda: Adapter(sublayers=[]),
        lambda: Prompt(num_tokens=0),
        lambda: Prompt(dropout=1.0),
        lambda: LoRA(rank=0),
        lambda: LoRA(targets=["o"]),
    ],
)
def test_invalid_method_arguments_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


def test_a_method_that_trains_nothing_is_refused():
    class Nothing(PEFTMethod):
        def attach(self, model):
            pass

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=1)
    with pytest.raises(ConfigError, match="no tensor"):
        Nothing().apply(model)


# what only a method whose clients exchange different tensors needs (heterogeneous LoRA ranks, FLoRA)
PER_CLIENT_HOOKS = {
    "client_view",
    "from_client_view",
    "aggregate",
    "pending_download_bytes",
    "delivered",
    "server_state",
    "load_server_state",
    "model_update",
    "load_model_update",
}


def test_the_base_class_is_small_and_a_simple_method_implements_one_or_two_hooks():
    assert {name for name in dir(PEFTMethod) if not name.startswith("_")} == {
        "apply",
        "attach",
        "merge",
        "local_names",
        "train_head",
        "stacked_forwards",
        "per_client_views",
    }
    assert PEFTMethod.__abstractmethods__ == {"attach"} and PEFTMethod.per_client_views is False
    for simple in (Head, Bias, Full):
        assert {name for name in vars(simple) if not name.startswith("_")} <= {"attach", "stacked_forwards"}
        assert not PER_CLIENT_HOOKS & set(dir(simple))
    assert PER_CLIENT_HOOKS <= set(dir(PerClientViews)) and PerClientViews.per_client_views is True
    assert PerClientViews.__abstractmethods__ == {"attach", "client_view", "from_client_view"}


class BitFitHeadOnOddClients(PerClientViews, Bias):
    """PerClientViews' docstring example: only the two view hooks."""

    def client_view(self, state, client, server_round, upload):
        if client % 2 == 0:
            return state
        return {k: v for k, v in state.items() if k.startswith("model.head.")}

    def from_client_view(self, view, client, server_round, like):
        return {k: view.get(k, like[k]) for k in like}


class Uploads(FederatedCallback):
    def __init__(self):
        self.sent = {}

    def on_client_end(self, trainer, pl_module, round, result):
        self.sent[result.client] = dict(result.payload)


def test_a_method_with_only_the_two_view_hooks_runs_a_round(tmp_path):
    torch.manual_seed(0)
    method = BitFitHeadOnOddClients()
    module = tiny_module(method)
    start = trainable_state(module)
    head = {k: v for k, v in start.items() if k.startswith("model.head.")}
    uploads = Uploads()
    trainer = tiny_trainer(tmp_path, clients_per_round=2, callbacks=[uploads], limit_val_batches=1)
    trainer.fit(module, datamodule=tiny_datamodule(num_clients=2))
    assert sorted(uploads.sent) == [0, 1]
    for client, payload in uploads.sent.items():
        assert payload.keys() == (start.keys() if client % 2 == 0 else head.keys())
    sent = payload_bytes(start) + payload_bytes(head)
    assert trainer.callback_metrics["comm/bytes_up"] == trainer.callback_metrics["comm/bytes_down"] == sent
    moved = trainable_state(module)
    assert all(not torch.equal(start[k], moved[k]) for k in start)  # the biases from the even client
