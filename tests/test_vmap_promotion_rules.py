"""Type promotion under vmap against the per-example loop: a batched 0-dim tensor is
physically 1-dim, which must not change the result dtype or values (0-dim tensors rank below
dimensioned ones in torch's promotion; half-type kernels read 0-dim operands as CPU scalars).

Sweep: every pair of dtypes x {0-dim, N-dim} x {batched, unbatched} for elementwise ops,
comparing dtype, values and errors with the loop (vmap's definition).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pyfunctorch import vmap

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.complex64]
B = 3


def _make(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 3
    if dtype is torch.bool:
        return t > 0
    if not dtype.is_floating_point and not dtype.is_complex:
        return t.abs().to(dtype) + 1
    return t.to(dtype)


def _pos(t):
    return (t.real if t.is_complex() else t) > 0


OPS = {
    "add": torch.add,
    "mul": torch.mul,
    "div": torch.div,
    "sub_alpha": lambda a, b: torch.sub(a, b, alpha=2) if a.dtype is not torch.bool and b.dtype is not torch.bool
    else torch.sub(a, b),
    "maximum": torch.maximum,
    "where": lambda a, b: torch.where(_pos(a), a, b),
    "lt": torch.lt,
    "eq": torch.eq,
    "clamp_tensor": lambda a, b: torch.clamp(a, min=b),
    "lerp": lambda a, b: torch.lerp(a, a, b),
    "addcmul": lambda a, b: torch.addcmul(a, a, b),
    "add_inplace": lambda a, b: a.clone().add_(b),
    "mul_inplace": lambda a, b: a.clone().mul_(b),
    "python_scalar_chain": lambda a, b: a * 2.5 + b,
}


def _loop(op, a, b, ba, bb):
    return torch.stack([op(a[i] if ba else a, b[i] if bb else b) for i in range(B)])


def _close(x, y, lowp):
    x, y = x.to(torch.complex128), y.to(torch.complex128)
    return torch.allclose(x, y, equal_nan=True, rtol=1e-2 if lowp else 1e-6, atol=1e-2 if lowp else 1e-6)


#: the fast suite's dtypes (every category, both half types); the slow sweep takes them all
FAST_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int64, torch.float16, torch.bfloat16, torch.float32,
               torch.float64]


@pytest.mark.parametrize("opname", sorted(OPS))
def test_promotion_sweep_matches_the_loop(opname):
    _sweep(opname, FAST_DTYPES)


@pytest.mark.slow
@pytest.mark.parametrize("opname", sorted(OPS))
def test_promotion_sweep_all_dtypes(opname):
    _sweep(opname, DTYPES)


def _sweep(opname, dtypes):
    op = OPS[opname]
    bad = []
    for (da, db), ra, rb, (ba, bb) in itertools.product(
            itertools.product(dtypes, dtypes), (0, 2), (0, 2), ((True, True), (True, False), (False, True))):
        a = _make(da, ((B,) if ba else ()) + (2,) * ra, 1)
        b = _make(db, ((B,) if bb else ()) + (2,) * rb, 2)
        try:
            ref, ref_err = _loop(op, a, b, ba, bb), None
        except Exception as e:  # noqa: BLE001
            ref, ref_err = None, e
        if opname.endswith("_inplace") and bb and not ba:
            ref, ref_err = None, RuntimeError("a batched value written into an unbatched tensor")
        try:
            out, err = vmap(op, in_dims=(0 if ba else None, 0 if bb else None))(a, b), None
        except Exception as e:  # noqa: BLE001
            out, err = None, e
        case = (da, db, ra, rb, ba, bb)
        if ref_err is not None:
            if err is None:
                bad.append((case, "the loop raises, vmap does not"))
            elif not isinstance(err, RuntimeError) and not isinstance(err, type(ref_err)):
                bad.append((case, f"error class {type(err).__name__} vs {type(ref_err).__name__}"))
        elif err is not None:
            bad.append((case, f"vmap raises {err}"))
        elif out.dtype != ref.dtype:
            bad.append((case, f"dtype {out.dtype} vs the loop's {ref.dtype}"))
        elif out.shape != ref.shape or not _close(out, ref, torch.float16 in (da, db) or torch.bfloat16 in (da, db)):
            bad.append((case, "values"))
    assert not bad, f"{len(bad)} cases differ from the loop, e.g. {bad[:5]}"


def test_half_types_with_a_batched_zero_dim_operand_round_like_the_kernel():
    # the kernels read a 0-dim operand as a CPU scalar in float32: values must match exactly
    a = torch.randn(B, 5).to(torch.bfloat16)
    b = torch.randn(B, 4, dtype=torch.float64)
    for f in (lambda x, y: x * y.sum(), lambda x, y: x + y.sum(), lambda x, y: x / y.sum()):
        out = vmap(f)(a, b)
        ref = _loop(f, a, b, True, True)
        assert out.dtype == ref.dtype == torch.bfloat16
        assert torch.equal(out, ref)


def test_brief_examples_against_torch_func():
    a = torch.arange(6).reshape(3, 2)
    b = torch.randn(3, 4, dtype=torch.float64)
    f = lambda x, y: x * 2.5 + y.sum()  # noqa: E731
    assert vmap(f)(a, b).dtype == torch.func.vmap(f)(a, b).dtype == torch.float32
    x = torch.randn(3, 2).to(torch.bfloat16)
    y = torch.randn(3, 4)
    g = lambda u, v: u * v.sum()  # noqa: E731
    assert vmap(g)(x, y).dtype == torch.func.vmap(g)(x, y).dtype == torch.bfloat16


def test_inplace_with_a_batched_zero_dim_operand():
    a = torch.randint(0, 5, (B, 3), dtype=torch.uint8)
    b = torch.randint(-3, 3, (B,), dtype=torch.int8)
    f = lambda x, y: x.clone().add_(y)  # noqa: E731
    out = vmap(f)(a, b)
    ref = _loop(f, a, b, True, True)
    assert out.dtype == ref.dtype == torch.uint8
    assert torch.equal(out, ref)
    h = torch.randn(B, 3).to(torch.float16)
    g = lambda x, y: x.clone().mul_(y.sum())  # noqa: E731
    z = torch.randn(B, 2)
    assert torch.equal(vmap(g)(h, z), _loop(g, h, z, True, True))
