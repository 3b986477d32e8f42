"""dtype promotion under vmap equals eager: every pair of dtypes, 0-dim / N-dim mixes.

For binary ops (add, mul, sub, div, maximum, where, and ``a * 2.5 + b.sum()``), and for
a Python scalar operand (int, float, complex, bool), ``vmap(f)(a, b)`` must give the
dtype and values of the per-example loop ``torch.stack([f(a_i, b_i) ...])`` -- vmap's
definition. Under vmap a per-example 0-dim tensor is physically 1-dim, so a rule that
promotes with the physical ranks treats it as a dimensioned operand and can pick a wider
dtype than eager (torch's "0-dim tensors do not participate in category promotion"
unless they are of a higher category). Where the loop raises, vmap must raise an
exception of the same class.
"""

from __future__ import annotations

import pytest
import torch

import pyfunctorch

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
]  # fmt: skip
B = 3
N = 3  # the per-example length of an N-dim operand

# per-example ranks of (a, b): N-dim / 0-dim mixes
MIXES = {"nd_nd": (1, 1), "0d_nd": (0, 1), "nd_0d": (1, 0), "0d_0d": (0, 0)}
# batched-ness of (a, b): both batched, or b closed over / passed with in_dims=None
BATCHING = {"bb": (0, 0), "bn": (0, None), "nb": (None, 0)}


def _values(dtype, shape, gen, nonzero=False):
    if dtype == torch.bool:
        v = torch.randint(0, 2, shape, generator=gen).bool()
        return v | True if nonzero else v
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(1, 6, shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    if nonzero:
        v = v.sign() * (v.abs() + 0.5)
    if dtype.is_complex:
        v = torch.complex(v, torch.randn(shape, generator=gen, dtype=torch.float64))
    return v.to(dtype)


def _mask(shape):
    return (torch.arange(max(1, torch.Size(shape).numel())) % 2 == 0).reshape(shape)


OPS = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "sub": lambda a, b: a - b,
    "div": lambda a, b: a / b,
    "maximum": torch.maximum,
    "where": lambda a, b: torch.where(_mask(torch.broadcast_shapes(a.shape, b.shape)), a, b),
    "scale_plus_sum": lambda a, b: a * 2.5 + b.sum(),
}


def _loop(f, args, dims):
    sizes = {x.shape[d] for x, d in zip(args, dims) if d is not None}
    (n,) = sizes
    return torch.stack([f(*[x if d is None else x.select(d, i) for x, d in zip(args, dims)]) for i in range(n)])


def _compare(f, args, dims, vmap=None):
    """'' when vmap(f) equals the loop (dtype, values, or the same exception class)."""
    vmap = vmap or pyfunctorch.vmap
    try:
        want = _loop(f, args, dims)
        want_exc = None
    except Exception as e:  # noqa: BLE001
        want, want_exc = None, e
    try:
        got = vmap(f, in_dims=tuple(dims))(*args)
        got_exc = None
    except Exception as e:  # noqa: BLE001
        got, got_exc = None, e
    if want_exc is not None:
        if got_exc is None:
            return f"eager raises {type(want_exc).__name__}, vmap returns {got.dtype}"
        if not isinstance(got_exc, type(want_exc)):
            return f"eager raises {type(want_exc).__name__}, vmap raises {type(got_exc).__name__}: {got_exc}"
        return ""
    if got_exc is not None:
        return f"vmap raises {type(got_exc).__name__}: {str(got_exc)[:120]} (eager gives {want.dtype})"
    if type(got) is not torch.Tensor:
        return f"a wrapper escaped: {type(got).__name__}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != eager {want.dtype}"
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != eager {list(want.shape)}"
    try:
        torch.testing.assert_close(got, want, equal_nan=True)
    except AssertionError as e:
        return "values differ: " + str(e).splitlines()[0]
    return ""


def _args(da, db, mix, batching, gen, nonzero_b):
    ra, rb = MIXES[mix]
    dims = BATCHING[batching]
    sa = ((B,) if dims[0] is not None else ()) + ((N,) if ra else ())
    sb = ((B,) if dims[1] is not None else ()) + ((N,) if rb else ())
    return [_values(da, sa, gen), _values(db, sb, gen, nonzero=nonzero_b)], list(dims)


def sweep_pairs(op: str, mix: str, batching: str) -> list[str]:
    """All 144 dtype pairs for one op / rank mix / batching: the failures' descriptions."""
    gen = torch.Generator().manual_seed(0)
    f = OPS[op]
    bad = []
    for da in DTYPES:
        for db in DTYPES:
            args, dims = _args(da, db, mix, batching, gen, nonzero_b=op == "div")
            msg = _compare(f, args, dims)
            if msg:
                bad.append(f"{op} {mix} {batching} ({da}, {db}): {msg}")
    return bad


