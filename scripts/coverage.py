#!/usr/bin/env python
"""Operator coverage of pyfunctorch, measured over PyTorch's OpInfo database.

For every OpInfo in ``torch.testing._internal.common_methods_invocations.op_db``
that supports float32 on CPU, for its first sample inputs and several in_dims
(every tensor batched at dim 0 / at dim -1, only the first tensor, only the
others, plus one nested ``vmap(vmap(op))`` case per op) this compares
``pyfunctorch.vmap`` with a per-example loop over batches of 3 *different*
examples, and records how vmap served the op (batching rule, pointwise tag,
torch._decomp decomposition, loop fallback).

    python scripts/coverage.py                 # the full sweep (2 worker processes); writes
                                               # docs/coverage.md and docs/coverage_failures.txt
    python scripts/coverage.py --resume        # continue an interrupted full sweep
    python scripts/coverage.py --quick         # a representative slice of ~40 ops
    python scripts/coverage.py --ops mm,nn.functional.conv2d -v
    python scripts/coverage.py --ad            # AD coverage: vjp / vmap(vjp_fn) / jvp / ... / vjp(vmap), float64

A case is one (op, sample, in_dims). Its status is ``pass``; ``fail`` (vmap's result
differs from the loop's, or the examples' outputs have different shapes, i.e. the op
has a data-dependent output shape); ``error`` (vmap raised) or ``timeout``; or ``skip``
with a reason that is not pyfunctorch's failure (the loop itself raises on the
sample, the op is random, an in-place op is asked to write a batch into an unbatched
tensor, which torch.func refuses too ...).

The harness is importable (tests/test_opdb.py uses ``run_op``); only the main
process writes files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "build" / "opdb_coverage"
#: the device of the sample inputs (``--device``; a GPU run needs ``--device cuda``)
DEVICE = "cpu"
DOCS = ROOT / "docs"

BATCH = 3  # examples per vmap level
SAMPLES_PER_OP = 8  # sample inputs per op in the full sweep
MAX_NUMEL = 30_000  # skip samples whose tensors hold more elements than this (time guard)
CASE_TIMEOUT = 30  # seconds per case
OP_BUDGET = 150  # seconds per op: later samples are skipped ('op time budget')
NOISE = 0.05  # relative noise that makes the examples of a batch differ

IN_DIMS_KINDS = ("all0", "all-1", "first", "rest")
# plus "nested" (vmap(vmap(op)), once per op) and, for DATA_DEPENDENT ops, "ragged" (one
# all0 case whose examples differ in their zero pattern, so data-dependent output shapes
# differ: the case is expected to fail)

# -- ops that cannot be compared with a per-example loop ---------------------------------

RANDOM_OPS = {
    "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "normal", "uniform",
    "multinomial", "rand_like", "randn", "randn_like", "randint", "randint_like",
    "nn.functional.dropout", "nn.functional.dropout2d", "nn.functional.dropout3d",
    "nn.functional.alpha_dropout", "nn.functional.feature_alpha_dropout", "nn.functional.rrelu",
    "nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d",
    "svd_lowrank", "pca_lowrank",
}  # fmt: skip
# names with a variant that is *not* random
NOT_RANDOM_VARIANTS = {"nn.functional.feature_alpha_dropout.without_train"}

NO_BATCHED_FORM = {
    "empty": "uninitialized memory (factory without tensor inputs)",
    "empty_like": "uninitialized memory",
    "empty_strided": "uninitialized memory (factory without tensor inputs)",
    "empty_permuted": "uninitialized memory (factory without tensor inputs)",
    "new_empty": "uninitialized memory",
    "new_empty_strided": "uninitialized memory",
    "as_strided": "semantics refer to the storage, not the per-example tensor",
    "as_strided_copy": "semantics refer to the storage, not the per-example tensor",
    "as_strided_scatter": "semantics refer to the storage, not the per-example tensor",
    "resize_": "resizes storage in place (no per-example meaning)",
    "resize_as_": "resizes storage in place (no per-example meaning)",
}

#: expected to fail: the output shape (or a Python return value) depends on the data
DATA_DEPENDENT = {
    "nonzero": "data-dependent output shape",
    "argwhere": "data-dependent output shape",
    "unique": "data-dependent output shape",
    "unique_consecutive": "data-dependent output shape",
    "masked_select": "data-dependent output shape",
    "repeat_interleave": "data-dependent output shape (tensor repeats)",
    "bincount": "data-dependent output shape",
    "tensor_split": "data-dependent output shape (tensor indices_or_sections)",
    "item": "returns a Python scalar (data-dependent)",
    "allclose": "returns a Python bool (data-dependent)",
    "equal": "returns a Python bool (data-dependent)",
}

#: (atol, rtol) by op-name prefix; the default is DEFAULT_TOL
DEFAULT_TOL = (1e-4, 1.3e-5)
#: (atol, rtol) floors for half-precision samples (a few units in the last place)
HALF_TOL = {torch.float16: (1e-3, 4e-3), torch.bfloat16: (1e-2, 3.2e-2)}
TOLERANCES = {
    "linalg.": (1e-3, 1e-3),
    "fft.": (1e-4, 1e-4),
    "cholesky": (1e-3, 1e-3),
    "svd": (1e-3, 1e-3),
    "pinverse": (1e-3, 1e-3),
    "matrix_exp": (1e-3, 1e-3),
    "lu": (1e-3, 1e-3),
    "qr": (1e-3, 1e-3),
    "geqrf": (1e-3, 1e-3),
    "ormqr": (1e-3, 1e-3),
    "triangular_solve": (1e-3, 1e-3),
    "logdet": (1e-3, 1e-3),
    "cdist": (1e-4, 1e-4),
    "nn.functional.conv": (1e-4, 1e-4),
    "nn.functional.pdist": (1e-4, 1e-4),
    "cov": (1e-4, 1e-4),
    "corrcoef": (1e-4, 1e-4),
    "stft": (1e-4, 1e-4),
    "nn.functional.scaled_dot_product_attention": (1e-4, 1e-4),
    "nn.functional.multi_head_attention_forward": (1e-4, 1e-4),
}

#: the representative slice of --quick (and of tests/test_opdb.py)
QUICK_OPS = [
    # pointwise
    "abs", "add", "mul", "div.no_rounding_mode", "where", "clamp", "sigmoid", "exp", "pow",
    "lerp", "addcmul",
    # reductions / scans / sorting
    "sum", "mean", "amax", "var", "softmax", "log_softmax", "cumsum", "argmax", "sort", "topk",
    "logsumexp",
    # views and shape ops
    "view", "reshape", "permute", "transpose", "narrow", "cat", "stack", "expand", "squeeze",
    "unsqueeze", "flatten", "select", "movedim",
    # matmul
    "mm", "bmm", "matmul", "addmm", "nn.functional.linear", "einsum",
    # conv / pooling
    "nn.functional.conv2d", "nn.functional.max_pool2d", "nn.functional.avg_pool2d",
    # indexing
    "index_select", "gather", "take_along_dim", "__getitem__", "scatter", "index_put",
    # normalization / losses / embedding
    "nn.functional.layer_norm", "nn.functional.batch_norm", "nn.functional.embedding",
    "nn.functional.cross_entropy", "nn.functional.mse_loss", "nn.functional.nll_loss",
    "linalg.vector_norm",
]  # fmt: skip


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise SystemExit(f"--dtype: {name!r} is not a torch dtype")
    return dt


def op_key(op) -> str:
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


def load_ops(names=None, dtype=torch.float32):
    """OpInfos that support ``dtype`` on CPU (those named in ``names``, by key or base
    name, if given)."""
    from torch.testing._internal.common_methods_invocations import op_db

    ops = [o for o in op_db if dtype in o.supported_dtypes(DEVICE)]
    if names is not None:
        want = set(names)
        ops = [o for o in ops if op_key(o) in want or o.name in want]
        found = {op_key(o) for o in ops} | {o.name for o in ops}
        missing = want - found
        if missing:
            raise SystemExit(f"unknown op(s) (no {dtype} CPU OpInfo): {', '.join(sorted(missing))}")
    return ops


def tolerance(key: str):
    best = None
    for prefix, tol in TOLERANCES.items():
        if key.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, tol)
    return best[1] if best else DEFAULT_TOL


def static_skip_reason(key: str, name: str) -> str | None:
    if key not in NOT_RANDOM_VARIANTS and (name in RANDOM_OPS or key in RANDOM_OPS):
        return "random"
    for n in (key, name):
        if n in NO_BATCHED_FORM:
            return "no batched form: " + NO_BATCHED_FORM[n]
    if name.startswith("jiterator_"):
        return "CUDA-only (jiterator)"
    return None


# -- building cases ---------------------------------------------------------------------------


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"case took more than {CASE_TIMEOUT}s")


class _time_limit:
    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        self.ok = hasattr(signal, "SIGALRM") and _is_main_thread()
        if self.ok:
            self.old = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(self.seconds)

    def __exit__(self, *exc):
        if self.ok:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self.old)
        return False


def _is_main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def _flatten_sample(sample):
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten((sample.input, tuple(sample.args), dict(sample.kwargs)))
    tpos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    return leaves, spec, tpos


def _out_leaves(out):
    """Flatten an op's output (tensors, tuples, lists, return_types) into leaves."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        res = []
        for o in out:
            res.extend(_out_leaves(o))
        return res
    if isinstance(out, dict):
        res = []
        for k in out:
            res.extend(_out_leaves(out[k]))
        return res
    return [out]


