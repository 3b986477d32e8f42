"""A stateless, key-based random number generator (JAX style), built from torch integer ops.

Keys are int64 tensors. ``split`` and ``fold_in`` derive new keys; ``uniform``,
``normal``, ``bernoulli`` and ``randint`` are pure functions of a key. Because they are
ordinary pointwise torch ops on the key, a batch of keys under ``vmap`` gives every
example its own stream, and the draws are identical whether they are computed in a
vmap, in chunks (``chunk_size``) or in a Python loop over the examples.

The bits come from SplitMix64 (a counter-based generator: ``mix(key + counter)``),
computed with wrapping int64 arithmetic.

Examples:
    >>> import torch
    >>> from pyfunctorch import vmap, random
    >>> keys = random.split(random.key(0), 4)
    >>> a = vmap(lambda k: random.normal(k, (3,)))(keys)
    >>> b = torch.stack([random.normal(k, (3,)) for k in keys])
    >>> torch.equal(a, b)
    True
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = z + _GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _as_key(key) -> torch.Tensor:
    if not isinstance(key, torch.Tensor) or key.dtype != torch.int64 or key.dim() != 0:
        raise TypeError(
            "pyfunctorch.random: a key is a 0-dim int64 tensor made by random.key(seed), split or fold_in; "
            f"got {key!r:.80}."
        )
    return key


def key(seed: int) -> torch.Tensor:
    """A key from an integer seed."""
    return _mix(torch.tensor(int(seed) & ((1 << 63) - 1), dtype=torch.int64))


def split(key: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` independent keys derived from ``key`` (shape ``(num,)``)."""
    key = _as_key(key)
    return _mix(_mix(key) ^ _mix(torch.arange(num, dtype=torch.int64, device=key.device) + 1))


def fold_in(key: torch.Tensor, data) -> torch.Tensor:
    """A new key from ``key`` and an integer (or int64 tensor) ``data``."""
    key = _as_key(key)
    data = torch.as_tensor(data, dtype=torch.int64, device=key.device)
    return _mix(key ^ _mix(data + 0x632BE59BD9B4E019))


def _bits(key: torch.Tensor, n: int) -> torch.Tensor:
    counters = torch.arange(n, dtype=torch.int64, device=key.device)
    return _mix(_mix(key) + counters)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def uniform(key: torch.Tensor, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32,
            low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Uniform samples in ``[low, high)``."""
    key = _as_key(key)
    shape = tuple(shape)
    u = _srl(_bits(key, _numel(shape)), 11).to(torch.float64) * (2.0 ** -53)
    return (low + (high - low) * u).to(dtype).reshape(shape)


def normal(key: torch.Tensor, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal samples (Box-Muller on two uniform streams)."""
    key = _as_key(key)
    shape = tuple(shape)
    n = _numel(shape)
    u = _srl(_bits(key, 2 * n), 11).to(torch.float64) * (2.0 ** -53)
    u1, u2 = u[:n], u[n:]
    z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype).reshape(shape)


def bernoulli(key: torch.Tensor, p, shape: Sequence[int] = ()) -> torch.Tensor:
    """Boolean samples that are True with probability ``p`` (a float or a tensor broadcastable to shape)."""
    return uniform(key, shape, torch.float64) < torch.as_tensor(p, dtype=torch.float64)


def randint(key: torch.Tensor, low: int, high: int, shape: Sequence[int] = ()) -> torch.Tensor:
    """Integers uniform in ``[low, high)`` (int64)."""
    if high <= low:
        raise ValueError(f"pyfunctorch.random.randint: need low < high; got {low}, {high}.")
    key = _as_key(key)
    shape = tuple(shape)
    return (low + torch.remainder(_srl(_bits(key, _numel(shape)), 1), high - low)).reshape(shape)


def generator_for(key: torch.Tensor, device=None) -> torch.Generator:
    """A ``torch.Generator`` seeded from a (plain, 0-dim) key: lets any torch random op draw
    from a key's stream (``torch.randn(3, generator=generator_for(k))``)."""
    key = _as_key(key)
    g = torch.Generator(device=device or key.device)
    g.manual_seed(int(_srl(key, 1)))
    return g