SCALARS = {"int": 2, "float": 2.5, "complex": 1.5 + 2j, "bool": True}
SCALAR_OPS = {
    "add": lambda a, s: a + s,
    "radd": lambda a, s: s + a,
    "mul": lambda a, s: a * s,
    "sub": lambda a, s: a - s,
    "rsub": lambda a, s: s - a,
    "div": lambda a, s: a / s,
    "rdiv": lambda a, s: s / a,
    "where": lambda a, s: torch.where(_mask(a.shape), a, s),
    "torch.add": lambda a, s: torch.add(a, s),
    "torch.mul": lambda a, s: torch.mul(a, s),
}


def sweep_scalars(op: str, rank: int) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    bad = []
    for dt in DTYPES:
        a = _values(dt, (B,) + ((N,) if rank else ()), gen, nonzero=op == "rdiv")
        for sname, s in SCALARS.items():
            msg = _compare(lambda x: SCALAR_OPS[op](x, s), [a], [0])
            if msg:
                bad.append(f"{op} rank{rank} ({dt}, {sname} scalar): {msg}")
    return bad


# the sweeps that fail today (issue 11 item 9: per-example 0-dim tensors promote as
# dimensioned tensors under vmap): 28 of the 84 pair sweeps, 608 of 13,056 combinations
# (python tests/test_vmap_promotion.py lists them). Non-strict: remove entries once fixed.
FAILING_TODAY: set = set()  # (was 28 sweeps, 608 combinations, before the fix)


def _xfail_if_failing(key):
    # every combination matches the loop since the promotion fix (issue 11 item 9); keep
    # FAILING_TODAY empty: a combination that fails again is a regression
    assert key not in FAILING_TODAY
    return []


PAIR_PARAMS = [
    pytest.param(op, mix, bt, id=f"{op}-{mix}-{bt}", marks=_xfail_if_failing((op, mix, bt)))
    for op in OPS
    for mix in MIXES
    for bt in BATCHING
]


@pytest.mark.parametrize("op,mix,batching", PAIR_PARAMS)
def test_promotion_pairs_match_loop(op, mix, batching):
    bad = sweep_pairs(op, mix, batching)
    assert not bad, f"{len(bad)} of {len(DTYPES) ** 2} dtype pairs differ from eager:\n" + "\n".join(bad)


SCALAR_PARAMS = [
    pytest.param(op, rank, id=f"{op}-rank{rank}", marks=_xfail_if_failing((op, rank)))
    for op in SCALAR_OPS
    for rank in (0, 1)
]


@pytest.mark.parametrize("op,rank", SCALAR_PARAMS)
def test_promotion_python_scalar_matches_loop(op, rank):
    bad = sweep_scalars(op, rank)
    assert not bad, f"{len(bad)} of {len(DTYPES) * len(SCALARS)} combinations differ from eager:\n" + "\n".join(bad)


def test_the_sweep_can_fail():
    """The comparison detects a dtype difference (a test that cannot fail is a defect)."""
    assert _compare(lambda a, b: a + b, [torch.ones(2, 3), torch.ones(2, 3)], [0, 0]) == ""
    args = [torch.ones(2, 3), torch.ones(2, 3)]

    def widening_vmap(f, in_dims):
        return lambda *a: pyfunctorch.vmap(f, in_dims=in_dims)(*a).double()

    def raising_vmap(f, in_dims):
        def run(*a):
            raise ValueError("no")
        return run

    assert "dtype" in _compare(lambda a, b: a + b, args, [0, 0], vmap=widening_vmap)
    assert "vmap raises" in _compare(lambda a, b: a + b, args, [0, 0], vmap=raising_vmap)
    assert "vmap returns" in _compare(lambda a, b: a.reshape(7) + b, args, [0, 0],
                                      vmap=lambda f, in_dims: lambda *a: torch.zeros(2))


if __name__ == "__main__":  # counts of failing combinations today
    import sys

    torch.set_num_threads(1)
    total = fails = 0
    rows = []
    for op in OPS:
        for mix in MIXES:
            for bt in BATCHING:
                bad = sweep_pairs(op, mix, bt)
                total += len(DTYPES) ** 2
                fails += len(bad)
                if bad:
                    rows.append(((op, mix, bt), bad))
    for op in SCALAR_OPS:
        for rank in (0, 1):
            bad = sweep_scalars(op, rank)
            total += len(DTYPES) * len(SCALARS)
            fails += len(bad)
            if bad:
                rows.append(((op, rank), bad))
    for key, bad in rows:
        print(f"{key}: {len(bad)}")
        for b in bad[: int(sys.argv[1]) if len(sys.argv) > 1 else 3]:
            print("   ", b)
    print(f"{fails} of {total} combinations differ; failing sweeps: {[k for k, _ in rows]}")
