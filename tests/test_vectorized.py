"""The vectorised engine trains every client exactly as a plain sequential PyTorch loop would."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_backbone
from peft import LoraConfig

from fedpeft_pl import FederatedDataModule, FedPEFTModule
from fedpeft_pl.data import Digits
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.peft import (
    Adapter,
    Bias,
    FFALoRA,
    Full,
    Head,
    HFPeft,
    LoRA,
    Prompt,
    load_trainable_state,
    trainable_parameters,
    trainable_state,
)
from fedpeft_pl.runners.vectorized import ClientJob, PrivateTraining, train_clients

# unequal clients: 37 samples (3 batches, the last of 5), 20 (2 batches, the last of 4), 48 (3 full batches)
SIZES = [37, 20, 48]
BATCH = 16
EPOCHS = 2
CAPS = [10**6, 10**6, 4]  # the third client is a straggler: 4 of its 6 steps


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


def setup(peft, optimizer=sgd, **backbone):
    torch.manual_seed(0)
    module = FedPEFTModule(10, tiny_backbone(**backbone), peft, optimizer=optimizer)
    dm = FederatedDataModule(Digits(), num_clients=len(SIZES), batch_size=BATCH)
    dm.data_config = module.data_config
    dm.setup()
    rng = np.random.default_rng(0)
    pool = rng.permutation(len(dm.splits.train))
    starts = np.cumsum([0, *SIZES])
    dm.client_indices = [pool[a:b] for a, b in itertools.pairwise(starts)]
    return module, dm


def jobs_for(module, extras=lambda state: {}):
    state = trainable_state(module)
    return [
        ClientJob(c, seed=1000 + c, max_batches=CAPS[c], start=state, extras=extras(state)) for c in range(len(SIZES))
    ]


def sequential(module, dm, job, optimizer, mu=0.0):
    """The reference: one client, a fresh optimizer, the sequential loader's batches, the mean loss."""
    load_trainable_state(module, job.start)
    module.train()
    params = trainable_parameters(module)
    opt = optimizer(params.values())
    loader = dm.client_dataloader(job.client, job.seed)
    steps = 0
    for _ in range(EPOCHS):
        for images, labels in loader:
            if steps == job.max_batches:
                break
            loss = F.cross_entropy(module(images), labels)
            if mu:
                loss = loss + mu / 2 * sum(((p - job.start[n]) ** 2).sum() for n, p in params.items())
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return trainable_state(module), steps


def assert_states_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


METHODS = {
    "head": Head,
    "bias": Bias,
    "adapter-seq": lambda: Adapter(reduction_factor=8, sublayers=["attn", "mlp"]),
    "adapter-par": lambda: Adapter(reduction_factor=8, placement="parallel"),
    "prompt-shallow": lambda: Prompt(num_tokens=3, deep=False),
    "prompt-deep": lambda: Prompt(num_tokens=3, deep=True),
    "lora": lambda: LoRA(rank=2),
    "lora-qkv": lambda: LoRA(rank=2, targets=["q", "k", "v"]),
    "ffa-lora": lambda: FFALoRA(rank=2),
    "hf-lora": lambda: HFPeft(LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "fc2"])),
    "full": Full,
}
# what has no stacked form trains through vmap
VMAP_ONLY = {"full"}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_equals_sequential_training(name, monkeypatch):
    import fedpeft_pl.runners.vectorized as vectorized
    from fedpeft_pl.runners.stacked import engine_path

    module, dm = setup(METHODS[name]())
    if "lora" in name:  # B starts at zero; make it nonzero so both LoRA factors and their product matter
        with torch.no_grad():
            for p in trainable_parameters(module).values():
                p.add_(torch.randn_like(p) * 0.02)
    frozen = {n: t.clone() for n, t in module.state_dict().items() if n not in trainable_parameters(module)}
    jobs = jobs_for(module)
    path, why = engine_path(module)
    if name in VMAP_ONLY:
        assert (path, why) == (
            "vmap",
            f"{type(module.peft).__name__} has no stacked form (PEFTMethod.stacked_forwards)",
        )
    else:
        assert path == "stacked", why

        def no_vmap(*args, **kwargs):
            raise AssertionError("the stacked path does not use vmap")

        monkeypatch.setattr(vectorized, "vmap", no_vmap)
    outcomes = train_clients(module, dm, jobs, EPOCHS, sgd, max_parallel_clients=2 if name == "full" else None)
    # the module is untouched by vectorised training: frozen tensors bit-identical, trainable ones too
    assert all(torch.equal(t, module.state_dict()[n]) for n, t in frozen.items())
    assert_states_close(trainable_state(module), jobs[0].start, atol=0)
    for job, outcome in zip(jobs, outcomes):
        reference, steps = sequential(module, dm, job, sgd)
        assert outcome.steps == steps == min(CAPS[job.client], EPOCHS * -(-SIZES[job.client] // BATCH))
        assert_states_close(outcome.state, reference)


def test_adamw_per_client_exact_and_finished_clients_do_not_move():
    module, dm = setup(Adapter(reduction_factor=8), optimizer=adamw)
    jobs = jobs_for(module)
    # the first client stops after one step: its state is that step's, however long the others run
    jobs[0].max_batches = 1
    outcomes = train_clients(module, dm, jobs, EPOCHS, adamw)
    for job, outcome in zip(jobs, outcomes):
        reference, _ = sequential(module, dm, job, adamw)
        assert_states_close(outcome.state, reference)
    # a client with no step at all keeps what it received, bit for bit
    idle = ClientJob(1, seed=5, max_batches=0, start=jobs[1].start)
    (outcome,) = train_clients(module, dm, [idle, jobs[2]], EPOCHS, adamw)[:1]
    assert outcome.steps == 0
    assert_states_close(outcome.state, idle.start, atol=0)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda params: torch.optim.Adagrad(params, lr=0.05, weight_decay=1e-3),
        lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.9, centered=True),
        lambda params: torch.optim.Adam(params, lr=1e-3, amsgrad=True),
    ],
    ids=["adagrad", "rmsprop", "adam-amsgrad"],
)
def test_other_elementwise_optimizers_are_exact_per_client(optimizer):
    module, dm = setup(Head(), optimizer=optimizer)
    jobs = jobs_for(module)
    for job, outcome in zip(jobs, train_clients(module, dm, jobs, EPOCHS, optimizer)):
        reference, _ = sequential(module, dm, job, optimizer)
        assert_states_close(outcome.state, reference)