def _user_callable(op):
    """How user code calls the op: ``torch.NAME`` looked up at call time. (An OpInfo holds
    the function object from import time; pyfunctorch replaces a few torch entry points
    while a transform is live -- factories, random functions, tensor_split -- and user code,
    which looks ``torch.NAME`` up when it runs, sees those.)"""
    fn = getattr(op, "op", None)
    for path in (op.name, getattr(fn, "__name__", None) or ""):
        owner, _, attr = ("torch." + path).rpartition(".")
        try:
            mod = eval(owner, {"torch": torch})  # noqa: S307 (a dotted name of torch's)
        except Exception:  # noqa: BLE001
            continue
        if attr and getattr(mod, attr, None) is fn:
            return lambda *a, **k: getattr(mod, attr)(*a, **k)
    return op


def _make_fn(op, leaves, spec, tpos):
    """f(*tensor_leaves) -> tuple of the op's tensor outputs; the op's non-tensor outputs
    go to ``f.py_out`` (the last call's)."""
    from torch.utils import _pytree as pytree

    call = _user_callable(op)

    def f(*ts):
        ls = list(leaves)
        for p, t in zip(tpos, ts):
            ls[p] = t
        inp, args, kwargs = pytree.tree_unflatten(ls, spec)
        out = call(inp, *args, **kwargs)
        outs = _out_leaves(out)
        f.py_out = [o for o in outs if not isinstance(o, torch.Tensor)]
        return tuple(o for o in outs if isinstance(o, torch.Tensor))

    f.py_out = []
    return f


def _variant(t: torch.Tensor, idx: int, mode: str, seed: int) -> torch.Tensor:
    """Example ``idx`` of a batch built from the sample tensor ``t`` (example 0 is ``t``).
    Floating tensors get relative noise (zeros, signs and sparsity patterns stay);
    integer and bool tensors (indices, masks) are permuted in 'vary' mode, so their
    values stay valid, and repeated otherwise."""
    if (idx == 0 and mode != "ragged") or t.numel() == 0 or mode == "repeat":
        return t.detach().clone()
    g = torch.Generator().manual_seed(seed * 1009 + idx)
    if mode == "ragged":
        # example idx has its first 2*idx elements zero (False) and distinct nonzero values
        # elsewhere: the examples differ in their number of nonzeros and of unique values
        n = t.numel()
        if t.dtype is torch.bool:
            v = torch.ones(n, dtype=torch.bool)
        elif t.is_floating_point() or t.is_complex():
            v = (torch.randperm(n, generator=g) + 1).to(t.dtype) * (1 + 0.1 * torch.rand(n, generator=g)).to(t.real.dtype)
        else:
            v = (torch.randperm(n, generator=g) + 1).to(t.dtype)
        v[: 2 * idx] = 0
        return v.reshape(t.shape).to(t.device)
    if t.is_floating_point() or t.is_complex():
        rdt = t.real.dtype if t.is_complex() else t.dtype
        noise = 1 + NOISE * torch.randn(t.shape, generator=g, dtype=torch.float64)
        return (t.detach() * noise.to(device=t.device, dtype=rdt)).to(t.dtype)
    if mode == "vary":
        perm = torch.randperm(t.numel(), generator=g).to(t.device)
        return t.detach().reshape(-1)[perm].reshape(t.shape).clone()
    return t.detach().clone()


def _physical(t, dims, sizes, mode, seed, prefix=()):
    """The physical tensor for leaf ``t`` batched at ``dims[l]`` (None: unbatched) of each
    vmap level ``l`` (outermost first) with batch sizes ``sizes``."""
    lvl = len(prefix)
    if lvl == len(dims):
        flat = 0
        for i, b in zip(prefix, sizes):
            flat = flat * b + i
        return _variant(t, flat, mode, seed)
    d = dims[lvl]
    if d is None:
        return _physical(t, dims, sizes, mode, seed, prefix + (0,))
    parts = [_physical(t, dims, sizes, mode, seed, prefix + (i,)) for i in range(sizes[lvl])]
    return torch.stack(parts, dim=d)


def _example(x, dims, index):
    for d, i in zip(dims, index):
        if d is not None:
            x = x.select(d, i)
    return x


def _multi_indices(sizes):
    idx = [()]
    for b in sizes:
        idx = [p + (i,) for p in idx for i in range(b)]
    return idx


def _stack_nested(outs_by_index, sizes):
    """Stack per-example tuples of tensors into tuples of batched tensors (batch dims
    at the front, outermost first)."""
    n = len(outs_by_index[0])
    res = []
    for k in range(n):
        cols = [o[k] for o in outs_by_index]
        x = torch.stack(cols)
        res.append(x.reshape(tuple(sizes) + cols[0].shape))
    return tuple(res)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().split("\n")[0]
    return s[:300]


class _LoopError(Exception):
    pass


def _run_loop(f, phys, leaf_dims, sizes):
    """The reference: f on every example, stacked. Raises _LoopError if an example raises
    or its Python outputs differ; returns ('ragged', shapes) if output shapes differ."""
    outs = []
    pys = []
    py = None
    for index in _multi_indices(sizes):
        ex = [_example(x, dims, index) for x, dims in zip(phys, leaf_dims)]
        try:
            o = f(*ex)
        except CaseTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            raise _LoopError(f"{type(e).__name__}: {_first_line(e)}") from None
        outs.append(o)
        pys.append(f.py_out)
        if py is None:
            py = f.py_out
    if any(not _py_equal(py, p) for p in pys):
        # vmap's answer: the per-example Python values stacked into tensors (after the outputs)
        if any(len(p) != len(py) or not all(isinstance(v, (bool, int, float, complex)) for v in p) for p in pys):
            raise _LoopError("the op returns per-example Python values that are not numbers: not compared")
        return "pyvalues", [o + tuple(torch.as_tensor(v) for v in p) for o, p in zip(outs, pys)]
    if any(x.layout != torch.strided for o in outs for x in o):
        raise _LoopError("non-strided (sparse) output: not compared")
    shapes = {tuple(tuple(x.shape) for x in o) for o in outs}
    if len(shapes) != 1 or len({len(o) for o in outs}) != 1:
        return "ragged", outs
    return "ok", (_stack_nested(outs, sizes), py)


def _same(x, y):
    try:
        return x.shape == y.shape and bool(torch.equal(x, y) or torch.allclose(x, y, equal_nan=True))
    except Exception:  # noqa: BLE001
        return False


def _py_equal(a, b):
    try:
        return len(a) == len(b) and all(bool(x == y) or (x != x and y != y) for x, y in zip(a, b))
    except Exception:  # noqa: BLE001
        return False


def _compare(actual, expected, atol, rtol):
    if not isinstance(actual, tuple):
        actual = (actual,)
    if len(actual) != len(expected):
        raise AssertionError(f"vmap returned {len(actual)} tensors, the loop {len(expected)}")
    from pyfunctorch._core import LevelTensor

    for a, e in zip(actual, expected):
        if not isinstance(a, torch.Tensor):
            raise AssertionError(f"vmap returned a {type(a).__name__}, not a tensor")
        if isinstance(a, LevelTensor):
            raise AssertionError(f"vmap returned a {type(a).__name__} (a wrapper escaped)")
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True, check_layout=False)


