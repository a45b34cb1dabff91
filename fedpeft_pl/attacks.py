"""Clients that lie: attacks on federated training, as classes named by ``class_path``.

An :class:`Attack` makes a seeded set of clients malicious (``fraction`` of the federation, or a
list of ``clients``) and acts where such a client can act (the threat model in docs/strategies.md):

- on its **local data** (:meth:`Attack.poison`: label flipping, a backdoor trigger), before it
  trains, so its update is an honest step on poisoned data;
- on the **tensors it sends** (:meth:`Attack.tamper`: sign flip, noise, model-replacement
  scaling), after it trains and before the upload codec, as a real client would;
- on the **sample count it reports** (:meth:`Attack.report`: quantity inflation);
- or, for an **omniscient** attacker whose clients collude and know every honest update of the
  round (:attr:`Attack.omniscient`: ALIE, IPM, min-max, min-sum), on the server's decoded updates
  just before aggregation (:meth:`Attack.collude`), in simulation only: a deployed client sees no
  other client's update.

The data and the tensors are tampered with in the client task every runner runs (the sequential
and vectorised runners and a Flower SuperNode, :class:`~fedpeft_pl.exchange.ClientSession`), so
an attack gives the same result on each; the vectorised runner trains malicious clients in the
stack like any other. Which clients are malicious, the poisoned samples and the attack's noise come
from their own seeded streams (``seeds.ATTACK_CLIENTS``, ``ATTACK_SAMPLES``, ``ATTACK_NOISE``): an
attack is an experiment, not a secret. On a deployment a SuperNode is made an attacker by its node
config (``attack="<a YAML file with class_path and init_args>"``); every client it plays is then
malicious. Configure one in simulation with ``trainer.attack``::

    trainer:
      attack:
        class_path: fedpeft_pl.attacks.SignFlip
        init_args: {fraction: 0.2, scale: 4.0}

A new attack is one class: subclass :class:`Attack` and override the hooks it needs
(CONTRIBUTING shows one). The attacks of the literature (ByzFL's, FedMLSecurity's, Blades') work on
flat vectors of whole models; these act on the exchanged PEFT tensors, keyed by name, through the
project's own client task and codecs, so they are written here; the formulas follow the papers,
cited on each class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from fedpeft_pl.component import Component
from fedpeft_pl.errors import ConfigError
from fedpeft_pl.federation import ClientContext, Federation, State
from fedpeft_pl.seeds import ATTACK_CLIENTS, ATTACK_NOISE, ATTACK_SAMPLES, derive_seed
from fedpeft_pl.strategies.updates import ClientUpdate, apply_delta, flat_deltas

__all__ = [
    "ALIE",
    "IPM",
    "Attack",
    "Backdoor",
    "GaussianNoise",
    "LabelFlip",
    "MinMax",
    "MinSum",
    "PoisonedData",
    "QuantityInflation",
    "SignFlip",
    "load_attack",
]


class Attack(Component):
    """Base class: which clients are malicious, and what they do.

    Override any of :meth:`poison_sample` (with :attr:`poisons_data` True), :meth:`tamper`,
    :meth:`report` or, with :attr:`omniscient` True, :meth:`collude`. The hooks are called for
    malicious clients only.

    Args:
        fraction: the share of the federation's clients that are malicious, in [0, 1); the clients
            are drawn from the run's seed (stream ``ATTACK_CLIENTS``). Ignored if ``clients`` is given.
        clients: the malicious clients by index, instead of a fraction.
    """

    omniscient: ClassVar[bool] = False
    """Whether the malicious clients collude and know every honest update of the round (:meth:`collude`)."""

    poisons_data: ClassVar[bool] = False
    """Whether the attack changes its clients' training samples (:meth:`poison_sample`)."""

    def __init__(self, fraction: float = 0.2, clients: Optional[Sequence[int]] = None) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ConfigError(f"{type(self).__name__} fraction must be in [0, 1), got {fraction!r}")
        if clients is not None and any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in clients):
            raise ConfigError(f"{type(self).__name__} clients must be client indices >= 0, got {list(clients)!r}")
        self.fraction = float(fraction)
        self.clients = None if clients is None else sorted(set(clients))
        self._malicious: frozenset[int] = frozenset(self.clients or ())
        self._num_classes: Optional[int] = None

    # -- who is malicious ----------------------------------------------------------------------

    def setup(self, federation: Federation, num_classes: Optional[int] = None) -> None:
        """Draw the malicious clients of ``federation`` (the same set in every process and on every runner)."""
        self._num_classes = num_classes
        if self.clients is not None:
            beyond = [c for c in self.clients if c >= federation.num_clients]
            if beyond:
                raise ConfigError(
                    f"{type(self).__name__} clients {beyond} are beyond the federation's {federation.num_clients} "
                    "clients; list indices below data.num_clients"
                )
            self._malicious = frozenset(self.clients)
            return
        count = math.floor(self.fraction * federation.num_clients)
        rng = np.random.default_rng(derive_seed(federation.seed, ATTACK_CLIENTS))
        self._malicious = frozenset(int(c) for c in rng.choice(federation.num_clients, count, replace=False))

    def play(self, clients: Sequence[int]) -> None:
        """Make exactly ``clients`` malicious (a deployed SuperNode that attacks plays its own client)."""
        self._malicious = frozenset(int(c) for c in clients)

    @property
    def malicious(self) -> frozenset[int]:
        """The malicious clients' indices."""
        return self._malicious

    def is_malicious(self, client: int) -> bool:
        """Whether ``client`` is one of the malicious clients."""
        return client in self._malicious

    # -- what a malicious client does -----------------------------------------------------------

    def poison_sample(self, client: int, index: int, image: torch.Tensor, label: int) -> tuple[torch.Tensor, int]:
        """One training sample of malicious ``client`` (``index`` in the training split), as it trains on it."""
        return image, label

    def tamper(self, context: ClientContext, trained: State) -> State:
        """The tensors malicious client ``context.client`` sends instead of its ``trained`` ones (before the codec)."""
        return trained

    def report(self, client: int, num_samples: int) -> int:
        """The sample count malicious ``client`` reports instead of its true ``num_samples``."""
        return num_samples

    def collude(self, malicious: list[ClientUpdate], honest: list[ClientUpdate], global_state: State) -> list[State]:
        """Omniscient attacks: the states the ``malicious`` updates become, knowing the ``honest`` ones."""
        return [u.state for u in malicious]

    # -- what the server measures ---------------------------------------------------------------

    def round_metrics(
        self, updates: list[ClientUpdate], shares: Optional[dict[int, float]], rejected: Optional[set[int]]
    ) -> dict[str, float]:
        """The round's figures of the attack: malicious updates, their share of the aggregate, and for a rule
        that selects, its true and false positive rates (malicious rejected, honest rejected)."""
        clients = [u.client for u in updates if not u.aggregate_of]
        bad = [c for c in clients if self.is_malicious(c)]
        metrics = {"attack/malicious_updates": float(len(bad))}
        if shares is not None:
            metrics["attack/malicious_weight"] = float(sum(w for c, w in shares.items() if self.is_malicious(c)))
        if rejected is not None:
            good = [c for c in clients if not self.is_malicious(c)]
            if bad:
                metrics["attack/tpr"] = sum(c in rejected for c in bad) / len(bad)
            if good:
                metrics["attack/fpr"] = sum(c in rejected for c in good) / len(good)
        return metrics

    def evaluation_sets(self, test: Dataset) -> dict[str, Dataset]:
        """Further server test sets, by metric name, whose accuracy is the attack's figure (a backdoor's success)."""
        return {}


