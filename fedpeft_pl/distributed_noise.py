"""The distributed discrete Gaussian mechanism (Kairouz, Liu and Steinke, ICML 2021): conditioning and accounting.

Each client turns its update into an integer vector that is already noised before secure
aggregation masks it, so the server (and SecAgg+) only ever sums noised vectors:

1. flatten the update (every tensor, in the message's order) and clip it to L2 norm ``c``;
2. pad it to ``D``, the next power of two, and rotate it with the randomized Hadamard transform
   ``H diag(s) / sqrt(D)``, ``s`` random signs drawn from the run's seed and the round (the rotation is
   public: it only flattens the vector so that no coordinate is large, and every client must use the same);
3. scale by ``1 / gamma``;
4. round each coordinate stochastically to an integer, again until the rounded vector's norm is at most
   ``norm_bound`` (conditional randomized rounding, the paper's bound with ``beta``): this is what bounds
   the sensitivity in the integer domain;
5. add discrete Gaussian noise of variance ``local_std**2``, a share of the central noise
   (``local_std**2 = (z c / gamma)**2 / noise_clients``), drawn from the client's secret stream;
6. wrap into ``[-m/2, m/2)`` with ``m = 2**bits``.

The server sums the clients' vectors modulo ``m`` (SecAgg+ does, under its masks), takes the centred
residue, multiplies by ``gamma``, rotates back and drops the padding: the sum of the clipped updates
plus the noise of the clients that survived, plus the rounding error. ``gamma`` is chosen (the paper's
heuristic, its Section 4.4) so that ``k_stddevs`` standard deviations of a coordinate of the noised
sum fit in ``m``, even when every client's update points the same way.

Why by hand: no library we depend on has this for torch state dicts. tensorflow_privacy's
``DistributedDiscreteGaussianSumQuery`` and TFF's ``DiscreteGaussianSumQuery`` need TensorFlow;
dp-accounting has no distributed discrete Gaussian event, opacus none at all. The accounting
(:func:`round_rdp`) is the paper's Proposition 14 / its Theorem 1, subsampled with Zhu and Wang's
general upper bound for Poisson sampling (ICML 2019), as the paper's own accounting code does;
RDP is converted to ``(epsilon, delta)`` by opacus' ``get_privacy_spent`` (Balle et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fedpeft_pl.errors import ConfigError
from fedpeft_pl.seeds import DDP_ROTATION, derive_seed

# integer orders: Zhu and Wang's bound for Poisson subsampling is stated for integer orders
ORDERS = (*range(2, 129), 256)
# the largest integer SecAgg+ (Flower 1.42) carries exactly: a client's vector + m/2 must fit Flower's int32, and
# the clients' weights (m each) must sum below its modulus 2**32
MAX_BITS = 30


@dataclass(frozen=True)
class Conditioning:
    """One round's conditioning of the clients' updates; the same on every client and the server.

    Args:
        clip: ``c``, the L2 bound of each client's update.
        gamma: the quantisation step: one integer unit is ``gamma`` in the update's units.
        beta: conditional randomized rounding's constant in [0, 1) (0: plain rounding, the looser bound).
        bits: the modulus is ``2**bits``.
        dim: the update's size ``d``.
        local_std: each client's discrete Gaussian noise, in integer units.
    """

    clip: float
    gamma: float
    beta: float
    bits: int
    dim: int
    local_std: float

    @property
    def padded(self) -> int:
        """``D``: the dimension the Hadamard transform acts on."""
        return 1 << max(0, (self.dim - 1).bit_length())

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def norm_bound(self) -> float:
        """The L2 bound of a client's rounded vector: the sensitivity in integer units (the paper's Theorem 1)."""
        return rounded_norm_bound(self.clip / self.gamma, self.beta, self.padded)


def rounded_norm_bound(norm: float, beta: float, dim: int) -> float:
    """The L2 norm of a vector of norm ``norm`` after conditional randomized rounding with ``beta`` in ``dim``
    coordinates (the paper's Theorem 1; ``beta = 0``: unconditional rounding, ``norm + sqrt(dim)``)."""
    bound = norm + math.sqrt(dim)
    if beta == 0:
        return bound
    squared = norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)
    return min(bound, math.sqrt(squared))