def run_case(op, sample, leaves, spec, tpos, kind, seed, key):
    """One (sample, in_dims) case. ``kind`` is one of IN_DIMS_KINDS or 'nested'."""
    import pyfunctorch
    from pyfunctorch.errors import RandomnessError

    nt = len(tpos)
    if kind == "nested":
        sizes = (2, BATCH)
        leaf_dims = [(-1, 0)] * nt  # outer level at the last dim, inner at dim 0
    else:
        sizes = (BATCH,)
        if kind in ("all0", "ragged"):
            d = [0] * nt
        elif kind == "all-1":
            d = [-1] * nt
        elif kind == "first":
            d = [0] + [None] * (nt - 1)
        elif kind == "rest":
            d = [None] + [0] * (nt - 1)
        else:
            raise ValueError(kind)
        leaf_dims = [(x,) for x in d]
    f = _make_fn(op, leaves, spec, tpos)
    atol, rtol = tolerance(key)
    low = {leaves[p].dtype for p in tpos} & set(HALF_TOL)
    if low:  # half precision: a batched kernel may round in another order than one example's
        atol, rtol = max(atol, *(HALF_TOL[d][0] for d in low)), max(rtol, *(HALF_TOL[d][1] for d in low))
    case = {"in_dims": kind}

    # 1. the reference; try less varied batches if the loop cannot run a varied one
    expected = None
    loop_err = None
    modes = ("vary-float", "repeat") if key in FIXED_INT_INPUTS else ("vary", "vary-float", "repeat")
    for mode in ("ragged",) if kind == "ragged" else modes:
        def phys_now():
            return [
                _physical(leaves[p], dims, sizes, mode, seed + 7 * j) if any(x is not None for x in dims) else leaves[p].clone()
                for j, (p, dims) in enumerate(zip(tpos, leaf_dims))
            ]

        ph = phys_now()
        before = [x.clone() if all(d is None for d in dims) else None for x, dims in zip(ph, leaf_dims)]
        try:
            res, val = _run_loop(f, ph, leaf_dims, sizes)
        except _LoopError as e:
            loop_err = loop_err or str(e)
            continue
        if res == "pyvalues":
            # Python outputs (bool, number) that differ between examples: a function returning
            # them from vmap gets them stacked into a tensor (per-example re-run), as the loop
            case.update(mode=mode, pyvalues=True)

            def g(*ts):
                outs = f(*ts)
                return outs + tuple(f.py_out)

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    actual = _vmapped(pyfunctorch, g, leaf_dims, sizes)(*phys_now())
                _compare(actual, _stack_nested(val, sizes), atol, rtol)
            except CaseTimeout:
                raise
            except AssertionError as e:
                case.update(status="fail", etype="Mismatch", err="per-example Python values: " + _first_line(e))
                return case
            except Exception as e:  # noqa: BLE001
                case.update(status="error", etype=type(e).__name__, err="per-example Python values: " + _first_line(e))
                return case
            case["status"] = "pass"
            return case
        if res == "ragged":
            # the examples' outputs differ in shape: vmap must raise or return nested
            # (jagged) tensors holding each example's output
            case["mode"] = mode
            case["ragged"] = True
            shapes = sorted({tuple(tuple(x.shape) for x in o) for o in val})[:3]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    actual = _vmapped(pyfunctorch, f, leaf_dims, sizes)(*phys_now())
                _compare_ragged(actual, val, atol, rtol)
            except CaseTimeout:
                raise
            except AssertionError as e:
                case.update(status="fail", etype="Mismatch",
                            err=f"data-dependent output shape {shapes}: " + _first_line(e) + " " + _mismatch_detail(e))
                return case
            except Exception as e:  # noqa: BLE001
                case.update(status="error", etype=type(e).__name__,
                            err=f"data-dependent output shape {shapes}: " + _first_line(e))
                return case
            case["status"] = "pass"
            return case
        expected = val
        case["mode"] = mode
        # does the op itself write into an input that is not batched? (fresh clones: version 0)
        writes_unbatched = any(
            b is not None and (x._version > 0 or not _same(x, b)) for x, b in zip(ph, before)
        )
        break
    if expected is None:
        loop_err = loop_err or "?"
        case.update(status="skip", reason=loop_err if loop_err.startswith("non-strided") else "loop raises: " + loop_err)
        return case

    # 2. vmap
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            actual = _vmapped(pyfunctorch, f, leaf_dims, sizes)(*phys_now())
    except CaseTimeout:
        raise
    except RandomnessError as e:
        case.update(status="skip", reason="random: " + _first_line(e))
        return case
    except Exception as e:  # noqa: BLE001
        msg = _first_line(e)
        if (writes_unbatched and _INPLACE_REFUSALS[0] in msg) or _INPLACE_REFUSALS[1] in msg:
            case.update(status="skip", reason="in-place write of a batch into an unbatched tensor (torch.func refuses too)")
        else:
            case.update(status="error", etype=type(e).__name__, err=msg)
        return case
    expected, py_expected = expected
    try:
        _compare(actual, expected, atol, rtol)
        if not _py_equal(f.py_out, py_expected):
            raise AssertionError(f"non-tensor outputs differ: vmap {f.py_out!r:.80} loop {py_expected!r:.80}")
    except AssertionError as e:
        case.update(status="fail", etype="Mismatch", err=_first_line(e) + " " + _mismatch_detail(e))
        return case
    case["status"] = "pass"
    return case


def _compare_ragged(actual, per_example, atol, rtol):
    """vmap's outputs against per-example outputs of different shapes (single level)."""
    if not isinstance(actual, tuple):
        actual = (actual,)
    if len(actual) != len(per_example[0]):
        raise AssertionError(f"vmap returned {len(actual)} tensors, the loop {len(per_example[0])}")
    for k, a in enumerate(actual):
        parts = a.unbind() if a.is_nested else a.unbind(0)
        if len(parts) != len(per_example):
            raise AssertionError(f"output {k} holds {len(parts)} examples, expected {len(per_example)}")
        for p, o in zip(parts, per_example):
            torch.testing.assert_close(p, o[k], atol=atol, rtol=rtol, equal_nan=True, check_layout=False)


#: vmap refusing to write per-example values into a tensor that is not batched (as
#: torch.func does): the loop's sequential side effects have no batched meaning. The first
#: counts as a legitimate refusal only if the op itself wrote into an unbatched input in
#: the loop (not if some decomposition's internal buffer was unbatched); the second (batch
#: norm in training mode with unbatched running stats) always.
_INPLACE_REFUSALS = (
    "writes batched values into a tensor that is not batched",
    "running_mean/running_var that are not batched",
)


def _mismatch_detail(e):
    lines = [ln.strip() for ln in str(e).split("\n") if ln.strip()]
    return " | ".join(lines[1:3])[:200]


def _vmapped(pyfunctorch, f, leaf_dims, sizes):
    g = f
    for lvl in reversed(range(len(sizes))):
        g = pyfunctorch.vmap(g, in_dims=tuple(d[lvl] for d in leaf_dims))
    return g


SAMPLE_POOL = 64  # samples are picked evenly from the op's first SAMPLE_POOL