def load_attack(spec: str) -> Attack:
    """The attack a file names: a YAML file with ``class_path`` (a subclass of :class:`Attack`) and ``init_args``;
    or a class path alone, with the class's defaults. What a SuperNode's node config ``attack`` gives."""
    import importlib
    import os

    import yaml

    if os.path.isfile(spec):
        with open(spec) as file:
            entry = yaml.safe_load(file) or {}
    else:
        entry = {"class_path": spec}
    if not isinstance(entry, dict) or "class_path" not in entry:
        raise ConfigError(f"the attack in {spec!r} names no class_path; give class_path: and init_args: in it")
    path = str(entry["class_path"])
    if "." not in path:
        path = f"fedpeft_pl.attacks.{path}"
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ConfigError(f"no attack class {path!r}: check the class_path in {spec!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise ConfigError(f"{path!r} is not an attack (a subclass of fedpeft_pl.attacks.Attack)")
    try:
        return cls(**dict(entry.get("init_args") or {}))
    except TypeError as err:
        raise ConfigError(f"the attack in {spec!r}: {err}") from None


def _sent(context: ClientContext, trained: State, delta: State) -> State:
    """What a malicious client sends: what it received plus ``delta`` (per exchanged tensor, added in float64),
    in its trained tensors' dtypes; the tensors ``delta`` leaves out as it trained them."""
    received = context.received
    sent = {n: (received[n].to(torch.float64) + d.to(torch.float64)).to(trained[n].dtype) for n, d in delta.items()}
    return {**trained, **sent}


def _scaled(context: ClientContext, trained: State, factor: float) -> State:
    """What a client sends whose update (trained minus received) is multiplied by ``factor``."""
    received = context.received
    return _sent(
        context, trained, {n: factor * (t - received[n].to(t)).double() for n, t in trained.items() if n in received}
    )


class SignFlip(Attack):
    """Sign flipping (Damaskinos et al. 2018; Allen-Zhu et al. 2021): the update reversed and scaled,
    ``delta -> -scale * delta``.

    Args:
        scale: the factor on the reversed update, > 0.
        fraction: the share of the federation's clients that are malicious (:class:`Attack`).
        clients: the malicious clients by index, instead of a fraction.
    """

    def __init__(self, scale: float = 1.0, fraction: float = 0.2, clients: Optional[Sequence[int]] = None) -> None:
        super().__init__(fraction, clients)
        if not scale > 0:
            raise ConfigError(f"SignFlip scale must be > 0, got {scale}")
        self.scale = scale

    def tamper(self, context: ClientContext, trained: State) -> State:
        return _scaled(context, trained, -self.scale)


class GaussianNoise(Attack):
    """Gaussian noise (Blanchard et al. 2017): the update replaced by ``N(0, std^2)`` on every coordinate.

    The noise comes from the attack's own seeded stream (``ATTACK_NOISE``, by round and client).

    Args:
        std: the noise's standard deviation, > 0.
        fraction: the share of the federation's clients that are malicious (:class:`Attack`).
        clients: the malicious clients by index, instead of a fraction.
    """

    def __init__(self, std: float = 1.0, fraction: float = 0.2, clients: Optional[Sequence[int]] = None) -> None:
        super().__init__(fraction, clients)
        if not std > 0:
            raise ConfigError(f"GaussianNoise std must be > 0, got {std}")
        self.std = std
        self._seed = 0

    def setup(self, federation: Federation, num_classes: Optional[int] = None) -> None:
        super().setup(federation, num_classes)
        self._seed = federation.seed

    def tamper(self, context: ClientContext, trained: State) -> State:
        generator = torch.Generator().manual_seed(
            derive_seed(self._seed, ATTACK_NOISE, context.server_round, context.client)
        )
        noise = {
            n: torch.randn(t.shape, generator=generator, dtype=torch.float64) * self.std
            for n, t in sorted(trained.items())
            if n in context.received
        }
        return _sent(context, trained, noise)


class QuantityInflation(Attack):
    """Quantity inflation: the client reports ``factor`` times its sample count, to weigh more in a sample-weighted
    mean. Its update is honest. :class:`~fedpeft_pl.strategies.SampleCounts` is the defence.

    Args:
        factor: the multiplier on the reported count, >= 1.
        fraction: the share of the federation's clients that are malicious (:class:`Attack`).
        clients: the malicious clients by index, instead of a fraction.
    """

    def __init__(self, factor: float = 100.0, fraction: float = 0.2, clients: Optional[Sequence[int]] = None) -> None:
        super().__init__(fraction, clients)
        if not factor >= 1:
            raise ConfigError(f"QuantityInflation factor must be >= 1, got {factor}")
        self.factor = factor

    def report(self, client: int, num_samples: int) -> int:
        return round(num_samples * self.factor)


class LabelFlip(Attack):
    """Label flipping (data poisoning; Tolpegin et al. 2020): every training label ``y`` becomes ``C - 1 - y``, or
    ``target`` if given (all-to-one).

    Args:
        target: the class every label becomes; None flips each label to ``C - 1 - y``.
        fraction: the share of the federation's clients that are malicious (:class:`Attack`).
        clients: the malicious clients by index, instead of a fraction.
    """

    poisons_data = True

    def __init__(
        self, target: Optional[int] = None, fraction: float = 0.2, clients: Optional[Sequence[int]] = None
    ) -> None:
        super().__init__(fraction, clients)
        if target is not None and (isinstance(target, bool) or target < 0):
            raise ConfigError(f"LabelFlip target must be a class index >= 0 or null, got {target!r}")
        self.target = target

    def setup(self, federation: Federation, num_classes: Optional[int] = None) -> None:
        super().setup(federation, num_classes)
        if self.target is not None and num_classes is not None and self.target >= num_classes:
            raise ConfigError(f"LabelFlip target {self.target} is not a class of the {num_classes}; lower it")

    def poison_sample(self, client: int, index: int, image: torch.Tensor, label: int) -> tuple[torch.Tensor, int]:
        if self.target is not None:
            return image, self.target
        if self._num_classes is None:
            raise RuntimeError("LabelFlip needs the number of classes: call setup(federation, num_classes) first")
        return image, self._num_classes - 1 - int(label)


class Backdoor(Attack):
    """A backdoor (Gu et al. 2017; Bagdasaryan et al., AISTATS 2020): a pixel-patch trigger relabelled to a target
    class, with optional model-replacement scaling.

    On each malicious client, a share ``poison_fraction`` of its training samples (drawn once per client,
    stream ``ATTACK_SAMPLES``) gets the trigger, a ``patch`` x ``patch`` square of value ``value`` in the
    bottom-right corner of the transformed (normalised) image, and the label ``target``. With ``boost``
    above 1 the client scales its update by it (``delta -> boost * delta``), so that it survives averaging
    with the honest ones (model replacement: ``boost = N / eta``; Bagdasaryan et al. use the round's
    client count for eta = 1), in every round or only in ``boost_rounds``. Bagdasaryan et al. replace
    the model in one round (the attacker is picked once) and measure the backdoor after it; boosted in
    every round, the malicious clients' own data gets ``boost`` times their share of each step, which
    can overshoot back and forth from round to round (benchmarks/README.md, "Attacks against
    defences"). In the rounds without boost the malicious clients still train on their poisoned
    samples and send that update as it is.

    The server measures the attack's success rate (``attack/success_rate``): the share of its test images
    of the other classes that the model, given the trigger, puts in class ``target``.

    Args:
        target: the class the trigger leads to.
        patch: the trigger square's side in pixels, >= 1. Against a ViT, one the backbone's patch size covers a
            whole token; a smaller one changes a share of one token's pixels, which a frozen backbone with a
            small adapter learns far more slowly (on the quickstart's ViT, patch 8: benchmarks/README.md).
        value: the trigger's pixel value in the transformed image (about white after the usual
            normalisations).
        poison_fraction: the share of a malicious client's samples that carry the trigger, in (0, 1].
        boost: the factor on the malicious update, >= 1 (1: none).
        boost_rounds: the rounds (from 1) in which the malicious updates are boosted; None: every round.
        fraction: the share of the federation's clients that are malicious (:class:`Attack`).
        clients: the malicious clients by index, instead of a fraction.
    """

    poisons_data = True

    def __init__(
        self,
        target: int = 0,
        patch: int = 3,
        value: float = 2.5,
        poison_fraction: float = 0.5,
        boost: float = 1.0,
        boost_rounds: Optional[Sequence[int]] = None,
        fraction: float = 0.2,
        clients: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__(fraction, clients)
        if isinstance(target, bool) or target < 0:
            raise ConfigError(f"Backdoor target must be a class index >= 0, got {target!r}")
        if isinstance(patch, bool) or patch < 1:
            raise ConfigError(f"Backdoor patch must be >= 1 pixel, got {patch!r}")
        if not 0 < poison_fraction <= 1:
            raise ConfigError(f"Backdoor poison_fraction must be in (0, 1], got {poison_fraction}")
        if not boost >= 1:
            raise ConfigError(f"Backdoor boost must be >= 1, got {boost}")
        if boost_rounds is not None and any(
            isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in boost_rounds
        ):
            raise ConfigError(f"Backdoor boost_rounds must be rounds >= 1 or null, got {list(boost_rounds)!r}")
        self.target = target
        self.patch = patch
        self.value = value
        self.poison_fraction = poison_fraction
        self.boost = boost
        self.boost_rounds = None if boost_rounds is None else sorted(set(boost_rounds))
        self._seed = 0

    def setup(self, federation: Federation, num_classes: Optional[int] = None) -> None:
        super().setup(federation, num_classes)
        if num_classes is not None and self.target >= num_classes:
            raise ConfigError(f"Backdoor target {self.target} is not a class of the {num_classes}; lower it")
        self._seed = federation.seed

    def trigger(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (channels, height, width) with the trigger patch."""
        triggered = image.clone()
        triggered[..., -self.patch :, -self.patch :] = self.value
        return triggered

    def poisoned(self, client: int, index: int) -> bool:
        """Whether sample ``index`` of malicious ``client`` carries the trigger (a fixed draw per client and sample)."""
        rng = np.random.default_rng(derive_seed(self._seed, ATTACK_SAMPLES, client, index))
        return bool(rng.random() < self.poison_fraction)

    def poison_sample(self, client: int, index: int, image: torch.Tensor, label: int) -> tuple[torch.Tensor, int]:
        if self.poisoned(client, index):
            return self.trigger(image), self.target
        return image, label

    def tamper(self, context: ClientContext, trained: State) -> State:
        if self.boost == 1 or (self.boost_rounds is not None and context.server_round not in self.boost_rounds):
            return trained
        return _scaled(context, trained, self.boost)

    def evaluation_sets(self, test: Dataset) -> dict[str, Dataset]:
        return {"attack/success_rate": Triggered(test, self)}


class Triggered(Dataset):
    """The test samples of every class but the backdoor's target, with the trigger and the target's label:
    a model's accuracy on it is the backdoor's success rate."""

    def __init__(self, test: Dataset, backdoor: Backdoor) -> None:
        self.dataset = test
        self.backdoor = backdoor
        self.indices = [i for i in range(len(test)) if int(_label(test, i)) != backdoor.target]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        image, _ = self.dataset[self.indices[position]]
        return self.backdoor.trigger(torch.as_tensor(image)), self.backdoor.target


def _label(dataset: Any, index: int) -> int:
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return int(targets[index])
    return int(dataset[index][1])


# -- omniscient attacks: the malicious clients know the round's honest updates ---------------------


class _Omniscient(Attack):
    """Every malicious update of the round becomes one crafted update, from the honest updates' deltas."""

    omniscient = True

    def craft(self, honest: torch.Tensor, malicious: int) -> torch.Tensor:
        """The malicious delta from the honest deltas (rows), with ``malicious`` colluding clients."""
        raise NotImplementedError

    def collude(self, malicious: list[ClientUpdate], honest: list[ClientUpdate], global_state: State) -> list[State]:
        if not malicious or len(honest) < 2:  # nothing to learn from one honest update
            return [u.state for u in malicious]
        crafted = apply_delta(global_state, self.craft(flat_deltas(honest, global_state), len(malicious)))
        return [{**u.state, **crafted} for u in malicious]


class ALIE(_Omniscient):
    """A little is enough (Baruch et al., NeurIPS 2019): ``mean - z * std``, coordinate-wise over the honest updates.

    ``z`` by default is the paper's ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n / 2 + 1) - f``, for
    ``n`` updates of which ``f`` are malicious: the largest shift that still keeps the malicious update
    inside the majority's spread.

    Args:
        z: the shift in standard deviations; None computes ``z_max`` each round.
        fraction: the share of the federation's clients that are malicious (:class:`Attack`).
        clients: the malicious clients by index, instead of a fraction.
    """

    def __init__(
        self, z: Optional[float] = None, fraction: float = 0.2, clients: Optional[Sequence[int]] = None
    ) -> None:
        super().__init__(fraction, clients)
        if z is not None and not z > 0:
            raise ConfigError(f"ALIE z must be > 0 or null, got {z}")
        self.z = z

    @staticmethod
    def z_max(n: int, f: int) -> float:
        s = math.floor(n / 2 + 1) - f
        p = (n - s) / n
        p = min(max(p, 1e-6), 1 - 1e-6)
        return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)))

    def craft(self, honest: torch.Tensor, malicious: int) -> torch.Tensor:
        z = self.z if self.z is not None else self.z_max(len(honest) + malicious, malicious)
        return honest.mean(dim=0) - z * honest.std(dim=0)


