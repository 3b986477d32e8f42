"""Shared helpers for the pyfunctorch test suite.

Every transform result is compared with an independent oracle (torch.func, a Python
loop, torch.autograd or finite differences), never with pyfunctorch itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

import pyfunctorch
from pyfunctorch import _core

torch.set_num_threads(1)

CUDA = torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA is not available"))])
def device(request):
    """Run a test on the CPU and (when available) on CUDA."""
    return request.param


@pytest.fixture(autouse=True)
def _clean_stack():
    """Every test must end with no live transform level (a leak fails that test only)."""
    yield
    leaked = list(_core.interpreter_stack())
    if leaked:
        _core.interpreter_stack().clear()  # best effort, so later tests start clean
    assert leaked == [], f"the test left transform levels behind: {leaked}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_perf_warning_noise():
    # The loop fallback warns (PerformanceWarning) for ops without a batching rule; it is
    # correct, just slow, so it must not fail correctness tests.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyfunctorch.PerformanceWarning)
        yield


@pytest.fixture
def count_dispatch(monkeypatch):
    """The aten ops that reached a vmap level's dispatch (to show a fast path skipped it)."""
    from pyfunctorch.batched.interpreter import VmapInterpreter

    seen = []
    original = VmapInterpreter.dispatch

    def counting(self, func, args, kwargs):
        seen.append(func)
        return original(self, func, args, kwargs)

    monkeypatch.setattr(VmapInterpreter, "dispatch", counting)
    return seen


def _tols(dtype):
    if dtype == torch.float64:
        return 1e-7, 1e-7
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2, 1e-2
    return 1e-4, 1e-5


def assert_close(actual, expected, *, rtol=None, atol=None, msg=None):
    """torch.testing.assert_close over pytrees, with tolerances chosen from the dtype.

    Structure (container types, dict keys, lengths), shapes and dtypes must match exactly.
    """
    a_leaves, a_spec = torch.utils._pytree.tree_flatten(actual)
    e_leaves, e_spec = torch.utils._pytree.tree_flatten(expected)
    assert a_spec == e_spec, f"pytree structure differs:\n actual   {a_spec}\n expected {e_spec}"
    for a, e in zip(a_leaves, e_leaves):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"expected a tensor, got {type(a).__name__}: {a!r}"
            assert type(a) is torch.Tensor, f"a transform wrapper escaped: {type(a).__name__}"
            r, t = _tols(e.dtype)
            torch.testing.assert_close(
                a,
                e,
                rtol=r if rtol is None else rtol,
                atol=t if atol is None else atol,
                msg=msg,
            )
        else:
            assert a == e, msg or f"{a!r} != {e!r}"


@contextlib.contextmanager
def no_fallback(allow=()):
    """Assert that no op ran through vmap's per-example loop fallback in the block. The
    fallback warns only once per op per session, so its counters are watched too.
    ``allow``: ops that may still use it (outside the scope of the test)."""
    from pyfunctorch import batched

    before = dict(batched.FALLBACK_COUNTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if allow else "error", pyfunctorch.PerformanceWarning)
        yield
    new = {str(k): v for k, v in batched.FALLBACK_COUNTS.items() if before.get(k, 0) != v and k not in allow}
    assert not new, f"ops ran through the loop fallback: {new}"


def loop_vmap(f, in_dims=0, out_dims=0):
    """vmap's definition as a Python loop: the oracle for batching.

    Supports int/None/pytree-prefix in_dims over positional args and pytree out_dims."""
    tree_flatten = torch.utils._pytree.tree_flatten
    tree_unflatten = torch.utils._pytree.tree_unflatten

    def expand_prefix(prefix, tree):
        if prefix is None or isinstance(prefix, int):
            return [prefix] * len(tree_flatten(tree)[0])
        if isinstance(prefix, dict):
            out = []
            for k in tree:  # leaves in the tree's key order
                out += expand_prefix(prefix[k], tree[k])
            return out
        assert len(prefix) == len(tree)
        out = []
        for p, t in zip(prefix, tree):
            out += expand_prefix(p, t)
        return out

    def run(*args, **kwargs):
        flat, spec = tree_flatten(args)
        dims = expand_prefix(in_dims if not isinstance(in_dims, (tuple, list, dict)) else tuple(in_dims), args)
        sizes = {x.shape[d] for x, d in zip(flat, dims) if d is not None}
        assert len(sizes) == 1
        (B,) = sizes
        outs = []
        for b in range(B):
            ex = [x if d is None else x.select(d, b) for x, d in zip(flat, dims)]
            outs.append(f(*tree_unflatten(ex, spec), **kwargs))
        o_flat0, o_spec = tree_flatten(outs[0])
        odims = expand_prefix(out_dims, outs[0])
        cols = [tree_flatten(o)[0] for o in outs]
        res = []
        for i, d in enumerate(odims):
            if d is None:
                res.append(o_flat0[i])
            else:
                res.append(torch.stack([c[i] for c in cols], dim=d))
        return tree_unflatten(res, o_spec)

    return run


class CallCounter:
    """Wraps a function and counts its calls (to prove validation happens before running)."""

    def __init__(self, f):
        self.f = f
        self.calls = 0
        self.__name__ = getattr(f, "__name__", "counted")

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.f(*args, **kwargs)


def numerical_jacobian(f, args, argnum=0, eps=1e-6):
    """Central finite differences of ``f(*args)`` (a tensor output) with respect to the
    tensor ``args[argnum]``, in float64: shape ``out.shape + in.shape``."""
    args = list(args)
    x = args[argnum].detach().to(torch.float64)
    out0 = f(*[a if i != argnum else x for i, a in enumerate(args)])
    cols = []
    flat = x.reshape(-1)
    for k in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[k] = eps
        xp = (flat + e).reshape(x.shape)
        xm = (flat - e).reshape(x.shape)
        fp = f(*[a if i != argnum else xp for i, a in enumerate(args)])
        fm = f(*[a if i != argnum else xm for i, a in enumerate(args)])
        cols.append(((fp - fm) / (2 * eps)).reshape(-1))
    J = torch.stack(cols, dim=-1) if cols else torch.zeros(out0.numel(), 0, dtype=torch.float64)
    return J.reshape(tuple(out0.shape) + tuple(x.shape))


def fd_assert_close(actual, expected):
    """Comparison against finite differences (float64, central): looser tolerances."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def run_in_threads(work, n):
    """Run ``work()`` in ``n`` threads at once; the exceptions they raised (empty when none)."""
    errors = []

    def target():
        try:
            work()
        except Exception as e:  # reported to the caller
            errors.append(e)

    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