def _pick_samples(op, dtype, k, requires_grad=False):
    """Up to ``k`` (index, SampleInput) spread evenly over the op's first SAMPLE_POOL sample
    inputs (the first ones are often all tiny or 0-dim); and a note if generation raised."""
    pool = []
    err = None
    it = iter(op.sample_inputs(DEVICE, dtype, requires_grad=requires_grad))
    while len(pool) < SAMPLE_POOL:
        try:
            pool.append(next(it))
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001
            err = f"sample_inputs raises: {type(e).__name__}"
            break
    if len(pool) <= k:
        return list(enumerate(pool)), err
    idx = sorted({round(i * (len(pool) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
    return [(i, pool[i]) for i in idx], err


def _sample_numel(leaves, tpos):
    return sum(leaves[p].numel() for p in tpos)


def _is_random_sample(op, leaves, spec, tpos):
    """True if two runs of the op with different seeds differ (a random op). Within the dtype's
    default tolerance: LAPACK (lstsq's gelsy) may differ in the last bits from run to run."""
    f = _make_fn(op, leaves, spec, tpos)
    outs = []
    for s in (1, 2):
        torch.manual_seed(s)
        outs.append(f(*[leaves[p].clone() for p in tpos]))
    a, b = outs
    if len(a) != len(b):
        return True
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return True
        try:
            torch.testing.assert_close(x, y, equal_nan=True, check_layout=False)
        except AssertionError:
            return True
        except Exception:  # noqa: BLE001
            return False
    return False


#: ops whose integer inputs must keep their values in every example: permuting LDL pivots makes
#: them invalid (2x2 blocks at the edges), and LAPACK then reads out of bounds
FIXED_INT_INPUTS = {"linalg.ldl_solve"}


def run_op(op, max_samples=SAMPLES_PER_OP, kinds=IN_DIMS_KINDS, nested=True, budget=OP_BUDGET, log=None,
           dtype=torch.float32):
    """Run every case of one OpInfo. Returns a JSON-able dict."""
    from pyfunctorch import _coverage

    key = op_key(op)
    t0 = time.time()
    res = {"op": key, "cases": [], "skip": None}
    reason = static_skip_reason(key, op.name)
    if reason is not None:
        res["skip"] = reason
        return res
    seed = zlib.crc32(key.encode()) % 100_000
    torch.manual_seed(seed)
    notes = Counter()
    try:
        samples, sample_err = _pick_samples(op, dtype, max_samples)
    except Exception as e:  # noqa: BLE001
        res["skip"] = f"sample_inputs raises: {type(e).__name__}: {_first_line(e)}"
        return res
    if sample_err:
        notes[sample_err] += 1
    ran_nested = not nested
    ran_ragged = False
    with _coverage.trace_vmap() as trace:
        for si, sample in samples:
            if time.time() - t0 > budget:
                notes["op time budget exhausted"] += 1
                break
            leaves, spec, tpos = _flatten_sample(sample)
            if not tpos:
                notes["no tensor inputs"] += 1
                continue
            if any(leaves[p].layout != torch.strided for p in tpos):
                notes["non-strided (sparse) inputs"] += 1
                continue
            if _sample_numel(leaves, tpos) > MAX_NUMEL:
                notes["sample too large"] += 1
                continue
            try:
                with _time_limit(CASE_TIMEOUT):
                    random = _is_random_sample(op, leaves, spec, tpos)
            except Exception as e:  # noqa: BLE001
                res["cases"].append({"sample": si, "in_dims": "*", "status": "skip",
                                     "reason": f"loop raises: {type(e).__name__}: {_first_line(e)}"})
                continue
            if random:
                res["cases"].append({"sample": si, "in_dims": "*", "status": "skip", "reason": "random"})
                continue
            todo = [k for k in kinds if not (k == "rest" and len(tpos) < 2) and not (k == "first" and len(tpos) < 2)]
            if not ran_nested:
                todo.append("nested")
            if not ran_ragged and min(leaves[p].numel() for p in tpos) >= 2 * BATCH - 1 and (
                key in DATA_DEPENDENT or op.name in DATA_DEPENDENT
            ):
                todo.append("ragged")  # examples whose outputs differ in shape
                ran_ragged = True
            for kind in todo:
                t1 = time.time()
                try:
                    with _time_limit(CASE_TIMEOUT):
                        case = run_case(op, sample, leaves, spec, tpos, kind, seed + si, key)
                except CaseTimeout as e:
                    case = {"in_dims": kind, "status": "timeout", "etype": "Timeout", "err": str(e)}
                except Exception as e:  # noqa: BLE001  (a bug of this harness, not of pyfunctorch)
                    case = {"in_dims": kind, "status": "skip",
                            "reason": f"harness error: {type(e).__name__}: {_first_line(e)}"}
                case["sample"] = si
                case["t"] = round(time.time() - t1, 3)
                res["cases"].append(case)
                if kind == "nested" and case["status"] != "skip":
                    ran_nested = True
                if log:
                    log(f"  {key} sample {si} {kind}: {case['status']} {case.get('err', case.get('reason', ''))}")
    res["how"] = trace.how()
    res["loop_ops"] = {str(k): v for k, v in trace.loop.items()}
    res["served"] = trace.worst()
    res["notes"] = dict(notes)
    res["time"] = round(time.time() - t0, 2)
    return res


# -- summarising ------------------------------------------------------------------------------

FAILING = ("fail", "error", "timeout")


def op_summary(r):
    c = Counter(x["status"] for x in r["cases"])
    n_run = sum(c[s] for s in ("pass",) + FAILING)
    first = next((x for x in r["cases"] if x["status"] in FAILING), None)
    if r.get("skip"):
        verdict = "skipped"
        reason = r["skip"]
    elif n_run == 0:
        verdict = "skipped"
        skips = Counter(x.get("reason", "?") for x in r["cases"] if x["status"] == "skip")
        reason = skips.most_common(1)[0][0] if skips else (", ".join(r.get("notes", {})) or "no samples")
        if r.get("crash"):
            verdict, reason = "crash", r["crash"]
    elif first is not None:
        verdict = "fail"
        reason = f"{first.get('etype', '')}: {first.get('err', '')} (sample {first.get('sample')}, in_dims {first.get('in_dims')})"
    else:
        verdict = "pass"
        reason = ""
    name = r["op"]
    base = name.split(".")[0] if name not in DATA_DEPENDENT else name
    if verdict == "fail" and (name in DATA_DEPENDENT or base in DATA_DEPENDENT):
        reason = f"[expected: {DATA_DEPENDENT.get(name, DATA_DEPENDENT.get(base))}] " + reason
    return {"op": name, "verdict": verdict, "reason": reason, "counts": c, "n_run": n_run,
            "served": r.get("served"), "loop_ops": r.get("loop_ops", {}), "first": first}


def _group_message(msg: str) -> str:
    """A failure message with the op-specific details blurred, for grouping."""
    m = re.sub(r"aten\.[\w.]+", "aten.<op>", msg)
    m = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", m)
    m = re.sub(r"\[[^\]]*\]", "[..]", m)
    m = re.sub(r"\([^)]*\)", "(..)", m)
    return m[:140]


def _failure_groups(results, key):
    """Failing cases counted by ``key(case)``, and the ops that have each."""
    groups, ops = Counter(), {}
    for r in results:
        for x in r["cases"]:
            if x["status"] in FAILING:
                g = key(x)
                groups[g] += 1
                ops.setdefault(g, set()).add(r["op"])
    return groups, ops


def summarise(results, out=print, top=30):
    results = sorted(results, key=lambda r: r["op"])
    sums = [op_summary(r) for r in results]
    cases = Counter()
    for r in results:
        for x in r["cases"]:
            cases[x["status"]] += 1
    n_run = sum(cases[s] for s in ("pass",) + FAILING)
    verdicts = Counter(s["verdict"] for s in sums)
    tested = [s for s in sums if s["n_run"] > 0]
    no_loop = [s for s in tested if not s["loop_ops"]]
    nested = Counter(x["status"] for r in results for x in r["cases"] if x["in_dims"] == "nested")
    out(f"ops: {len(sums)} OpInfos ({len(tested)} tested, {verdicts['skipped']} skipped, {verdicts['crash']} crashed)")
    out(f"cases: {cases['pass']}/{n_run} pass ({100 * cases['pass'] / max(n_run, 1):.1f}%); "
        f"fail {cases['fail']}, error {cases['error']}, timeout {cases['timeout']}; skipped {cases['skip']}")
    skips = Counter()
    for r in results:
        for x in r["cases"]:
            if x["status"] == "skip":
                skips[x.get("reason", "?").split(":")[0]] += 1
    if skips:
        out("skipped cases: " + ", ".join(f"{k}: {v}" for k, v in skips.most_common()))
    op_skips = Counter(s["reason"].split(":")[0] for s in sums if s["verdict"] == "skipped")
    if op_skips:
        out("skipped ops: " + ", ".join(f"{k}: {v}" for k, v in op_skips.most_common()))
    out(f"nested vmap(vmap(op)) cases: {nested['pass']}/{sum(nested[s] for s in ('pass',) + FAILING)} pass")
    out(f"ops fully passing: {verdicts['pass']}/{len(tested)} tested ({100 * verdicts['pass'] / max(len(tested), 1):.1f}%)")
    out(f"ops served without the loop fallback: {len(no_loop)}/{len(tested)} ({100 * len(no_loop) / max(len(tested), 1):.1f}%)")
    served = Counter(s["served"] or "no aten op reached vmap" for s in tested)
    out("slowest path taken per tested op: " + ", ".join(f"{k}: {v}" for k, v in served.most_common()))
    groups, examples = _failure_groups(results, lambda x: f"{x.get('etype', '')}: {_group_message(x.get('err', ''))}")
    if groups:
        out("top failure causes (cases, ops):")
        for g, n in groups.most_common(15):
            ops = sorted(examples[g])
            out(f"  {n:5d} cases {len(ops):4d} ops  {g}   e.g. {', '.join(ops[:4])}")
    failing = [s for s in sums if s["verdict"] in ("fail", "crash")]
    failing.sort(key=lambda s: -sum(s["counts"][k] for k in FAILING))
    if failing:
        out(f"most failing ops (of {len(failing)}):")
        for s in failing[:top]:
            nf = sum(s["counts"][k] for k in FAILING)
            out(f"  {s['op']:45s} {nf:3d}/{s['n_run']:<3d} {s['reason'][:110]}")
    loops = Counter()
    for s in tested:
        for k in s["loop_ops"]:
            loops[k] += 1
    if loops:
        out("aten ops most often served by the loop fallback (number of OpInfos): "
            + ", ".join(f"{k} ({v})" for k, v in loops.most_common(25)))
    return sums


def write_docs(results, sums, meta):
    DOCS.mkdir(exist_ok=True)
    lines = []
    summary_lines = []
    summarise(results, out=summary_lines.append)
    lines.append("# Operator coverage of pyfunctorch.vmap over PyTorch's OpInfo database")
    lines.append("")
    lines.append("Generated by `python scripts/coverage.py` (do not edit by hand). "
                 f"torch {torch.__version__}; {meta}.")
    lines.append("")
    lines.append("Each case compares `pyfunctorch.vmap` with a per-example loop over a batch of "
                 f"{BATCH} different examples built from one OpInfo sample input, for the in_dims "
                 "`all0` (every tensor batched at dim 0), `all-1` (at the last dim), `first` "
                 "(only the first tensor), `rest` (all but the first), plus one `nested` "
                 "`vmap(vmap(op))` case per op. *served* is the slowest path any aten op took: "
                 "`rule` < `pointwise-tag` < `decomposition` < `loop` (the per-example fallback). "
                 "Skipped cases are not pyfunctorch's failures (the loop itself raises, random "
                 "ops, no batched form ...). Ops whose examples return different Python values "
                 "(`item`, `allclose`, `equal`) are compared as vmap returns them: stacked into a "
                 "tensor. Ops whose examples' outputs differ in shape (`nonzero`, `unique`, "
                 "`masked_select`, ...) get a `ragged` case, compared with the nested tensor vmap "
                 "returns; those ops and the Python-valued ones stay on the per-example loop by "
                 "nature. The same sweep in other dtypes: `--dtype complex64` "
                 "([coverage_complex64.md](coverage_complex64.md)), `--dtype int64` "
                 "([coverage_int64.md](coverage_int64.md)), `--dtype bfloat16` "
                 "([coverage_bfloat16.md](coverage_bfloat16.md)). Reproduce one op with "
                 "`python scripts/coverage.py --ops NAME -v`; every case's record (status, exception "
                 "type and first line) is in `build/opdb_coverage/vmap.*.jsonl` after a run.")
    lines.append("")
    lines.append("```")
    lines.extend(summary_lines)
    lines.append("```")
    lines.append("")
    lines.append("| op | verdict | pass | fail | error | skip | served | loop-fallback aten ops | first failure / skip reason |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for s in sums:
        c = s["counts"]
        loops = ", ".join(sorted(k.replace("aten.", "") for k in s["loop_ops"]))
        reason = s["reason"].replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| `{s['op']}` | {s['verdict']} | {c['pass']} | {c['fail']} | {c['error'] + c['timeout']} | "
                     f"{c['skip']} | {s['served'] or ''} | {loops} | {reason} |")
    (DOCS / "coverage.md").write_text("\n".join(lines) + "\n")
    fl = ["# OpInfos for which pyfunctorch.vmap fails at least one case of scripts/coverage.py.",
          "# Generated by `python scripts/coverage.py`; one op per line: `name: reason`.",
          "# tests/test_opdb.py (slow) expects exactly these to fail: fix an op, then regenerate.",
          ""]
    for s in sums:
        if s["verdict"] in ("fail", "crash"):
            fl.append(f"{s['op']}: {s['reason'][:200]}".replace("\n", " "))
    (DOCS / "coverage_failures.txt").write_text("\n".join(fl) + "\n")


def read_failures(path=DOCS / "coverage_failures.txt"):
    out = {}
    if not Path(path).exists():
        return out
    for ln in Path(path).read_text().splitlines():
        if not ln.strip() or ln.startswith("#"):
            continue
        name, _, reason = ln.partition(": ")
        out[name.strip()] = reason
    return out


# -- AD coverage ---------------------------------------------------------------------------------


def run_op_ad(op, max_samples=4, budget=OP_BUDGET, dtype=torch.float64):
    """vjp vs torch.autograd.grad, vmap(vjp_fn) vs a loop, jvp vs forward_ad, vmap(jvp) over a
    batch of tangents vs forward_ad per tangent, and vmap(vjp) over a batch of primals (per-example
    gradients) vs a loop of torch.autograd.grad (float64)."""
    import pyfunctorch
    from torch.autograd import forward_ad as fwAD
    from torch.utils import _pytree as pytree

    key = op_key(op)
    res = {"op": key, "cases": [], "skip": None}
    reason = static_skip_reason(key, op.name)
    if reason is None and not op.supports_autograd:
        reason = "no autograd support"
    if reason is None and dtype not in op.supported_dtypes(DEVICE):
        reason = f"no {dtype}"
    if reason is None and dtype.is_complex and not getattr(op, "supports_complex_autograd", lambda _d: True)(DEVICE):
        reason = "no complex autograd"
    if reason is not None:
        res["skip"] = reason
        return res
    t0 = time.time()
    seed = zlib.crc32(key.encode()) % 100_000
    torch.manual_seed(seed)
    try:
        it = iter(op.sample_inputs(DEVICE, dtype, requires_grad=True))
    except Exception as e:  # noqa: BLE001
        res["skip"] = f"sample_inputs raises: {type(e).__name__}"
        return res
    for si in range(max_samples):
        try:
            sample = next(it)
        except StopIteration:
            break
        except Exception:  # noqa: BLE001
            break
        if time.time() - t0 > budget:
            break
        leaves, spec, tpos = _flatten_sample(sample)
        dpos = [p for p in tpos if leaves[p].requires_grad and (leaves[p].is_floating_point() or leaves[p].is_complex())
                and leaves[p].layout == torch.strided]
        if not dpos or _sample_numel(leaves, tpos) > MAX_NUMEL or any(leaves[p].layout != torch.strided for p in tpos):
            continue
        primals = [leaves[p].detach() for p in dpos]

        def f(*xs):
            ls = list(leaves)
            for p, x in zip(dpos, xs):
                ls[p] = x
            for p in tpos:
                if p not in dpos:
                    ls[p] = ls[p].detach()
            inp, args, kwargs = pytree.tree_unflatten(ls, spec)
            outs = _out_leaves(op(inp, *args, **kwargs))
            return tuple(o for o in outs if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex()))

        # the reference outputs
        try:
            with _time_limit(CASE_TIMEOUT):
                xs = [x.clone().requires_grad_() for x in primals]
                ref_out = f(*xs)
                diff_outs = [o for o in ref_out if o.requires_grad]
                if not diff_outs:
                    raise _LoopError("no differentiable outputs")
                g = torch.Generator().manual_seed(seed + si)
                cts = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in ref_out]
                ref_grads = torch.autograd.grad([o for o in ref_out if o.requires_grad],
                                                xs, [c for o, c in zip(ref_out, cts) if o.requires_grad],
                                                allow_unused=True)
                ref_grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(xs, ref_grads)]
        except Exception as e:  # noqa: BLE001
            res["cases"].append({"sample": si, "in_dims": "vjp", "status": "skip",
                                 "reason": f"autograd raises: {type(e).__name__}: {_first_line(e)}"})
            continue
        mask = [o.requires_grad for o in ref_out]

        def fd(*xs):
            return tuple(o for o, m in zip(f(*xs), mask) if m)

        cts_d = [c for c, m in zip(cts, mask) if m]

        # vjp
        def vjp_case():
            out, vjp_fn = pyfunctorch.vjp(fd, *primals)
            _compare(tuple(out), tuple(o.detach() for o, m in zip(ref_out, mask) if m), *_ad_tol(dtype))
            grads = vjp_fn(tuple(cts_d))
            _compare(tuple(grads), tuple(ref_grads), *_ad_tol(dtype))
            return vjp_fn

        vjp_fn = _ad_case(res, si, "vjp", vjp_case)

        # vmap over vjp_fn (3 cotangents) vs a loop
        if vjp_fn is not None:
            def vmap_vjp_case():
                g2 = torch.Generator().manual_seed(seed + 100 + si)
                bcts = _batch_like(cts_d, g2)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = pyfunctorch.vmap(vjp_fn)(bcts)
                want = []
                for b in range(BATCH):
                    xs = [x.clone().requires_grad_() for x in primals]
                    outs = fd(*xs)
                    gr = torch.autograd.grad(outs, xs, [c[b] for c in bcts], allow_unused=True)
                    want.append(tuple(torch.zeros_like(x) if q is None else q for x, q in zip(xs, gr)))
                _compare(tuple(got), _stack_nested(want, (BATCH,)), *_ad_tol(dtype))

            _ad_case(res, si, "vmap(vjp_fn)", vmap_vjp_case)

        # jvp vs forward AD
        if op.supports_forward_ad:
            def jvp_case():
                g3 = torch.Generator().manual_seed(seed + 200 + si)
                tangents = tuple(torch.randn(x.shape, generator=g3, dtype=x.dtype).to(x.device) for x in primals)
                out, tout = pyfunctorch.jvp(fd, tuple(primals), tangents)
                with fwAD.dual_level():
                    duals = [fwAD.make_dual(x, t) for x, t in zip(primals, tangents)]
                    ref = fd(*duals)
                    ref_p = tuple(fwAD.unpack_dual(o).primal.clone() for o in ref)
                    ref_t = tuple(
                        torch.zeros_like(o) if fwAD.unpack_dual(o).tangent is None else fwAD.unpack_dual(o).tangent.clone()
                        for o in ref
                    )
                _compare(tuple(out), ref_p, *_ad_tol(dtype))
                _compare(tuple(tout), ref_t, *_ad_tol(dtype))

            _ad_case(res, si, "jvp", jvp_case)

            # vmap over jvp with a batch of tangents (jacfwd's path) vs forward AD per tangent
            def vmap_jvp_case():
                g5 = torch.Generator().manual_seed(seed + 400 + si)
                btans = _batch_like(primals, g5)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = pyfunctorch.vmap(lambda *t: pyfunctorch.jvp(fd, tuple(primals), t)[1])(*btans)
                want = []
                for b in range(BATCH):
                    with fwAD.dual_level():
                        ref = fd(*[fwAD.make_dual(x, t[b]) for x, t in zip(primals, btans)])
                        want.append(tuple(torch.zeros_like(o) if fwAD.unpack_dual(o).tangent is None
                                          else fwAD.unpack_dual(o).tangent.clone() for o in ref))
                _compare(tuple(got), _stack_nested(want, (BATCH,)), *_ad_tol(dtype))

            _ad_case(res, si, "vmap(jvp)", vmap_jvp_case)

        # per-example gradients: vmap over vjp with a batch of *primals* (and cotangents) vs a
        # loop of torch.autograd.grad -- the per-sample-gradient path, op by op
        if vjp_fn is not None:
            def vmap_over_vjp_case():
                g4 = torch.Generator().manual_seed(seed + 300 + si)
                bxs = tuple(_noisy_batch(primals, g4))
                bcts = _batch_like(cts_d, g4)
                want = _loop_grads(fd, bxs, bcts, shared_first=False)

                def per_example(xs, cs):
                    return pyfunctorch.vjp(fd, *xs)[1](cs)

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = pyfunctorch.vmap(per_example)(bxs, bcts)
                _compare(tuple(got), _stack_nested(want, (BATCH,)), *_ad_tol(dtype))

            _ad_case(res, si, "vmap(vjp)", vmap_over_vjp_case)

        # per-sample gradients as users write them, vmap(grad(f)) (the physical batch's graph,
        # reverse._Shadow): every primal batched, and the first one shared by the examples
        # (in_dims=None: a weight, differentiated per example); real dtypes (grad needs a real loss)
        if vjp_fn is not None and not dtype.is_complex and not any(c.is_complex() or c.is_sparse for c in cts_d) \
                and not any(o.is_sparse for o, m in zip(ref_out, mask) if m):
            def vmap_grad_case(shared):
                bxs, bcts, want = _per_example_grads(fd, primals, cts_d, seed + 400 + si, shared)

                def loss(xs, cs):
                    return sum((o * c).sum() for o, c in zip(fd(*xs), cs))

                in_dims = ([None] + [0] * (len(bxs) - 1), 0) if shared else 0
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = pyfunctorch.vmap(pyfunctorch.grad(loss), in_dims=in_dims)(bxs, bcts)
                _compare(tuple(got), want, *_ad_tol(dtype))

            _ad_case(res, si, "vmap(grad)", lambda: vmap_grad_case(False))
            _ad_case(res, si, "vmap(grad) shared", lambda: vmap_grad_case(True))

        # differentiation *around* vmap (a batched loss, an ensemble trained through vmap): the
        # level outside differentiates what the op's batching rule computes on the physical
        # batch, so a rule that is right as a function but not as a derivative gives wrong
        # gradients here (embedding with padding_idx did). vjp of vmap(op) vs the loop's
        # gradients; "shared": the first primal unbatched (in_dims=None), its gradient the sum
        # over the examples. jvp of vmap(op) vs forward AD per example.
        if vjp_fn is not None:
            def vjp_of_vmap_case(shared):
                bxs, bcts, want = _per_example_grads(fd, primals, cts_d, seed + 500 + si, shared)
                if shared:
                    want = (want[0].sum(0),) + tuple(want[1:])
                in_dims = tuple([None] + [0] * (len(bxs) - 1)) if shared else 0
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, back = pyfunctorch.vjp(pyfunctorch.vmap(fd, in_dims=in_dims), *bxs)
                    got = back(bcts)
                _compare(tuple(got), tuple(want), *_ad_tol(dtype))

            _ad_case(res, si, "vjp(vmap)", lambda: vjp_of_vmap_case(False))
            if len(primals) > 1:  # (with one primal unbatched nothing is batched)
                _ad_case(res, si, "vjp(vmap) shared", lambda: vjp_of_vmap_case(True))

        if op.supports_forward_ad:
            def jvp_of_vmap_case():
                g7 = torch.Generator().manual_seed(seed + 600 + si)
                bxs = tuple(_noisy_batch(primals, g7))
                btans = tuple(torch.randn(x.shape, generator=g7, dtype=x.dtype).to(x.device) for x in bxs)
                want = []
                try:  # (noise on a primal can leave the op's domain, e.g. a probability target)
                    for b in range(BATCH):
                        with fwAD.dual_level():
                            ref = fd(*[fwAD.make_dual(x[b], t[b]) for x, t in zip(bxs, btans)])
                            want.append(tuple(torch.zeros_like(o) if fwAD.unpack_dual(o).tangent is None
                                              else fwAD.unpack_dual(o).tangent.clone() for o in ref))
                except Exception as e:  # noqa: BLE001
                    raise _LoopError(f"{type(e).__name__}: {_first_line(e)}") from None
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, got = pyfunctorch.jvp(pyfunctorch.vmap(fd), bxs, btans)
                _compare(tuple(got), _stack_nested(want, (BATCH,)), *_ad_tol(dtype))

            _ad_case(res, si, "jvp(vmap)", jvp_of_vmap_case)

        # second order around vmap: a Hessian-vector product (forward over reverse) of a loss
        # through vmap(op) vs double backward through the loop; real dtypes
        if vjp_fn is not None and op.supports_forward_ad and getattr(op, "supports_fwgrad_bwgrad", False) \
                and not dtype.is_complex:
            def hvp_of_vmap_case():
                g8 = torch.Generator().manual_seed(seed + 700 + si)
                bxs = tuple(_noisy_batch(primals, g8))
                bcts = _batch_like(cts_d, g8)
                vs = tuple(torch.randn(x.shape, generator=g8, dtype=x.dtype).to(x.device) for x in bxs)
                nums = tuple(range(len(bxs)))
                # Two oracles through the loop: forward over reverse (as jvp(grad)) and reverse over
                # reverse. torch's formulas for the two orders differ for some ops (those that read
                # one triangle or assume symmetry: cholesky, eigh, triangular_solve; LU-based ones:
                # det, solve), and torch.func's jvp(grad(vmap)) agrees with one or the other: a case
                # passes when it agrees with either.
                wants = []
                try:
                    with fwAD.dual_level():
                        xs = [fwAD.make_dual(x.clone().requires_grad_(), v) for x, v in zip(bxs, vs)]
                        outs = [torch.stack(col) for col in zip(*[fd(*[x[b] for x in xs]) for b in range(BATCH)])]
                        gr = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, bcts)), xs, allow_unused=True)
                        wants.append(tuple(torch.zeros_like(x) if q is None or fwAD.unpack_dual(q).tangent is None
                                           else fwAD.unpack_dual(q).tangent.clone() for x, q in zip(bxs, gr)))
                except Exception:  # noqa: BLE001
                    pass
                try:
                    xs = [x.clone().requires_grad_() for x in bxs]
                    outs = [torch.stack(col) for col in zip(*[fd(*[x[b] for x in xs]) for b in range(BATCH)])]
                    gr = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, bcts)), xs, create_graph=True,
                                             allow_unused=True)
                    used = [(q, v) for q, v in zip(gr, vs) if q is not None and q.requires_grad]
                    rr = torch.autograd.grad([q for q, _ in used], xs, [v for _, v in used], allow_unused=True) \
                        if used else [None] * len(xs)
                    wants.append(tuple(torch.zeros_like(x) if w is None else w for x, w in zip(bxs, rr)))
                except Exception as e:  # noqa: BLE001
                    if not wants:
                        raise _LoopError(f"{type(e).__name__}: {_first_line(e)}") from None

                def loss(*xs):
                    return sum((o * c).sum() for o, c in zip(pyfunctorch.vmap(fd)(*xs), bcts))

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, got = pyfunctorch.jvp(lambda *xs: pyfunctorch.grad(loss, argnums=nums)(*xs), bxs, vs)
                for i, want in enumerate(wants):
                    try:
                        _compare(tuple(got), want, *_ad_tol(dtype))
                        return
                    except AssertionError:
                        if i == len(wants) - 1:
                            raise

            _ad_case(res, si, "hvp(vmap)", hvp_of_vmap_case)
    res["time"] = round(time.time() - t0, 2)
    return res