class IPM(_Omniscient):
    """Inner product manipulation (Xie et al., UAI 2020): ``-epsilon * mean`` of the honest updates.

    A small ``epsilon`` (0.1) keeps the update close to the honest ones and fools distance-based rules
    (Krum); a large one (100) reverses the aggregate of a plain mean.

    Args:
        epsilon: the factor, > 0.
        fraction: the share of the federation's clients that are malicious (:class:`Attack`).
        clients: the malicious clients by index, instead of a fraction.
    """

    def __init__(self, epsilon: float = 0.1, fraction: float = 0.2, clients: Optional[Sequence[int]] = None) -> None:
        super().__init__(fraction, clients)
        if not epsilon > 0:
            raise ConfigError(f"IPM epsilon must be > 0, got {epsilon}")
        self.epsilon = epsilon

    def craft(self, honest: torch.Tensor, malicious: int) -> torch.Tensor:
        return -self.epsilon * honest.mean(dim=0)


class _Optimised(_Omniscient):
    """Shejwalkar and Houmansadr (NDSS 2021): ``mean + gamma * p`` with the largest ``gamma`` a distance test passes.

    ``p`` is the perturbation: ``std`` (minus the coordinate-wise standard deviation), ``unit``
    (minus the unit mean) or ``sign`` (minus the mean's sign). ``gamma`` is found by doubling from 1
    until the test fails, then bisecting (50 steps), as the paper's search.
    """

    def __init__(
        self, perturbation: str = "std", fraction: float = 0.2, clients: Optional[Sequence[int]] = None
    ) -> None:
        super().__init__(fraction, clients)
        if perturbation not in ("std", "unit", "sign"):
            raise ConfigError(
                f"{type(self).__name__} perturbation must be 'std', 'unit' or 'sign', got {perturbation!r}"
            )
        self.perturbation = perturbation

    def passes(self, candidate: torch.Tensor, honest: torch.Tensor) -> bool:
        """Whether ``candidate`` passes the attack's distance test against the ``honest`` updates (rows)."""
        raise NotImplementedError

    def craft(self, honest: torch.Tensor, malicious: int) -> torch.Tensor:
        mean = honest.mean(dim=0)
        if self.perturbation == "std":
            direction = -honest.std(dim=0)
        elif self.perturbation == "unit":
            direction = -mean / mean.norm().clamp(min=1e-300)
        else:
            direction = -torch.sign(mean)
        low, high = 0.0, 1.0
        while self.passes(mean + high * direction, honest) and high < 1e6:
            low, high = high, 2 * high
        for _ in range(50):
            middle = (low + high) / 2
            if self.passes(mean + middle * direction, honest):
                low = middle
            else:
                high = middle
        return mean + low * direction


