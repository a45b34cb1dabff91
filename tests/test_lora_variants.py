"""LoRA's variants as classes over plain LoRA, and LoRA's earlier arguments that still build them."""

import importlib
import warnings
from pathlib import Path

import loralib
import pytest
import torch
from helpers import tiny_module

from fedpeft_pl.cli import main
from fedpeft_pl.peft import FFALoRA, FLoRA, HetLoRA, LoRA, PerClientViews, method_spec, trainable_state

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lora": LoRA(rank=4, alpha=8),
    "ffa-lora": FFALoRA(rank=4, alpha=8),
    "hetlora": HetLoRA(rank=4, alpha=8, rank_choices=[1, 2, 4]),
    "flora": FLoRA(rank=4, alpha=8, client_ranks={0: 1}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_is_a_lora_class_that_states_its_capabilities(name):
    method = VARIANTS[name]
    assert isinstance(method, LoRA)
    assert loralib.MergedLinear in method.stacked_forwards()
    # only the variants whose clients exchange views of the state carry the per-client hooks
    views = name in ("hetlora", "flora")
    assert type(method).per_client_views is views and isinstance(method, PerClientViews) is views
    # export metadata names the class and its arguments, and builds it again without a warning
    spec = method_spec(method)
    module, _, cls = spec["class_path"].rpartition(".")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = getattr(importlib.import_module(module), cls)(**spec["init_args"])
    assert type(again) is type(method) and vars(again) == vars(method)


EARLIER = {
    "ffa-lora": ({"freeze_a": True}, FFALoRA, {}),
    "hetlora-choices": ({"rank_choices": [1, 2, 4]}, HetLoRA, {"rank_choices": [1, 2, 4]}),
    "hetlora-map": ({"client_ranks": {0: 1}, "aggregation": "average"}, HetLoRA, {"client_ranks": {0: 1}}),
    "flora": ({"rank_choices": [1, 2, 4], "aggregation": "stack"}, FLoRA, {"rank_choices": [1, 2, 4]}),
    "flora-one-rank": ({"aggregation": "stack"}, FLoRA, {}),
}


@pytest.mark.parametrize("name", list(EARLIER))
def test_loras_earlier_arguments_build_the_variant_and_name_its_class(name):
    earlier, variant, kwargs = EARLIER[name]
    with pytest.warns(DeprecationWarning, match=rf"write class_path: fedpeft_pl\.peft\.{variant.__name__}\b"):
        old = LoRA(rank=4, alpha=8, **earlier)
    new = variant(rank=4, alpha=8, **kwargs)
    assert type(old) is variant and vars(old) == vars(new)
    torch.manual_seed(0)
    old_module = tiny_module(old)
    torch.manual_seed(0)
    new_module = tiny_module(new)
    old_state, new_state = trainable_state(old_module), trainable_state(new_module)
    assert old_state.keys() == new_state.keys() and all(torch.equal(old_state[k], new_state[k]) for k in old_state)
    assert dict(old_module.model.named_buffers()).keys() == dict(new_module.model.named_buffers()).keys()
    if isinstance(new, PerClientViews):
        for client in range(4):
            assert old.client_rank(client) == new.client_rank(client)


def test_plain_lora_with_the_earlier_defaults_stays_plain_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method = LoRA(rank=4, freeze_a=False, client_ranks=None, rank_choices=None, aggregation="average")
    assert type(method) is LoRA


def test_the_earlier_yaml_form_runs_the_variant_and_says_what_to_write(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    overlay = tmp_path / "flora.yaml"
    overlay.write_text(
        "model:\n"
        "  peft:\n"
        "    class_path: fedpeft_pl.peft.LoRA\n"
        "    init_args: {rank: 4, alpha: 8.0, targets: [q, v], rank_choices: [1, 2, 4], aggregation: stack}\n"
    )
    main(["comm", "--config", "configs/quickstart.yaml", "--config", str(overlay)])
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].split(None, 1)[1].startswith("FLoRA(rank=4,")
    said = [line for line in captured.err.splitlines() if "deprecated" in line]
    assert said == [
        "fedpeft_pl.peft.LoRA with rank_choices and aggregation is deprecated: write class_path: "
        "fedpeft_pl.peft.FLoRA, keeping rank_choices and dropping aggregation"
    ]