def _noisy_batch(xs, g):
    """BATCH examples of each tensor in ``xs``: itself, then copies scaled elementwise by
    1 + NOISE * N(0, 1) (drawn from ``g``)."""
    return [torch.stack([x] + [x * (1 + NOISE * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device))
                               for _ in range(BATCH - 1)]) for x in xs]


def _batch_like(ts, g):
    """A random tensor of shape (BATCH, *t.shape) per tensor in ``ts`` (cotangents, tangents)."""
    return tuple(torch.randn((BATCH,) + t.shape, generator=g, dtype=t.dtype).to(t.device) for t in ts)


def _per_example_grads(fd, primals, cts, seed, shared: bool):
    """A noisy batch of ``primals`` (the first one as it is when ``shared``), a batch of random
    cotangents, and the loop's per-example gradients stacked: (bxs, bcts, want)."""
    g = torch.Generator().manual_seed(seed)
    bxs = _noisy_batch(primals, g)
    if shared:
        bxs[0] = primals[0]
    bcts = _batch_like(cts, g)
    return bxs, bcts, _stack_nested(_loop_grads(fd, bxs, bcts, shared_first=shared), (BATCH,))


def _loop_grads(fd, bxs, bcts, shared_first: bool):
    """Per example b: torch.autograd.grad of ``fd``'s outputs at the b-th primals (the first one
    as it is when ``shared_first``) with the b-th cotangents; zeros where unused."""
    want = []
    for b in range(BATCH):
        xs = [(x if shared_first and i == 0 else x[b]).clone().requires_grad_() for i, x in enumerate(bxs)]
        try:
            outs = fd(*xs)
            gr = torch.autograd.grad(outs, xs, [c[b] for c in bcts], allow_unused=True)
        except Exception as e:  # noqa: BLE001
            raise _LoopError(f"{type(e).__name__}: {_first_line(e)}") from None
        want.append(tuple(torch.zeros_like(x) if q is None else q for x, q in zip(xs, gr)))
    return want