class MinMax(_Optimised):
    """Min-max (Shejwalkar and Houmansadr, NDSS 2021): the malicious update's largest distance to an honest update
    is at most the largest distance between two honest updates.

    Args:
        perturbation: ``std``, ``unit`` or ``sign`` (:class:`_Optimised`).
        fraction: the share of the federation's clients that are malicious (:class:`Attack`).
        clients: the malicious clients by index, instead of a fraction.
    """

    def passes(self, candidate: torch.Tensor, honest: torch.Tensor) -> bool:
        return bool((honest - candidate).norm(dim=1).max() <= torch.cdist(honest, honest).max())


class MinSum(_Optimised):
    """Min-sum (Shejwalkar and Houmansadr, NDSS 2021): the malicious update's sum of squared distances to the honest
    updates is at most the largest such sum of an honest update.

    Args:
        perturbation: ``std``, ``unit`` or ``sign`` (:class:`_Optimised`).
        fraction: the share of the federation's clients that are malicious (:class:`Attack`).
        clients: the malicious clients by index, instead of a fraction.
    """

    def passes(self, candidate: torch.Tensor, honest: torch.Tensor) -> bool:
        return bool((honest - candidate).pow(2).sum() <= torch.cdist(honest, honest).pow(2).sum(dim=1).max())