def test_fedprox_through_loss_term():
    mu = 0.5
    module, dm = setup(Bias())
    jobs = jobs_for(module, extras=lambda state: {f"anchor.{n}": t for n, t in state.items()})

    def proximal(params, extras):
        return mu / 2 * sum(((p - extras[f"anchor.{n}"]) ** 2).sum() for n, p in params.items())

    outcomes = train_clients(module, dm, jobs, EPOCHS, sgd, loss_term=proximal)
    plain = train_clients(module, dm, jobs, EPOCHS, sgd)
    for job, outcome, free in zip(jobs, outcomes, plain):
        reference, _ = sequential(module, dm, job, sgd, mu=mu)
        assert_states_close(outcome.state, reference)
        assert not torch.allclose(outcome.state["model.head.weight"], free.state["model.head.weight"], atol=1e-6)


def test_client_batches_are_the_loaders_batches():
    _, dm = setup(Head())
    for client in range(len(SIZES)):
        expected = []
        loader_sampler = dm._sampler
        dm.client_dataloader(client, 77)
        for _ in range(EPOCHS):
            expected += list(loader_sampler)
        assert dm.client_batches(client, 77, EPOCHS, 10**6) == expected
        assert dm.client_batches(client, 77, EPOCHS, 3) == expected[:3]


def test_non_elementwise_optimizer_is_refused():
    module, dm = setup(Head())
    lbfgs = lambda params: torch.optim.LBFGS(params)  # noqa: E731
    with pytest.raises(ConfigError, match="elementwise optimizer"):
        train_clients(module, dm, jobs_for(module), 1, lbfgs)


def test_stochastic_layers_still_learn():
    """With dropout and drop path the random draws differ from the sequential loop's; training still learns."""
    fast = lambda params: torch.optim.Adam(params, lr=1e-2)  # noqa: E731
    module, dm = setup(Prompt(num_tokens=3, dropout=0.3), kwargs={"drop_path_rate": 0.2})
    jobs = jobs_for(module)
    losses = []
    for _ in range(8):
        outcomes = train_clients(module, dm, jobs, 1, fast)
        losses.append(sum(o.loss_sum for o in outcomes) / sum(o.num_samples_seen for o in outcomes))
        jobs = [ClientJob(j.client, j.seed + 1, 10**6, o.state) for j, o in zip(jobs, outcomes)]
    assert losses[-1] < losses[0] - 0.1, losses