def _ad_case(res, si, kind, fn):
    case = {"sample": si, "in_dims": kind}
    out = None
    try:
        with _time_limit(CASE_TIMEOUT):
            out = fn()
        case["status"] = "pass"
    except CaseTimeout as e:
        case.update(status="timeout", etype="Timeout", err=str(e))
    except AssertionError as e:
        case.update(status="fail", etype="Mismatch", err=_first_line(e) + " " + _mismatch_detail(e))
    except _LoopError as e:
        case.update(status="skip", reason=f"the loop raises: {e}")
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ == "RandomnessError":  # a random sample (dropout_p > 0): no loop to compare
            case.update(status="skip", reason="random: " + _first_line(e))
        else:
            case.update(status="error", etype=type(e).__name__, err=_first_line(e))
    res["cases"].append(case)
    return out if case["status"] == "pass" else None


def summarise_ad(results, out=print, top=30, dtype="float64"):
    sums = [op_summary(r) for r in sorted(results, key=lambda r: r["op"])]
    by_kind = {}
    for r in results:
        for x in r["cases"]:
            by_kind.setdefault(x["in_dims"], Counter())[x["status"]] += 1
    out(f"AD coverage ({dtype}; vjp vs torch.autograd.grad, vmap(vjp_fn) vs loop, jvp vs forward_ad, "
        "vmap(jvp) over tangents vs forward_ad, vmap(vjp) over primals (per-example grads) vs loop, "
        "vmap(grad) vs loop, vjp(vmap) / jvp(vmap) / hvp(vmap) (differentiated around vmap) vs the loop's autograd):")
    for k, c in sorted(by_kind.items()):
        n = sum(c[s] for s in ("pass",) + FAILING)
        out(f"  {k:14s} {c['pass']}/{n} agree ({100 * c['pass'] / max(n, 1):.1f}%); skipped {c['skip']}")
    crashed = [s for s in sums if s["verdict"] == "crash"]
    tested = [s for s in sums if s["n_run"]] + crashed
    ok = [s for s in tested if s["verdict"] == "pass"]
    out(f"  ops fully agreeing: {len(ok)}/{len(tested)} ({100 * len(ok) / max(len(tested), 1):.1f}%)")
    if crashed:
        out(f"  ops that crashed the process: {len(crashed)} ({', '.join(s['op'] for s in crashed)})")
    groups, ex = _failure_groups(
        results, lambda x: f"{x['in_dims']} {x.get('etype', '')}: {_group_message(x.get('err', ''))}")
    for g, n in groups.most_common(12):
        out(f"  {n:5d} cases  {g}   e.g. {', '.join(sorted(ex[g])[:4])}")
    failing = [s for s in tested if s["verdict"] == "fail"]
    failing.sort(key=lambda s: -sum(s["counts"][k] for k in FAILING))
    for s in failing[:top]:
        out(f"  {s['op']:45s} {s['reason'][:110]}")
    return sums