def conditioning(
    clip: float,
    noise_multiplier: float,
    noise_clients: int,
    dim: int,
    bits: int,
    beta: float,
    k_stddevs: float,
) -> Conditioning:
    """The conditioning for central noise ``noise_multiplier * clip`` shared by ``noise_clients`` clients.

    ``gamma`` solves ``2**bits = 2 k sqrt((c n)**2 / D + (gamma**2 / 4 + sigma**2) n) / gamma`` (the paper's
    Section 4.4 with flatness 1, ``sigma`` the local noise's standard deviation in the update's units):
    ``k_stddevs`` standard deviations of a coordinate of the noised sum fit in the modulus even if all ``n``
    updates point the same way.
    """
    n, padded = int(noise_clients), 1 << max(0, (int(dim) - 1).bit_length())
    if not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"DistributedDP bits must be in [1, {MAX_BITS}] (SecAgg+ carries int32), got {bits}")
    room = (2.0**bits / (2 * k_stddevs)) ** 2 - n / 4
    if room <= 0:
        raise ConfigError(
            f"DistributedDP bits {bits} are too few for {n} clients at k_stddevs {k_stddevs}: raise bits or lower "
            "k_stddevs"
        )
    central = noise_multiplier * clip  # the central noise's standard deviation in the update's units
    gamma = math.sqrt((clip**2 * n**2 / padded + central**2) / room)
    return Conditioning(
        clip=float(clip),
        gamma=gamma,
        beta=float(beta),
        bits=int(bits),
        dim=int(dim),
        local_std=central / gamma / math.sqrt(n),
    )


def rotation_signs(seed: int, server_round: int, padded: int) -> np.ndarray:
    """The public random signs of the round's rotation, from the run's seed: the same on every client."""
    rng = np.random.default_rng(derive_seed(seed, DDP_ROTATION, server_round))
    return rng.integers(0, 2, padded).astype(np.float64) * 2 - 1