def test_local_dp_matches_the_sequential_private_gradient():
    """Without noise, each client's steps are LocalDP's clipped per-sample gradient sum over the expected batch size."""
    from fedpeft_pl.privacy import clipped_gradient_sum

    module, dm = setup(Bias())
    dm.poisson_sampling = True
    jobs = jobs_for(module)
    clip = 0.05
    expected_size = {c: min(1.0, BATCH / n) * n for c, n in enumerate(SIZES)}
    private = PrivateTraining(
        clip, noise=lambda client, like: torch.zeros_like(like), expected_batch_size=expected_size.__getitem__
    )
    outcomes = train_clients(module, dm, jobs, EPOCHS, sgd, private=private)
    for job, outcome in zip(jobs, outcomes):
        for sub in module.modules():  # as LocalDP.attach does: timm's fused attention has no vmap rule on CPU
            if hasattr(sub, "fused_attn"):
                sub.fused_attn = False
        load_trainable_state(module, job.start)
        module.train()
        params = trainable_parameters(module)
        opt = sgd(params.values())
        for batch in dm.client_batches(job.client, job.seed, EPOCHS, job.max_batches):
            images, labels = (
                torch.stack(t) if i == 0 else torch.tensor(t)
                for i, t in enumerate(zip(*[dm.splits.train[j] for j in batch]))
            )
            sums, _ = clipped_gradient_sum(module, images, labels, clip)
            opt.zero_grad()
            for n, p in params.items():
                p.grad = sums[n] / expected_size[job.client]
            opt.step()
        assert_states_close(outcome.state, trainable_state(module))


def test_head_on_cached_features_equals_training_through_the_backbone():
    from fedpeft_pl.runners.feature_cache import HeadProbe, cache_features, feature_datamodule

    module, dm = setup(Head())
    jobs = jobs_for(module)
    through = train_clients(module, dm, jobs, EPOCHS, sgd)
    features = cache_features(module.model, dm.splits.train)
    cached = train_clients(HeadProbe(module.model), feature_datamodule(dm, features), jobs, EPOCHS, sgd)
    for a, b in zip(through, cached):
        assert a.steps == b.steps
        assert_states_close(a.state, b.state)
    with pytest.raises(ConfigError, match="linear probing only"):
        cache_features(setup(Bias())[0].model, dm.splits.train)


def test_a_chunk_out_of_device_memory_trains_again_in_halves(monkeypatch, caplog):
    """CUDA running out of memory on a chunk of clients halves the chunk: the same states, a warning, the new size
    reported."""
    import fedpeft_pl.runners.vectorized as vectorized

    module, dm = setup(Bias())
    jobs = jobs_for(module)
    expected = train_clients(module, dm, jobs, EPOCHS, sgd)
    real = vectorized._train_chunk
    tried = []

    def small_device(module, datamodule, part, *args):
        tried.append(len(part))
        if len(part) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(module, datamodule, part, *args)

    monkeypatch.setattr(vectorized, "_train_chunk", small_device)
    sizes = []
    with caplog.at_level("WARNING", logger="fedpeft_pl.runners.vectorized"):
        outcomes = train_clients(module, dm, jobs, EPOCHS, sgd, on_smaller_chunks=sizes.append)
    assert tried == [len(jobs)] + [1] * len(jobs) and sizes == [1]
    assert "ran out of device memory; training 1 at a time" in caplog.text
    assert [o.client for o in outcomes] == [j.client for j in jobs]
    for got, want in zip(outcomes, expected):
        assert got.steps == want.steps
        assert_states_close(got.state, want.state)

    # under local DP a failed chunk has drawn noise already: the error is the user's to see
    dm.poisson_sampling = True
    private = PrivateTraining(0.1, noise=lambda client, like: torch.zeros_like(like), expected_batch_size=lambda c: 4.0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train_clients(module, dm, jobs, EPOCHS, sgd, private=private)


def test_a_classifier_on_features_is_one_batched_matrix_product():
    """The engine's fast path for a Linear head on cached features computes what vmap over functional_call does."""
    from torch.func import functional_call, vmap

    from fedpeft_pl.runners.feature_cache import HeadProbe
    from fedpeft_pl.runners.vectorized import _linear_forward, _model_of

    module, _ = setup(Head())
    probe = HeadProbe(module.model)
    model, prefix = _model_of(probe)
    names = list(trainable_parameters(probe))
    fast = _linear_forward(model, names, prefix)
    assert fast is not None
    d, classes = model.head.in_features, model.head.out_features
    params = {"head.weight": torch.randn(3, classes, d), "head.bias": torch.randn(3, classes)}
    features = torch.randn(3, 5, d)
    slow = vmap(lambda p, x: functional_call(model, p, (x,)))(params, features)
    torch.testing.assert_close(fast(params, features), slow, rtol=0, atol=1e-5)
    # a network that is more than the classifier, or a Head with other trained tensors, takes vmap
    vit, vit_prefix = _model_of(module)
    assert _linear_forward(vit, list(trainable_parameters(module)), vit_prefix) is None
    assert _linear_forward(model, names[:1], prefix) is None


def _contributing_module(tmp_path, monkeypatch, first_line, name):
    import re
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith(first_line))
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return __import__(name)