# -- driver -----------------------------------------------------------------------------------------


def worker(args):
    torch.set_num_threads(1)
    _no_tf32()
    names = args.ops.split(",") if args.ops else None
    ops = load_ops(names, _dtype(args.dtype))
    ops = [o for i, o in enumerate(ops) if i % args.nworkers == args.worker]
    path = Path(args.results_file)
    done, started = set(), set()
    if path.exists():
        for ln in path.read_text().splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            (started if rec.get("start") else done).add(rec.get("start") or rec["op"])
    with open(path, "a") as fh:
        for st in started - done:  # crashed last time: record and move on
            fh.write(json.dumps({"op": st, "cases": [], "skip": None, "crash": "the process died running this op"}) + "\n")
            done.add(st)
        fh.flush()
        for op in ops:
            key = op_key(op)
            if key in done:
                continue
            fh.write(json.dumps({"start": key}) + "\n")
            fh.flush()
            log = (lambda s: print(s, flush=True)) if args.verbose else None
            try:
                if args.ad:
                    r = run_op_ad(op, dtype=_dtype(args.dtype))
                else:
                    r = run_op(op, max_samples=args.samples, log=log, kinds=args.kinds, dtype=_dtype(args.dtype))
            except Exception as e:  # noqa: BLE001  (a bug of this harness)
                r = {"op": key, "cases": [], "skip": f"harness error: {type(e).__name__}: {_first_line(e)}"}
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            s = op_summary(r)
            c = s["counts"]
            print(f"[w{args.worker}] {key}: {s['verdict']} pass {c['pass']} fail {sum(c[k] for k in FAILING)} "
                  f"skip {c['skip']} served {r.get('served')} ({r.get('time', 0)}s)", flush=True)