# -- data poisoning on every runner ----------------------------------------------------------------


class PoisonedData(Dataset):
    """A training split whose samples of malicious clients are poisoned by ``attack``.

    ``owners`` maps a sample index to the client that holds it (each sample belongs to one client);
    samples of honest clients read as they are. Every runner reads the training split by index, so
    the vectorised runner, the sequential one and the feature cache all train on the same poisoned
    samples. The poison is a function of the client and the sample index alone (deterministic), so
    the data set's own transforms decide whether its samples may be transformed once.
    """

    def __init__(self, dataset: Dataset, attack: Attack, owners: dict[int, int]) -> None:
        self.dataset = dataset
        self.attack = attack
        self.owners = owners

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        image, label = self.dataset[index]
        client = self.owners.get(int(index))
        if client is None:
            return image, label
        poisoned, target = self.attack.poison_sample(client, int(index), torch.as_tensor(image), int(label))
        if isinstance(label, torch.Tensor):  # as the data set gives it, so every runner's collation stays as it is
            return poisoned, torch.as_tensor(target, dtype=label.dtype)
        return poisoned, target

    @staticmethod
    def owners_of(client_indices: Sequence[Sequence[int]], clients: frozenset[int]) -> dict[int, int]:
        """``{sample index: client}`` for the samples of ``clients``, from each client's sample indices."""
        return {int(i): c for c in sorted(clients) if c < len(client_indices) for i in client_indices[c]}