def test_the_contributing_stacked_example(tmp_path, monkeypatch):
    """A user's method with a stacked form trains on the stacked path, exactly; one without says why it takes vmap."""
    from fedpeft_pl.runners.stacked import engine_path

    stacked_example = _contributing_module(tmp_path, monkeypatch, "# my_stacked_methods.py", "my_stacked_methods")
    plain_example = _contributing_module(tmp_path, monkeypatch, "# my_methods.py", "my_methods")
    module, dm = setup(stacked_example.StackedScaleShift())
    with torch.no_grad():  # away from the identity, so every client's own scale and shift matter
        for p in trainable_parameters(module).values():
            p.add_(torch.randn_like(p) * 0.05)
    assert engine_path(module) == ("stacked", "StackedScaleShift has a stacked form")
    assert engine_path(module, private=True) == ("vmap", "local DP needs per-sample gradients")
    jobs = jobs_for(module)
    for job, outcome in zip(jobs, train_clients(module, dm, jobs, EPOCHS, sgd)):
        reference, _ = sequential(module, dm, job, sgd)
        assert_states_close(outcome.state, reference)

    plain, _ = setup(plain_example.ScaleShift())
    assert engine_path(plain) == ("vmap", "ScaleShift has no stacked form (PEFTMethod.stacked_forwards)")
    # a mapping that lacks the type of a module holding a trainable tensor: vmap, and which module says why
    monkeypatch.setattr(stacked_example.StackedScaleShift, "stacked_forwards", lambda self: {torch.nn.Linear: None})
    assert engine_path(module) == (
        "vmap",
        "StackedScaleShift has no stacked forward for ScaleShiftParams, which holds model.blocks.0.ssf.scale",
    )


def test_the_stacked_path_equals_vmap_in_one_step():
    """Both paths compute the same per-client logits for stacked tensors that differ per client (LoRA q, k, v)."""
    from torch.func import functional_call, vmap

    from fedpeft_pl.runners.stacked import stacked_forward, stacked_forwards_of

    module, _ = setup(LoRA(rank=2, targets=["q", "k", "v"]))
    model = module.model
    model.eval()
    names = [n[len("model.") :] for n in trainable_parameters(module)]
    params = {n: torch.randn(3, *dict(model.named_parameters())[n].shape) * 0.1 for n in names}
    images = torch.randn(3, 4, 3, 32, 32)
    forwards, _ = stacked_forwards_of(module)
    fast = stacked_forward(model, forwards)(params, images)
    for sub in model.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = False
    slow = vmap(lambda p, x: functional_call(model, p, (x,)))(params, images)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    assert not any("forward" in sub.__dict__ for sub in model.modules())  # every override removed


def test_a_per_client_bias_under_bf16_autocast_keeps_one_copy_of_the_frozen_weight():
    """Bias's stacked Linear casts the frozen weight once, then expands it over the clients: autocast must not
    write (and keep for backward) one bf16 copy per client; the output is the per-client F.linear's."""
    from fedpeft_pl.peft.base import stacked_linear

    clients, rows, width = 8, 5, 64
    layer = torch.nn.Linear(width, 3 * width)
    bias = (torch.randn(clients, 3 * width) * 0.1).requires_grad_(True)
    x = torch.randn(
        clients * rows, width, requires_grad=True
    )  # as activations are: the weight is kept for its gradient
    kept: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t.untyped_storage().nbytes())
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stacked_linear(layer, {"bias": bias}, x)
    out.float().sum().backward()
    weight_bf16 = layer.weight.numel() * 2
    assert out.dtype == torch.bfloat16 and bias.grad is not None
    assert max(kept) < 2 * weight_bf16, (kept, weight_bf16)  # one copy, not one per client
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.cat([F.linear(x[k * rows : (k + 1) * rows], layer.weight, bias[k]) for k in range(clients)])
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