def read_results(paths):
    by_op = {}
    for p in paths:
        if not Path(p).exists():
            continue
        for ln in Path(p).read_text().splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if "start" in rec:
                continue
            by_op[rec["op"]] = rec
    return list(by_op.values())


def _ad_tol(dtype):
    """(atol, rtol) of the AD sweep: tight in float64/complex128; float32 (a GPU run, TF32 off)
    looser, by the dtype's resolution."""
    return (1e-7, 1e-7) if dtype in (torch.float64, torch.complex128) else (1e-4, 1e-4)


def _device_available(device):
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()) or \
        (hasattr(torch, kind) and getattr(getattr(torch, kind), "is_available", lambda: False)())


def _no_tf32():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _gpu import no_tf32  # (shared by the three sweeps; the scripts are also loaded by path)

    no_tf32()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", help="comma-separated OpInfo names (name or name.variant)")
    ap.add_argument("--quick", action="store_true", help=f"the representative slice ({len(QUICK_OPS)} ops, 3 samples)")
    ap.add_argument("--ad", action="store_true", help="AD coverage (vjp, vmap(vjp_fn), jvp) instead of vmap")
    ap.add_argument("--dtype", default=None,
                    help="the dtype of the sample inputs (vmap sweep: default float32, e.g. complex64, int64; "
                         "--ad: float64 (default), complex128, or float32 (a GPU run)); a full sweep in another "
                         "dtype writes docs/coverage_DTYPE.md (docs/coverage_ad_complex128.md)")
    ap.add_argument("--device", default="cpu",
                    help="device of the sample inputs (default cpu; cuda on a GPU machine). A sweep on another "
                         "device never writes docs/ and keeps its results apart (build/opdb_coverage/*-DEVICE)")
    ap.add_argument("--samples", type=int, default=None, help=f"sample inputs per op (default {SAMPLES_PER_OP})")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--resume", action="store_true", help="keep the results of an interrupted run")
    ap.add_argument("--write-docs", action="store_true",
                    help="write docs/coverage*.{md,txt} (default only for the full vmap sweep)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs even for the full sweep")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--nworkers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--results-file", help=argparse.SUPPRESS)
    ap.add_argument("--kinds", default=",".join(IN_DIMS_KINDS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        if args.ops:
            ap.error("--quick and --ops are exclusive")
        args.ops = ",".join(QUICK_OPS)
        if args.samples is None:
            args.samples = 3
    if args.samples is None:
        args.samples = SAMPLES_PER_OP
    if isinstance(args.kinds, str):
        args.kinds = tuple(args.kinds.split(","))

    global DEVICE
    DEVICE = args.device
    if DEVICE != "cpu" and not args.worker and not _device_available(DEVICE):
        ap.error(f"--device {DEVICE}: no such device here")
    default = "float64" if args.ad else "float32"
    if args.dtype is None:
        args.dtype = default
    if args.worker is not None:
        worker(args)
        return 0

    full = not args.ops
    if args.ad and args.dtype not in ("float64", "complex128", "float32"):
        ap.error("--ad runs in float64 (default), complex128 or float32")
    tag = ("ad" if args.ad else "vmap") + ("" if args.dtype == default else "-" + args.dtype)
    if DEVICE != "cpu":
        tag += "-" + DEVICE.replace(":", "")
        args.no_docs, args.write_docs = True, False
    if not full:
        tag += "-" + ("quick" if args.quick else f"{zlib.crc32(args.ops.encode()):08x}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    jobs = max(1, args.jobs)
    files = [RESULTS_DIR / f"{tag}.{i}.jsonl" for i in range(jobs)]
    if not args.resume:
        for p in RESULTS_DIR.glob(f"{tag}.*.jsonl"):
            p.unlink()
    t0 = time.time()
    base = [sys.executable, str(Path(__file__).resolve()), "--nworkers", str(jobs), "--samples", str(args.samples)]
    if args.ops:
        base += ["--ops", args.ops]
    if args.ad:
        base.append("--ad")
    base += ["--dtype", args.dtype, "--device", DEVICE]
    if args.verbose:
        base.append("-v")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if args.ops:
        load_ops(args.ops.split(","), _dtype(args.dtype))  # unknown names: fail here, not in the workers

    def size(i):
        return files[i].stat().st_size if files[i].exists() else 0

    def start(i):
        return subprocess.Popen(base + ["--worker", str(i), "--results-file", str(files[i])], env=env)

    procs = {i: start(i) for i in range(jobs)}
    sizes = {i: size(i) for i in range(jobs)}
    while procs:
        time.sleep(0.5)
        for i, p in list(procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            del procs[i]
            if rc != 0 and size(i) > sizes[i]:
                # it died on an op (segfault, abort): the restarted worker records the
                # op it was running as a crash and goes on
                sizes[i] = size(i)
                print(f"worker {i} exited with {rc}; restarting it", flush=True)
                procs[i] = start(i)
            elif rc != 0:
                print(f"worker {i} exited with {rc} without progress; giving up on its share", flush=True)
    results = read_results(files)
    print(f"\n=== {'AD' if args.ad else 'vmap'} coverage: {len(results)} OpInfos in {time.time() - t0:.0f}s ===")
    if args.ad:
        sums = summarise_ad(results, dtype=args.dtype)
        if args.write_docs or (full and not args.no_docs):
            lines = []
            summarise_ad(results, out=lines.append, top=1000, dtype=args.dtype)
            cx = args.dtype != "float64"
            (DOCS / ("coverage_ad_complex128.md" if cx else "coverage_ad.md")).write_text(
                f"# AD coverage over the OpInfo database{' in complex128' if cx else ''}\n\nGenerated by "
                f"`python scripts/coverage.py --ad{' --dtype complex128' if cx else ''}`.\n\n```\n"
                + "\n".join(lines) + "\n```\n")
    elif args.dtype != "float32":
        lines = []
        summarise(results, out=lines.append, top=1000)
        print("\n".join(lines))
        if args.write_docs or (full and not args.no_docs):
            path = DOCS / f"coverage_{args.dtype}.md"
            path.write_text(
                f"# vmap coverage over the OpInfo database in {args.dtype}\n\n"
                f"Generated by `python scripts/coverage.py --dtype {args.dtype}` (do not edit by hand): the "
                f"float32 sweep of docs/coverage.md, run on every OpInfo that supports {args.dtype} on CPU, "
                f"with sample inputs of that dtype. torch {torch.__version__}.\n\n```\n" + "\n".join(lines) + "\n```\n")
            print(f"wrote {path}")
    else:
        sums = summarise(results)
        if args.write_docs or (full and not args.no_docs):
            meta = f"{len(results)} OpInfos, up to {args.samples} samples each"
            write_docs(results, sums, meta)
            print(f"wrote {DOCS / 'coverage.md'} and {DOCS / 'coverage_failures.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