def hadamard(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of ``x`` (length a power of two); its own inverse."""
    y, h = np.asarray(x, dtype=np.float64), 1
    size = y.shape[0]
    while h < size:
        pairs = y.reshape(-1, 2, h)
        y = np.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), axis=1).reshape(size)
        h *= 2
    return y / math.sqrt(size)


def wrap(x: np.ndarray, modulus: int) -> np.ndarray:
    """``x`` modulo ``modulus`` into the centred range ``[-modulus/2, modulus/2)``."""
    half = modulus // 2
    return np.mod(np.asarray(x, dtype=np.int64) + half, modulus) - half


def discrete_gaussian(size: int, std: float, generator: torch.Generator) -> np.ndarray:
    """``size`` draws of the discrete Gaussian ``N_Z(0, std**2)``: Canonne, Kamath and Steinke's (NeurIPS 2020)
    rejection sampler from the discrete Laplace of scale ``t = floor(std) + 1``, vectorised.

    The draws are integers, so the low bits of a floating-point Gaussian cannot leak (Mironov 2012); the
    acceptance probabilities are computed in float64, which only perturbs them by float64 rounding.
    """
    out = np.zeros(size, dtype=np.int64)
    if std <= 0 or size == 0:
        return out
    variance, t = std**2, math.floor(std) + 1
    p = -math.expm1(-1 / t)  # discrete Laplace(t) = difference of two geometric draws of success p
    filled = 0
    while filled < size:
        want = max(2 * (size - filled), 64)  # the acceptance rate is above 1/2 (the paper's Algorithm 3)
        g1 = torch.empty(want, dtype=torch.float64).geometric_(p, generator=generator)
        g2 = torch.empty(want, dtype=torch.float64).geometric_(p, generator=generator)
        y = (g1 - g2).numpy()
        u = torch.rand(want, dtype=torch.float64, generator=generator).numpy()
        keep = y[u < np.exp(-((np.abs(y) - variance / t) ** 2) / (2 * variance))][: size - filled]
        out[filled : filled + keep.size] = keep.astype(np.int64)
        filled += keep.size
    return out


def encode(
    update: np.ndarray,
    cond: Conditioning,
    signs: np.ndarray,
    generator: torch.Generator,
    noised: bool = True,
    max_tries: int = 1000,
) -> np.ndarray:
    """A client's update (flat, ``cond.dim`` long) as its integer vector mod ``2**bits``: clipped, rotated, scaled,
    rounded within ``norm_bound``, noised and wrapped (the module's steps 1 to 6). ``noised=False`` leaves
    step 5 out (for measuring the rounding alone; never for a release)."""
    x = np.asarray(update, dtype=np.float64).reshape(-1)
    if x.size != cond.dim:
        raise ValueError(f"the update has {x.size} elements, the conditioning expects {cond.dim}")
    norm = float(np.linalg.norm(x))
    x = x * min(1.0, cond.clip / (norm + 1e-12))
    padded = np.zeros(cond.padded)
    padded[: cond.dim] = x
    scaled = hadamard(padded * signs) / cond.gamma
    floor = np.floor(scaled)
    bound = cond.norm_bound
    for _ in range(max_tries):  # each try succeeds with probability at least 1 - beta
        up = torch.rand(cond.padded, dtype=torch.float64, generator=generator).numpy() < scaled - floor
        rounded = (floor + up).astype(np.int64)
        if float(np.linalg.norm(rounded.astype(np.float64))) <= bound:
            break
    else:
        raise RuntimeError(f"conditional rounding found no vector within norm {bound:.6g} in {max_tries} tries")
    if noised:
        rounded = rounded + discrete_gaussian(cond.padded, cond.local_std, generator)
    return wrap(rounded, cond.modulus)


def decode(total: np.ndarray, cond: Conditioning, signs: np.ndarray) -> np.ndarray:
    """The sum of the clients' updates from the sum of their integer vectors (mod ``2**bits``): centred, scaled by
    ``gamma``, rotated back and cut to ``cond.dim``."""
    centred = wrap(np.asarray(total, dtype=np.int64), cond.modulus).astype(np.float64)
    return (hadamard(centred * cond.gamma) * signs)[: cond.dim]


def error_bound(cond: Conditioning, clients: int) -> float:
    """The bound we state on the L2 error that rounding adds to the decoded sum of ``clients`` updates, without
    wrap-around: ``gamma * sqrt(clients * D)``, twice the root mean square (each coordinate's rounding error
    has variance at most 1/4, and ``D`` of them concentrate)."""
    return cond.gamma * math.sqrt(clients * cond.padded)


def wrap_probability(cond: Conditioning, clients: int) -> float:
    """A bound on the probability that one coordinate of the noised sum of ``clients`` updates wraps around: the
    coordinate is sub-Gaussian with scale ``s = sqrt((c n / gamma)**2 / D + n (1/4 + local_std**2))`` after the
    rotation (flatness 1, all updates aligned at the clip norm: the worst case), so ``2 exp(-(m/2)**2 / (2 s**2))``."""
    n = clients
    s2 = (cond.clip * n / cond.gamma) ** 2 / cond.padded + n * (0.25 + cond.local_std**2)
    return min(1.0, 2 * math.exp(-((cond.modulus / 2) ** 2) / (2 * s2)))


def round_rdp(cond: Conditioning, clients: int, rate: float, orders: Sequence[int] = ORDERS) -> np.ndarray:
    """RDP of one round at ``orders``: the noised sum of ``clients`` clients' vectors (each noised with
    ``local_std``), each client in it with probability ``rate``.

    The paper's Proposition 14 with the central standard deviation ``sqrt(n) local_std``, the L2 sensitivity
    ``norm_bound``, the L1 sensitivity ``norm_bound * min(sqrt(D), norm_bound)`` and ``tau``, the distance of
    a sum of ``n`` discrete Gaussians from one (its Theorem 1); ``clients`` is the number whose noise reached
    the sum (the survivors: with dropouts the sum holds less noise, and spends more). Subsampled with Zhu and
    Wang's general upper bound (ICML 2019) when ``rate < 1``; never above the unsampled RDP.
    """
    n = int(clients)
    if n < 1:
        return np.zeros(len(orders))
    sigma = math.sqrt(n) * cond.local_std
    if sigma == 0:
        return np.full(len(orders), np.inf)
    l2 = cond.norm_bound
    l1 = l2 * min(math.sqrt(cond.padded), l2)
    tau = 10 * sum(math.exp(-2 * (math.pi * cond.local_std) ** 2 * k / (k + 1)) for k in range(1, n))
    d = cond.padded
    a2, a1 = l2 / sigma, l1 / sigma

    def eps(alpha: int) -> float:
        return min(
            alpha / 2 * a2**2 + tau * d,
            alpha / 2 * (a2**2 + 2 * a1 * tau + tau**2 * d),
            alpha / 2 * (a2 + math.sqrt(d) * tau) ** 2,
        )

    if rate >= 1:
        return np.array([eps(a) for a in orders])
    by_order = np.array([eps(j) if j >= 2 else 0.0 for j in range(max(orders) + 1)])  # each order's RDP, once
    return np.array([min(by_order[a], _subsampled(a, rate, by_order)) for a in orders])


def _subsampled(alpha: int, q: float, eps: np.ndarray) -> float:
    """Zhu and Wang's general upper bound (ICML 2019) on the RDP at integer ``alpha`` of any mechanism of RDP
    ``eps[j]`` at order ``j`` run on a Poisson sample of rate ``q``: ``log((1-q)**(a-1) (a q - q + 1) + C(a, 2)
    q**2 (1-q)**(a-2) e**eps(2) + 3 sum_{j>=3} C(a, j) (1-q)**(a-j) q**j e**((j-1) eps(j))) / (a - 1)``; the
    sum's terms computed at once (a loop over them took most of a calibration's time)."""
    from scipy.special import gammaln, logsumexp

    log_q, log_1q = math.log(q), math.log1p(-q)
    head = [(alpha - 1) * log_1q + math.log(alpha * q - q + 1)]
    head.append(math.log(alpha * (alpha - 1) / 2) + 2 * log_q + (alpha - 2) * log_1q + float(eps[2]))
    j = np.arange(3, alpha + 1)
    log_comb = gammaln(alpha + 1) - gammaln(j + 1) - gammaln(alpha - j + 1)
    tail = math.log(3) + log_comb + (alpha - j) * log_1q + j * log_q + (j - 1) * eps[3 : alpha + 1]
    return float(logsumexp(np.concatenate([head, tail]))) / (alpha - 1)


def epsilon(rdp: np.ndarray, delta: float, orders: Sequence[int] = ORDERS) -> float:
    """``epsilon`` at ``delta`` of composed RDP (opacus' conversion, Balle et al. 2020); 0 for nothing released."""
    rdp = np.asarray(rdp, dtype=np.float64)
    if not np.any(rdp > 0):
        return 0.0
    import warnings

    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():  # "optimal order is the largest alpha": a small epsilon, still a valid bound
        warnings.simplefilter("ignore", UserWarning)
        spent, _ = get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(spent)


def plan_epsilon(
    noise_multiplier: float,
    clip: float,
    clients: int,
    dim: int,
    bits: int,
    beta: float,
    k_stddevs: float,
    rate: float,
    rounds: int,
    delta: float,
    survivors: Optional[int] = None,
) -> float:
    """Epsilon of ``rounds`` rounds whose noise is shared by ``clients`` clients, of which ``survivors`` (all by
    default) reach the sum."""
    cond = conditioning(clip, noise_multiplier, clients, dim, bits, beta, k_stddevs)
    return epsilon(rounds * round_rdp(cond, clients if survivors is None else survivors, rate), delta)


def calibrate(
    target: float,
    clip: float,
    clients: int,
    dim: int,
    bits: int,
    beta: float,
    k_stddevs: float,
    rate: float,
    rounds: int,
    delta: float,
) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``rounds`` rounds spend at most ``target`` (bisection)."""

    def spent(z: float) -> float:
        return plan_epsilon(z, clip, clients, dim, bits, beta, k_stddevs, rate, rounds, delta)

    low, high = 1e-2, 1.0
    while spent(high) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise ConfigError(
                f"DistributedDP cannot reach epsilon {target} with {bits} bits at dimension {dim}: the rounding's "
                "sensitivity alone spends more; raise bits or lower k_stddevs"
            )
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if spent(mid) <= target else (mid, high)
    return high
