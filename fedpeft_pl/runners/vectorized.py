"""Train a round's clients at once through the one frozen backbone.

With PEFT every client shares the frozen backbone and differs only in a few small tensors, so
``m`` clients can train in one batched forward and backward: the trainable tensors are stacked
with a leading client dimension, ``torch.func.vmap`` maps ``functional_call`` over that dimension,
and the frozen tensors stay unbatched (taken from the module, never copied), so the backbone's
matrices multiply ``m x B`` samples at once.

What makes it the same training as the sequential client loop, client by client:

- **Data.** Each client's batches are exactly those its ``client_dataloader(client, seed)`` would
  yield (:meth:`FederatedDataModule.client_batches`), in the same order.
- **Unequal clients.** Step ``t`` stacks the ``t``-th batch of every client; batches are padded to
  the longest, and each client's loss is its own masked mean (the sequential loader's mean of a
  short batch). A client whose local work is done (all epochs, or its straggler cap) is inactive:
  its loss is zero and, after the optimizer step, its rows of the parameters and of every optimizer
  state tensor are put back, so its momentum, Adam moments and weight decay are frozen too.
- **Optimizer.** The user's optimizer is built over the stacked tensors. SGD (momentum, nesterov,
  weight decay), Adam and AdamW are elementwise, so each row follows exactly the per-client
  optimizer; Adam's scalar step count is shared, which is exact because active clients have all
  taken the same number of steps (every client starts at step 0 and steps until it is done).
  Optimizers that are not elementwise are refused.
- **Randomness.** Dropout and drop-path draw from one stream per chunk (forked from the first
  client's seed), not from each client's own stream as in the sequential loop; with stochastic
  layers the random draws therefore differ, everything else (data, order, optimizer) is the same.

Example::

    jobs = [ClientJob(c, derive_seed(seed, rnd, c), max_batches=10**9, start=trainable_state(module)) for c in clients]
    outcomes = train_clients(module, datamodule, jobs, local_epochs=2, optimizer_factory=module.optimizer_factory)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientContext, ClientResult
from fedpeft_pl.peft import trainable_parameters
from fedpeft_pl.runners.base import ClientExecutor, RunnerHost, client_metrics
from fedpeft_pl.runners.choice import autocast_for
from fedpeft_pl.runners.device_data import DeviceData, step_batches
from fedpeft_pl.runners.feature_cache import HeadProbe
from fedpeft_pl.runners.optim import check_optimizer, masked_step
from fedpeft_pl.runners.sequential import SequentialRunner
from fedpeft_pl.runners.stacked import stacked_forward, stacked_forwards_of
from fedpeft_pl.seeds import LOCAL_TRAINING, client_seed, derive_seed, training_seed
from fedpeft_pl.strategies import Strategy

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass
class ClientJob:
    """One client's local training in a vectorised round.

    Args:
        client: the client's index in the data module.
        seed: the seed of its data order, ``client_seed(seed, round, client)`` (``DATA_ORDER``).
        max_batches: its step cap (a straggler's), over all local epochs.
        start: the state it received, by trainable tensor name.
        extras: per-client tensors handed to ``loss_term`` and ``grad_correction`` (e.g. FedProx's
            anchor, SCAFFOLD's control variates); every job must have the same keys and shapes.
        training_seed: the seed of the torch generator during its training (dropout, drop path),
            ``training_seed(seed, round, client)`` (``LOCAL_TRAINING``); by default derived from
            ``seed`` under that key, so the two never share a stream. A chunk of clients trained
            at once draws from its first client's.
        context: the client's :class:`ClientContext` (what it received, its own state, the round's
            config, its learning rate), which the strategy's client hooks see when ``train_clients``
            is given a ``strategy``; ``steps`` is set as it trains.
    """

    client: int
    seed: int
    max_batches: int
    start: State
    extras: State = field(default_factory=dict)
    training_seed: Optional[int] = None
    context: Optional[ClientContext] = None

    def torch_seed(self) -> int:
        """The seed of the torch generator while this job (first of its chunk) trains."""
        return self.training_seed if self.training_seed is not None else derive_seed(self.seed, LOCAL_TRAINING)


@dataclass
class ClientOutcome:
    """What one client's vectorised local training produced.

    ``loss_sum`` is the sum of per-sample training losses (cross entropy, without the strategy's
    ``loss_term``) over every step, ``num_samples_seen`` the samples those steps used, ``steps`` the
    optimizer steps taken.
    """

    client: int
    state: State
    loss_sum: float
    num_samples_seen: int
    steps: int


@dataclass
class PrivateTraining:
    """Local DP-SGD inside the vectorised engine (the math of :class:`~fedpeft_pl.privacy.LocalDP`).

    Each sample's gradient of the cross entropy is clipped to ``max_grad_norm``, the clipped
    gradients are summed, ``noise(client, like)`` is added (the caller draws it, from the client's
    own stream, with standard deviation ``sigma_k * max_grad_norm``) and the sum is divided by
    ``expected_batch_size(client)``. Batches must be Poisson samples (the data module's
    ``poisson_sampling``). ``loss_term``'s gradient is added after, without clipping or noise.

    Args:
        max_grad_norm: C.
        noise: ``noise(client, like) -> Tensor`` shaped like ``like``.
        expected_batch_size: ``expected_batch_size(client) -> float``, ``q_k * n_k``.
        chunk_size: each client's samples per ``vmap`` call (LocalDP's ``chunk_size``); bounds the
            memory of the per-sample gradients to ``m * chunk_size`` copies of the trainable tensors.
    """

    max_grad_norm: float
    noise: Callable[[int, torch.Tensor], torch.Tensor]
    expected_batch_size: Callable[[int], float]
    chunk_size: int = 32


@contextlib.contextmanager
def vectorisable(module: torch.nn.Module, explicit_attention: bool = True) -> Iterator[None]:
    """Train mode and (for the vmap path) timm's explicit attention for the duration (restored after).

    ``scaled_dot_product_attention`` cannot be trained under vmap: on CPU it has no batching rule
    (vmap falls back to a slow per-client loop), and on CUDA (torch 2.11, H200) the backward of
    the batched efficient kernel fails ("LSE is not correctly aligned"). timm's
    ``fused_attn=False`` path computes the same function with plain ops.
    """
    switched = [m for m in module.modules() if getattr(m, "fused_attn", False)] if explicit_attention else []
    was_training = module.training
    for m in switched:
        m.fused_attn = False
    module.train()
    try:
        yield
    finally:
        for m in switched:
            m.fused_attn = True
        module.train(was_training)


def train_clients(
    module: torch.nn.Module,
    datamodule: Any,
    jobs: Sequence[ClientJob],
    local_epochs: int,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer],
    *,
    loss_term: Optional[Callable[[State, State], torch.Tensor]] = None,
    grad_correction: Optional[Callable[[State, State], State]] = None,
    private: Optional[PrivateTraining] = None,
    autocast: Optional[Callable[[], Any]] = None,
    max_parallel_clients: Optional[int] = None,
    device: Optional[torch.device] = None,
    on_smaller_chunks: Optional[Callable[[int], None]] = None,
    stacked: bool = True,
    strategy: Optional[Strategy] = None,
) -> list[ClientOutcome]:
    """Train ``jobs`` simultaneously; the module's own trainable tensors are left as they were.

    Args:
        module: a ``FedPEFTModule`` (or any module whose ``model`` maps images to logits); its
            trainable parameters (``requires_grad``) are what each client trains.
        datamodule: a set-up ``FederatedDataModule``; batches come from ``client_batches``.
        jobs: the clients to train.
        local_epochs: passes over each client's data (capped by each job's ``max_batches``).
        optimizer_factory: called once per chunk with the stacked trainable tensors; must return
            an elementwise optimizer (SGD, Adam, AdamW, Adagrad, RMSprop).
        loss_term: ``loss_term(params_k, extras_k) -> scalar`` added to each client's loss
            (vmapped over clients), e.g. FedProx's ``mu / 2 * ||w - anchor||^2``.
        grad_correction: ``grad_correction(grads_k, extras_k) -> grads`` applied to each client's
            gradient before the step (vmapped), e.g. SCAFFOLD's ``g - c_k + c``.
        private: local DP-SGD settings; None trains without privacy.
        autocast: a factory of the context to run the forward in, e.g.
            ``lambda: torch.autocast("cpu", dtype=torch.bfloat16)``.
        max_parallel_clients: at most this many clients train at once (bounds memory); the
            round's clients are trained in chunks of this size. None: all at once. A chunk that
            runs out of CUDA memory is trained again in halves (with a warning), except under
            local DP.
        device: where to train; defaults to the device of the module's parameters.
        on_smaller_chunks: called with the new chunk size when out-of-memory halved it.
        stacked: train on the stacked path where the module's PEFT method has a stacked form
            (:mod:`fedpeft_pl.runners.stacked`; not under local DP); False: always vmap.
        strategy: a strategy whose client hooks (``client_loss``, ``client_gradient``) run for
            each client with its job's ``context``, as on the sequential runner (every job needs
            one); its ``extras`` must then hold the context's tensors as ``received.<name>``,
            ``extras.<key>`` and ``state.<key>``. Instead of ``loss_term`` and ``grad_correction``.

    Returns:
        one :class:`ClientOutcome` per job, in the order of ``jobs``.

    Example::

        outcomes = train_clients(module, dm, jobs, 1, module.optimizer_factory, max_parallel_clients=32,
                                 loss_term=lambda p, e: 0.005 * sum(((p[n] - e[n]) ** 2).sum() for n in p))
    """
    if local_epochs < 1:
        raise ConfigError(f"local_epochs must be >= 1, got {local_epochs}")
    if max_parallel_clients is not None and max_parallel_clients < 1:
        raise ConfigError(f"max_parallel_clients must be >= 1, got {max_parallel_clients}")
    if private is not None and not getattr(datamodule, "poisson_sampling", False):
        raise ConfigError("vectorised local DP needs Poisson batches; set datamodule.poisson_sampling = True")
    chunk = max_parallel_clients or max(1, len(jobs))
    if device is None:
        device = next(iter(trainable_parameters(module).values())).device
    # the stacked path runs the plain model on the folded batch (fused attention kept); else vmap
    forwards = stacked_forwards_of(module)[0] if stacked and private is None else None
    outcomes: list[ClientOutcome] = []
    with vectorisable(module, explicit_attention=forwards is None):
        start = 0
        while start < len(jobs):
            part = list(jobs[start : start + chunk])
            try:
                outcomes += _train_chunk(
                    module,
                    datamodule,
                    part,
                    local_epochs,
                    optimizer_factory,
                    loss_term,
                    grad_correction,
                    private,
                    autocast,
                    device,
                    forwards,
                    strategy,
                )
                start += len(part)
                continue
            except torch.cuda.OutOfMemoryError:
                # a chunk has no side effects until it returns, so it can run again in halves; not
                # under local DP, whose noise draws a failed chunk has already taken
                if private is not None or len(part) == 1:
                    raise
            # out of the except block, the failed chunk's frames and tensors are released
            chunk = max(1, len(part) // 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning(
                f"vectorised client runner: {len(part)} clients at once ran out of device memory; "
                f"training {chunk} at a time from now on (set trainer.max_parallel_clients: {chunk} to start there)",
                extra={"each_process": True},  # under DDP, this process's device
            )
            if on_smaller_chunks is not None:
                on_smaller_chunks(chunk)
    return outcomes


def _model_of(module: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The network that maps images to logits, and the prefix of its tensors' names in ``module``."""
    inner = getattr(module, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner, "model."
    return module, ""


def _train_chunk(
    module: torch.nn.Module,
    datamodule: Any,
    jobs: list[ClientJob],
    local_epochs: int,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer],
    loss_term: Optional[Callable[[State, State], torch.Tensor]],
    grad_correction: Optional[Callable[[State, State], State]],
    private: Optional[PrivateTraining],
    autocast: Optional[Callable[[], Any]],
    device: torch.device,
    forwards: Optional[Any] = None,
    strategy: Optional[Strategy] = None,
) -> list[ClientOutcome]:
    model, prefix = _model_of(module)
    names = list(trainable_parameters(module))
    if not all(n.startswith(prefix) for n in names):
        raise ConfigError("the vectorised runner trains the tensors of module.model only")
    m = len(jobs)
    for job in jobs:
        if job.start.keys() != set(names):
            raise ConfigError(f"client {job.client}'s start state does not match the module's trainable tensors")
        if job.extras.keys() != jobs[0].extras.keys():
            raise ConfigError("every ClientJob of a round must have the same extras")

    # stacked per-client copies of the trainable tensors: the leaves the optimizer updates
    stacked = [torch.stack([job.start[n].to(device) for job in jobs]).detach().requires_grad_(True) for n in names]
    extras = {k: torch.stack([job.extras[k].to(device) for job in jobs]) for k in jobs[0].extras}
    optimizer = optimizer_factory(stacked)
    check_optimizer(optimizer)
    hooks = _StrategyHooks(strategy, jobs, extras) if strategy is not None else None
    adds_loss = hooks.adds_loss if hooks is not None else loss_term is not None
    corrects_gradients = hooks.corrects_gradients if hooks is not None else grad_correction is not None

    plans = [datamodule.client_batches(job.client, job.seed, local_epochs, job.max_batches) for job in jobs]
    num_steps = max((len(p) for p in plans), default=0)
    # each step's stacked batches: gathered from samples transformed once, or read by the data module's workers
    workers, seed = getattr(datamodule, "num_workers", 0), jobs[0].torch_seed() if jobs else 0
    steps = step_batches(datamodule.splits.train, plans, device, workers, seed)
    # summed on the device: no host synchronisation inside the step loop
    loss_sums = torch.zeros(m, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    seen = [0] * m

    def inner_names(params: list[torch.Tensor]) -> State:
        return {n[len(prefix) :]: p for n, p in zip(names, params)}

    def forward(params: State, images: torch.Tensor) -> torch.Tensor:
        # frozen tensors are not passed: functional_call takes them from the module, unbatched
        return functional_call(model, params, (images,))

    batched_forward = (
        _linear_forward(model, names, prefix)
        or (stacked_forward(model, forwards) if forwards is not None else None)
        or vmap(forward, in_dims=(0, 0), randomness="different")
    )
    outer = lambda params: dict(zip(names, params.values()))  # noqa: E731 (inner -> outer names)

    def one_client(params: State, images: torch.Tensor) -> torch.Tensor:
        # a single client (a round of one, a chunk of one, the last straggler's steps): the plain model with
        # its tensors, the same arithmetic without the stacked forms' bookkeeping (3 to 4% at 1 x 256 on a CPU)
        return functional_call(model, {n: p[0] for n, p in params.items()}, (images[0],)).unsqueeze(0)

    def terms_of(params: list[torch.Tensor], rows: list[int], step: int) -> torch.Tensor:
        """The loss term of each client of ``rows`` (its ``params``), as before its ``step``-th step."""
        if hooks is not None:
            return hooks.loss(outer(inner_names(params)), rows, step)
        assert loss_term is not None
        index = torch.tensor(rows, device=device)
        return vmap(loss_term)(outer(inner_names(params)), {k: v.index_select(0, index) for k, v in extras.items()})

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        # dropout and drop path draw from the training stream, never from the data-order one
        torch.manual_seed(jobs[0].torch_seed() if jobs else 0)
        for step in range(num_steps):
            active = [step < len(p) for p in plans]
            # only the clients with a step left run through the model: a client whose local work is
            # done costs nothing (its rows get no gradient, and _masked_step keeps them as they are)
            rows = [k for k, a in enumerate(active) if a]
            rows_index = torch.tensor(rows, device=device)
            index = None if len(rows) == m else rows_index

            def pick(t: torch.Tensor, index: Optional[torch.Tensor] = index) -> torch.Tensor:
                return t if index is None else t.index_select(0, index)

            params = [pick(p) for p in stacked]  # a differentiable gather: gradients reach the stacked rows
            batches = [plans[k][step] for k in rows]
            images, labels, mask = next(steps)
            counts = mask.sum(dim=1)
            for k, b in zip(rows, batches):
                seen[k] += len(b)
            optimizer.zero_grad(set_to_none=True)
            if private is None:
                step_forward = one_client if len(rows) == 1 and forwards is not None else batched_forward
                with autocast() if autocast is not None else contextlib.nullcontext():
                    logits = step_forward(inner_names(params), images)
                per_sample = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(
                    len(rows), -1
                )
                per_client = (per_sample * mask).sum(dim=1)
                loss_sums.index_add_(0, rows_index, per_client.detach().to(loss_sums.dtype))
                loss = (per_client / counts.clamp(min=1)).sum()
                if adds_loss:
                    loss = loss + terms_of(params, rows, step).sum()
                loss.backward()
            else:
                gradients, per_client = _private_gradients(
                    model, prefix, names, params, images, labels, mask, [jobs[k] for k in rows], private, autocast
                )
                loss_sums.index_add_(0, rows_index, per_client.detach().to(loss_sums.dtype))
                if adds_loss:
                    terms = terms_of(params, rows, step)
                    extra_grads = torch.autograd.grad(terms.sum(), params, allow_unused=True)
                    gradients = [g if e is None else g + e for g, e in zip(gradients, extra_grads)]
                for p, g in zip(stacked, gradients):
                    if index is None:
                        p.grad = g.to(p.dtype)
                    else:
                        p.grad = torch.zeros_like(p).index_copy_(0, index, g.to(p.dtype))
            if corrects_gradients:
                grads = {n: p.grad for n, p in zip(names, stacked)}
                if hooks is not None:  # after the step's backward, as Lightning's on_before_optimizer_step
                    params_now = {n: p.detach() for n, p in zip(names, stacked)}
                    corrected = hooks.correct(grads, params_now, step + 1, rows)
                else:
                    assert grad_correction is not None
                    corrected = vmap(grad_correction)(grads, extras)
                for n, p in zip(names, stacked):
                    p.grad = corrected[n]
            masked_step(optimizer, stacked, active)

    loss_sums = loss_sums.cpu()
    return [
        ClientOutcome(
            client=job.client,
            state={n: p[k].detach().clone() for n, p in zip(names, stacked)},
            loss_sum=float(loss_sums[k]),
            num_samples_seen=seen[k],
            steps=len(plans[k]),
        )
        for k, job in enumerate(jobs)
    ]


class _NeedsClient(Exception):
    """A strategy hook read ``context.client``, which one call for a chunk of clients cannot give."""


class _ClientsAtOnce(ClientContext):
    """The context of one hook call for a chunk's clients at once under ``vmap``: per-client tensors
    (batched), the fields every client of the chunk shares; ``client`` alone differs, and reading it
    asks for one call per client instead."""

    def __getattribute__(self, name: str) -> Any:
        if name == "client":
            raise _NeedsClient
        return super().__getattribute__(name)


def _unpack(extras: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in extras.items() if k.startswith(prefix)}


class _StrategyHooks:
    """A strategy's client hooks on the stacked clients, each client with its own :class:`ClientContext`.

    The hooks see what the sequential runner gives them: the client's context (id, round, config,
    version, learning rate, own state) with ``steps`` the optimizer steps taken so far (the loss
    term before step ``t`` sees ``t``, the gradient correction ``t + 1``). Where the contexts of a
    chunk differ only in their tensors and client ids, one vmapped call serves every client; a hook
    that reads ``context.client`` is called client by client from then on.
    """

    def __init__(self, strategy: Strategy, jobs: Sequence[ClientJob], extras: State) -> None:
        contexts = [job.context for job in jobs]
        if any(c is None for c in contexts):
            raise ConfigError("train_clients: with a strategy, every ClientJob needs its context")
        self.strategy = strategy
        self.contexts: list[ClientContext] = [c for c in contexts if c is not None]
        self.extras = extras
        first = self.contexts[0]
        shared = ("server_round", "version", "lr")
        self.at_once = all(
            all(getattr(c, f) == getattr(first, f) for f in shared) and dict(c.config) == dict(first.config)
            for c in self.contexts
        )
        self.adds_loss = type(strategy).client_loss is not Strategy.client_loss
        self.corrects_gradients = type(strategy).client_gradient is not Strategy.client_gradient

    def _own(self, k: int, steps: int) -> ClientContext:
        return replace(self.contexts[k], steps=steps)

    def _shared(self, extras: State, steps: int) -> ClientContext:
        first = self.contexts[0]
        return _ClientsAtOnce(
            client=-1,
            server_round=first.server_round,
            received=_unpack(extras, "received."),
            config=first.config,
            extras=_unpack(extras, "extras."),
            state=_unpack(extras, "state."),
            steps=steps,
            lr=first.lr,
            version=first.version,
        )

    def loss(self, params: State, rows: list[int], steps: int) -> torch.Tensor:
        """Each client of ``rows``'s loss term (``params``: its rows of the stacked tensors)."""
        like = next(iter(params.values()))
        zero = torch.zeros((), device=like.device, dtype=like.dtype)
        if self.at_once:
            index = torch.tensor(rows, device=like.device)
            rows_extras = {k: v.index_select(0, index) for k, v in self.extras.items()}

            def term(p: State, e: State) -> torch.Tensor:
                value = self.strategy.client_loss(p, self._shared(e, steps))
                return value if value is not None else torch.zeros(())

            try:
                return vmap(term)(params, rows_extras)
            except _NeedsClient:
                self.at_once = False
        terms = []
        for i, k in enumerate(rows):
            value = self.strategy.client_loss({n: p[i] for n, p in params.items()}, self._own(k, steps))
            terms.append(value if value is not None else zero)
        return torch.stack(terms)

    def correct(self, grads: State, params: State, steps: int, rows: list[int]) -> State:
        """Every client's corrected gradient (``grads`` and ``params`` stacked over the chunk); the
        clients of ``rows`` take this step, the others' gradients are not applied."""
        if self.at_once:
            try:
                return vmap(
                    lambda g, p, e: self.strategy.client_gradient(g, p, self._shared(e, steps)),
                )(grads, params, self.extras)
            except _NeedsClient:
                self.at_once = False
        corrected = {n: g.clone() for n, g in grads.items()}
        for k in rows:
            own = self.strategy.client_gradient(
                {n: g[k] for n, g in grads.items()}, {n: p[k] for n, p in params.items()}, self._own(k, steps)
            )
            for n, g in own.items():
                corrected[n][k] = g
        return corrected


def _linear_forward(
    model: torch.nn.Module, names: list[str], prefix: str
) -> Optional[Callable[[State, torch.Tensor], torch.Tensor]]:
    """A classifier alone on cached features (``nn.Linear``, weight and bias trained): one batched
    matrix product over the clients instead of vmap's per-call machinery, which costs more than the
    arithmetic at this size. None for any other network."""
    head = getattr(model, "head", None)
    inner = {n[len(prefix) :] for n in names}
    if not isinstance(head, torch.nn.Linear) or head.bias is None or inner != {"head.weight", "head.bias"}:
        return None
    if list(model.children()) != [head]:
        return None

    def forward(params: State, features: torch.Tensor) -> torch.Tensor:  # [m, B, d] -> [m, B, classes]
        return torch.baddbmm(params["head.bias"].unsqueeze(1), features, params["head.weight"].transpose(1, 2))

    return forward


def _private_gradients(
    model: torch.nn.Module,
    prefix: str,
    names: list[str],
    stacked: list[torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    jobs: list[ClientJob],
    private: PrivateTraining,
    autocast: Optional[Callable[[], Any]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per client: noisy sum of clipped per-sample gradients over the expected batch size; per-client loss sums."""

    def sample_loss(params: State, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = functional_call(model, params, (image.unsqueeze(0),))
        loss = F.cross_entropy(logits.float(), label.unsqueeze(0))
        return loss, loss.detach()

    per_sample = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    per_client = vmap(per_sample, in_dims=(0, 0, 0), randomness="different")
    params = {n[len(prefix) :]: p.detach() for n, p in zip(names, stacked)}
    # chunk_size samples of each client at a time, as LocalDP does: the per-sample gradients of a
    # chunk (m x chunk_size copies of the trainable tensors) bound the memory, not the whole batch
    sums: dict[str, torch.Tensor] = {}
    loss_sums = torch.zeros(len(jobs), device=images.device)
    chunk = max(1, private.chunk_size)
    for start in range(0, images.shape[1], chunk):
        part = slice(start, start + chunk)
        grads, losses = per_client(params, images[:, part], labels[:, part])  # grads [m, c, ...], losses [m, c]
        norms = torch.stack([g.flatten(2).norm(dim=2) for g in grads.values()]).norm(dim=0)  # [m, c]
        factors = (private.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * mask[:, part]
        for name, g in grads.items():
            clipped = torch.einsum("mb,mb...->m...", factors.to(g.dtype), g)
            sums[name] = clipped if name not in sums else sums[name] + clipped
        loss_sums += (losses.detach() * mask[:, part]).sum(dim=1)
    out = []
    for n in names:
        total = sums[n[len(prefix) :]]
        rows = [
            (total[k] + private.noise(job.client, total[k])) / private.expected_batch_size(job.client)
            for k, job in enumerate(jobs)
        ]
        out.append(torch.stack(rows))
    return out, loss_sums


class VectorizedRunner:
    """A client runner that trains a round's clients at once with :func:`train_clients`.

    It is a :class:`~fedpeft_pl.federation.ClientRunner`: clients receive the round's message
    through the same :class:`~fedpeft_pl.exchange.ClientSession` as in the sequential runner
    (decoding, their own stored state, a personalised method's local part), train side by side
    through the one frozen backbone, and reply through the same session (encoding, the
    strategy's ``client_end``). A strategy's ``client_loss`` and ``client_gradient`` run vmapped
    per client; a per-client tensor that a client does not have yet counts as zero (SCAFFOLD's
    and FedDyn's first participation). Choose it with ``trainer.client_runner: vectorized``; the
    default, ``auto``, chooses it on a single CUDA device (:func:`choose_client_runner`).

    Where the stacked form is not the same training, a round runs on the sequential runner
    instead, with a log line once: FedRep's two-phase schedule, heterogeneous LoRA ranks and
    FLoRA's stacking, precisions other than 32-bit and ``bf16-mixed`` (``16-mixed`` needs a
    gradient scaler), and what only Lightning's loop runs (:func:`lightning_step_customised`: a
    module's own ``training_step`` or per-step hooks, a user callback's per-step hooks, gradient
    clipping or accumulation, an optimizer that is not elementwise). With stochastic layers (dropout,
    drop path) the random draws differ from the sequential runner's; data, order and optimizer
    steps do not. Under the feature
    cache (``trainer.feature_cache``) the batches are features and only the classifier runs.
    Local DP (:class:`~fedpeft_pl.privacy.LocalDP`) runs vectorised: per-sample gradients by a
    nested ``vmap``, clipped per sample, each client's noise from its own stream, its accounting
    through the same hooks as on the sequential runner.

    Args:
        loop: the run's federated loop, as a runner sees it (:class:`~fedpeft_pl.runners.base.RunnerHost`).
        max_parallel_clients: at most this many clients train at once (bounds memory); all of a
            round's clients by default.
    """

    def __init__(self, loop: RunnerHost, max_parallel_clients: Optional[int] = None) -> None:
        if max_parallel_clients is not None and max_parallel_clients < 1:
            raise ConfigError(f"trainer.max_parallel_clients must be >= 1, got {max_parallel_clients}")
        self.loop = loop
        self.max_parallel_clients = max_parallel_clients
        self.fallback = SequentialRunner(loop)
        self._told = False
        self._data = DeviceData()  # where the run names none (a plain Lightning trainer)

    def _remember_chunk_size(self, size: int) -> None:
        self.max_parallel_clients = size

    def reason_not_to_vectorise(self, module: Any = None) -> Optional[str]:
        """Why this run's rounds go to the sequential runner, or None (``module``: the run's by default);
        the run's :class:`~fedpeft_pl.runners.choice.RunnerChoice` decides."""
        context = self.loop.context
        return context.choice.reason_not_to_vectorise(context, module if module is not None else context.module)

    def engine_path(self, module: Any = None) -> tuple[str, str]:
        """How the engine trains this run's clients (``stacked``, ``vmap`` or ``batched head``), and why."""
        context = self.loop.context
        return context.choice.engine_path(context, module if module is not None else context.module)

    def run(self, round: Any) -> Iterator[Any]:
        """Train the round's clients together, stacked through the one frozen backbone; one result each."""
        reason = self.reason_not_to_vectorise()
        if reason is not None:
            if not self._told:
                log.info(f"vectorised client runner: {reason}")
                self._told = True
            yield from self.fallback.run(round)
            return
        yield from self._run(round)

    def evaluate(self, round: Any, clients: list[int]) -> Iterator[Any]:
        """Evaluate ``clients`` on their own test splits with the global state (and their own local parts)."""
        return self.fallback.evaluate(round, clients)

    def _run(self, round: Any) -> Iterator[Any]:
        loop = self.loop
        run = loop.context
        module = run.module
        datamodule = run.datamodule
        federation = loop.federation
        strategy = loop.server.strategy
        executor = ClientExecutor(loop, module)
        # the learning rate the client hooks see, as Lightning's loop gives it once the optimizer is built
        lr = float(module.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"])

        early: dict[int, Any] = {}
        sessions = []
        for client in round.share:
            started = executor.start(round, client)
            if isinstance(started, ClientResult):
                early[client] = started
            else:
                started.context.lr = lr
                sessions.append(started)
        # what a strategy's client hooks see, stacked per client: received state, server extras, own state
        own_keys = sorted({k for s in sessions for k in s.context.state if not k.startswith("local.")})
        jobs = []
        for session in sessions:
            context = session.context
            extras = {f"received.{n}": t for n, t in context.received.items()}
            extras.update({f"extras.{k}": t for k, t in context.extras.items()})
            extras.update(
                {f"state.{k}": context.state.get(k, torch.zeros_like(_like(k, context.received))) for k in own_keys}
            )
            jobs.append(
                ClientJob(
                    session.client,
                    client_seed(federation.seed, round.number, session.client),
                    round.plans[session.client].batches,
                    {**context.received, **session.local_state()},
                    extras,
                    training_seed=training_seed(federation.seed, round.number, session.client),
                    context=context,
                )
            )
        client_hooks = sessions and (sessions[0].adds_loss or sessions[0].corrects_gradients)

        private = None
        privacy = getattr(module, "privacy", None)
        if privacy is not None:
            # LocalDP's own math per client: its clipping bound, each client's noise from the stream
            # LocalDP opened for it in on_client_start (secret unless reproducible_noise), drawn in
            # the sequential runner's order, and its Poisson batches (client_batches samples them
            # from the same secret or seeded source as the sequential loader)
            private = PrivateTraining(
                privacy.max_grad_norm, privacy.noise, privacy.expected_batch_size, privacy.chunk_size
            )

        autocast = autocast_for(run.precision, run.device.type)
        # with the feature cache the batches are features: the classifier alone trains on them
        network = HeadProbe(module.model) if getattr(module, "takes_features", False) else module
        # the training samples, transformed once per run where that is exact (device_data.py)
        data = run.device_data or self._data
        datamodule = data.serving(datamodule, run.device)
        outcomes = train_clients(
            network,
            datamodule,
            jobs,
            federation.local_epochs,
            module.optimizer_factory,
            private=private,
            autocast=autocast or None,
            max_parallel_clients=self.max_parallel_clients,
            on_smaller_chunks=self._remember_chunk_size,
            strategy=strategy if client_hooks else None,
        )
        # the steps Lightning would have counted: the run's global step, and the round checkpoints it triggers
        loop.count_steps(sum(o.steps for o in outcomes))
        by_client = {o.client: o for o in outcomes}
        results = {}
        for session in sessions:
            outcome = by_client[session.client]
            session.context.steps = outcome.steps
            # the module reports the loss of the client it trained; here it is the outcome's
            module.begin_client(session)
            if outcome.num_samples_seen:
                module.track_loss(torch.tensor(outcome.loss_sum, dtype=torch.float64), outcome.num_samples_seen)
            metrics = client_metrics(run.releases_client_statistics, module)
            module.end_client()
            results[session.client] = executor.finish(
                session, outcome.state, datamodule.client_num_samples(session.client), metrics
            )
        try:
            for client in round.share:
                if client in results and client in by_client:
                    # on_client_end sees the client's trained state in the module, as on the sequential runner
                    executor.show(by_client[client].state)
                yield early[client] if client in early else results[client]
        finally:
            executor.restore()


def _like(key: str, received: State) -> torch.Tensor:
    """The tensor a per-client key (``control.<name>``, ``grad.<name>``) stands beside."""
    name = key.split(".", 1)[1] if "." in key else key
    if name not in received:
        raise ConfigError(
            f"the vectorised runner cannot place the client tensor {key!r}; use trainer.client_runner: sequential"
        )
    return received[name]
