"""Batching rules for the linear-algebra solvers in batching/linalg.py: lstsq, ldl_solve,
pinv with tensor tolerances, and matrix_rank with an unbatched matrix but batched tolerances.

Oracle: the per-example Python loop (``loop_vmap``). Every check also asserts that the op
ran through its rule, never through the per-example loop fallback.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from conftest import assert_close, loop_vmap

import pyfunctorch as pf
from pyfunctorch import batched
from pyfunctorch.batched import DataDependentError

DT = torch.float64
B = 3
DRIVERS = ["gels", "gelsy", "gelsd", "gelss"]


@contextlib.contextmanager
def no_fallback():
    """The loop fallback warns only once per op per session, so also watch its counters."""
    before = dict(batched.FALLBACK_COUNTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)
        yield
    new = {str(k): v for k, v in batched.FALLBACK_COUNTS.items() if before.get(k, 0) != v}
    assert not new, f"ops ran through the loop fallback: {new}"


def check(f, in_dims, *args):
    expected = loop_vmap(f, in_dims)(*args)
    with no_fallback():
        actual = pf.vmap(f, in_dims=in_dims)(*args)
    assert_close(actual, expected)


def check_nested(f, outer, inner, *args):
    expected = loop_vmap(loop_vmap(f, inner), outer)(*args)
    with no_fallback():
        actual = pf.vmap(pf.vmap(f, in_dims=inner), in_dims=outer)(*args)
    assert_close(actual, expected)


def batched_arg(shape, d, make=torch.randn):
    """A tensor whose examples have ``shape``, batched (size B) at ``d`` (None: unbatched)."""
    if d is None:
        return make(*shape, dtype=DT)
    x = make(B, *shape, dtype=DT)
    return x.movedim(0, d)


def sym(*shape):
    a = torch.randn(*shape, dtype=DT)
    return a + a.mT


# -- lstsq ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_lstsq_in_dims(driver):
    """Over- and under-determined and square A, matrix and vector b, every in_dims mix."""

    def f(A, b):
        return torch.linalg.lstsq(A, b, driver=driver)

    for m, n in [(5, 3), (3, 5), (4, 4)]:
        for b_shape in [(m, 2), (m,)]:
            for dA, db in [(0, 0), (None, 0), (0, None), (-1, 1), (1, -1)]:
                check(f, (dA, db), batched_arg((m, n), dA), batched_arg(b_shape, db))


def test_lstsq_default_driver_and_rcond():
    A, b = torch.randn(B, 5, 3, dtype=DT), torch.randn(B, 5, 2, dtype=DT)
    check(lambda A, b: torch.linalg.lstsq(A, b), (0, 0), A, b)
    check(lambda A, b: torch.linalg.lstsq(A, b, rcond=1e-3, driver="gelsd"), (0, None), A, b[0])


@pytest.mark.parametrize("driver", DRIVERS)
def test_lstsq_example_batch_dims(driver):
    """Examples that are themselves batches of matrices, with b broadcasting over them."""

    def f(A, b):
        return torch.linalg.lstsq(A, b, driver=driver)

    A = torch.randn(B, 2, 5, 3, dtype=DT)
    check(f, (0, 0), A, torch.randn(B, 1, 5, 2, dtype=DT))
    check(f, (0, None), A, torch.randn(1, 5, 2, dtype=DT))
    check(f, (None, 0), A[0], torch.randn(B, 1, 5, 2, dtype=DT))
    check(f, (None, 0), A[0, :1], torch.randn(B, 2, 5, 2, dtype=DT))
    check(f, (0, 0), A, torch.randn(B, 2, 5, dtype=DT))  # vector b per matrix
    check(f, (None, 0), A[0], torch.randn(B, 2, 5, dtype=DT))


@pytest.mark.parametrize("driver", ["gelsd", "gelss"])
def test_lstsq_residuals_rank_deficient(driver):
    """gelsd/gelss return residuals only when every matrix of the call has full rank."""

    def f(A, b):
        return torch.linalg.lstsq(A, b, driver=driver)

    A, b = torch.randn(B, 5, 3, dtype=DT), torch.randn(B, 5, 2, dtype=DT)
    deficient = A.clone()
    deficient[..., 2] = deficient[..., 1]
    out = pf.vmap(f)(A, b)
    assert out.residuals.shape == (B, 2)  # all full rank: residuals for every example
    check(f, (0, 0), A, b)
    out = pf.vmap(f)(deficient, b)
    assert out.residuals.shape == (B, 0)  # none has full rank: no residuals anywhere
    check(f, (0, 0), deficient, b)
    # a shared deficient A with batched right-hand sides
    check(f, (None, 0), deficient[0], b)

    # Only some examples have full rank: alone, those examples return residuals and the
    # others do not, so the results cannot be stacked (the loop fails too) ...
    mixed = A.clone()
    mixed[1] = deficient[1]
    with pytest.raises(RuntimeError):
        loop_vmap(f)(mixed, b)
    # ... so vmap re-runs the function per example and returns the residuals ragged (nested)
    out = pf.vmap(f)(mixed, b)
    assert out.residuals.is_nested
    for i in range(B):
        assert_close(out.residuals.unbind()[i], f(mixed[i], b[i]).residuals)
    # a function that does not return them gives a plain batched result
    g = lambda A, b: torch.linalg.lstsq(A, b, driver=driver).solution
    assert_close(out.solution, loop_vmap(g)(mixed, b))
    assert_close(pf.vmap(g)(mixed, b), loop_vmap(g)(mixed, b))
    with pytest.raises(DataDependentError):
        pf.vmap(f, strict=True)(mixed, b)
    # and within an example that holds a batch of matrices, torch's all-or-nothing rule applies
    # per example: every example has a deficient matrix here, so no residuals at all
    both = torch.stack([A, deficient], 1)
    check(f, (0, None), both, b[:2])


def test_lstsq_gels_rank_deficient_raises():
    A, b = torch.randn(B, 5, 3, dtype=DT), torch.randn(B, 5, 2, dtype=DT)
    A[1, :, 2] = 0
    with pytest.raises(RuntimeError, match="full rank"):
        torch.linalg.lstsq(A[1], b[1], driver="gels")
    with pytest.raises(RuntimeError, match="full rank"):
        pf.vmap(lambda A, b: torch.linalg.lstsq(A, b, driver="gels"))(A, b)


def test_lstsq_nested():
    f = lambda A, b: torch.linalg.lstsq(A, b, driver="gelsd")
    A, b = torch.randn(2, B, 5, 3, dtype=DT), torch.randn(5, 2, B, 2, dtype=DT)
    check_nested(f, (0, 1), (0, 1), A, b)
    check_nested(f, (None, 1), (None, 1), A[0, 0], b)
    check_nested(f, (0, None), (0, None), A, b[:, 0, 0])
    check_nested(f, (1, 1), (0, None), A.transpose(0, 1), b[:, :, 0])


def test_lstsq_grad_per_example():
    """Per-example gradients through lstsq (rules under a grad level)."""
    A, b = torch.randn(B, 5, 3, dtype=DT), torch.randn(B, 5, 2, dtype=DT)

    def loss(A, b):
        return torch.linalg.lstsq(A, b, driver="gelsd").solution.pow(2).sum()

    with no_fallback():
        actual = pf.vmap(pf.grad(loss, argnums=(0, 1)))(A, b)
    expected = loop_vmap(lambda A, b: torch.autograd.grad(loss(A, b), (A, b)))(
        A.clone().requires_grad_(), b.clone().requires_grad_())
    assert_close(actual, expected)


def test_lstsq_invalid_shapes_raise():
    with pytest.raises(RuntimeError):
        pf.vmap(lambda A, b: torch.linalg.lstsq(A, b))(torch.randn(B, 5, 3), torch.randn(B, 2, 5, 2))


# -- ldl_solve ------------------------------------------------------------------------------------


def _ldl(*batch, n=4):
    return torch.linalg.ldl_factor(sym(*batch, n, n))


@pytest.mark.parametrize("hermitian", [False, True])
def test_ldl_solve_in_dims(hermitian):
    def f(LD, piv, rhs):
        return torch.linalg.ldl_solve(LD, piv, rhs, hermitian=hermitian)

    LD, piv = _ldl(B)
    LD1, piv1 = LD[0], piv[0]
    rhs = torch.randn(B, 4, 2, dtype=DT)
    check(f, (0, 0, 0), LD, piv, rhs)
    check(f, (0, 0, None), LD, piv, rhs[0])
    check(f, (None, None, 0), LD1, piv1, rhs)
    check(f, (0, None, 0), LD, piv1, rhs)
    check(f, (None, 0, None), LD1, piv, rhs[0])
    check(f, (-1, -1, 1), LD.movedim(0, -1), piv.movedim(0, -1), rhs.movedim(0, 1))


def test_ldl_solve_broadcast_rhs():
    """Per-example LD batches with a right-hand side that broadcasts over them (and the other
    way round, where torch's kernel needs LD expanded to the broadcast batch)."""

    def f(LD, piv, rhs):
        return torch.linalg.ldl_solve(LD, piv, rhs)

    LD, piv = _ldl(B, 2)
    check(f, (0, 0, None), LD, piv, torch.randn(4, 3, dtype=DT))  # the op_db sample
    check(f, (0, 0, 0), LD, piv, torch.randn(B, 4, 3, dtype=DT))
    check(f, (0, 0, None), LD[:, 0], piv[:, 0], torch.randn(2, 4, 3, dtype=DT))
    check(f, (None, None, 0), LD[0, 0], piv[0, 0], torch.randn(B, 2, 4, 3, dtype=DT))

    # torch itself reads out of bounds when B's batch is larger than LD's, so the oracle
    # expands LD: the rule must give the expanded result without being told
    def g(LD, piv, rhs):
        return torch.linalg.ldl_solve(LD.expand(2, 4, 4), piv.expand(2, 4), rhs)

    rhs = torch.randn(B, 2, 4, 3, dtype=DT)
    expected = loop_vmap(g, (None, None, 0))(LD[0, :1], piv[0, :1], rhs)
    with no_fallback():
        actual = pf.vmap(f, in_dims=(None, None, 0))(LD[0, :1], piv[0, :1], rhs)
    assert_close(actual, expected)
    expected = loop_vmap(g, (0, 0, 0))(LD[:, :1], piv[:, :1], rhs)
    with no_fallback():
        actual = pf.vmap(f)(LD[:, :1], piv[:, :1], rhs)
    assert_close(actual, expected)


def test_ldl_solve_nested_and_errors():
    f = lambda LD, piv, rhs: torch.linalg.ldl_solve(LD, piv, rhs)
    LD, piv = _ldl(2, B)
    rhs = torch.randn(B, 4, 2, dtype=DT)
    check_nested(f, (0, 0, None), (0, 0, 0), LD, piv, rhs)
    check_nested(f, (None, None, 0), (0, 0, None), LD[0], piv[0], torch.randn(2, 4, 2, dtype=DT))
    with pytest.raises(RuntimeError, match="pivots"):
        pf.vmap(f, in_dims=(0, None, 0))(LD[0], piv[0, :1], rhs)


# -- pinv with tensor atol / rtol -----------------------------------------------------------------


def test_pinv_tensor_tolerances():
    def f(x, atol, rtol):
        return torch.linalg.pinv(x, atol=atol, rtol=rtol)

    x = torch.randn(B, 2, 5, 4, dtype=DT)
    tol = lambda *s: torch.rand(s, dtype=DT) * 2
    check(f, (0, 0, None), x, tol(B), tol())
    check(f, (0, 0, 0), x, tol(B, 2), tol(B, 1))
    check(f, (None, 0, None), x[0], tol(B), tol())  # unbatched matrix, batched tolerance
    check(f, (None, None, 0), x[0], tol(), tol(B, 2))
    check(f, (-1, 0, None), x.movedim(0, -1), tol(B), tol())
    # tolerances with more dims than the matrix batch: they add batch dims to the result
    check(f, (None, 0, None), x[0], tol(B, 3, 1), tol())
    check(f, (0, None, None), x, tol(3, 1), tol())
    check(f, (0, None, 0), x[:, 0], tol(3), tol(B, 1))
    # an empty matrix ignores the tolerances
    check(f, (None, 0, None), torch.randn(2, 0, 0, dtype=DT), tol(B, 3, 1), tol())
    check(f, (0, 0, None), torch.randn(B, 2, 3, 0, dtype=DT), tol(B), tol())


def test_pinv_tolerance_forms():
    x = torch.randn(B, 5, 4, dtype=DT)
    h = sym(B, 4, 4)
    r = torch.rand(B, dtype=DT)
    check(lambda x, a: torch.linalg.pinv(x, atol=a), (0, 0), x, r * 2)
    check(lambda x, a: torch.linalg.pinv(x, rtol=a), (None, 0), x[0], r)
    check(lambda x, a: torch.linalg.pinv(x, a), (0, 0), x, r)  # rcond tensor
    check(lambda x, a: torch.linalg.pinv(x, atol=a, hermitian=True), (0, 0), h, r * 2)
    check(lambda x, a: torch.linalg.pinv(x, atol=a, hermitian=True), (None, 0), h[0], r * 2)
    check(lambda x, a: torch.pinverse(x, 0.3), (0, None), x, r)


def test_pinv_nested_and_grad():
    f = lambda x, a: torch.linalg.pinv(x, atol=a)
    x = torch.randn(2, B, 5, 4, dtype=DT)
    a = torch.rand(B, 2, dtype=DT)
    check_nested(f, (0, 1), (0, 0), x, a)
    check_nested(f, (None, 1), (None, 0), x[0, 0], a)
    loss = lambda x, a: torch.linalg.pinv(x, atol=a).sum()
    with no_fallback():
        actual = pf.vmap(pf.grad(loss), in_dims=(None, 0))(x[0, 0], a[:, 0] * 0.1)
    xs = x[0, 0].clone().requires_grad_()
    expected = torch.stack([torch.autograd.grad(loss(xs, ai), xs)[0] for ai in a[:, 0] * 0.1])
    assert_close(actual, expected)


# -- matrix_rank: unbatched matrix, batched tolerances ---------------------------------------------


def test_matrix_rank_batched_tolerances():
    x = torch.randn(2, 5, 5, dtype=DT)
    h = sym(2, 5, 5)
    tol = torch.rand(B, 1, dtype=DT) * 3
    check(lambda x, a: torch.linalg.matrix_rank(x, atol=a), (None, 0), x, tol)
    check(lambda x, a: torch.linalg.matrix_rank(x, atol=a), (None, 0), x, tol[:, 0])
    check(lambda x, a: torch.linalg.matrix_rank(x, rtol=a), (None, 0), x, tol / 3)
    check(lambda x, a, r: torch.linalg.matrix_rank(x, atol=a, rtol=r), (None, 0, None), x, tol, torch.tensor(0.2))
    check(lambda x, a, r: torch.linalg.matrix_rank(x, atol=a, rtol=r), (None, None, 0), x, torch.tensor(0.1), tol / 3)
    check(lambda x, a: torch.linalg.matrix_rank(x, a), (None, 0), x, tol)  # tol form
    check(lambda x, a: torch.linalg.matrix_rank(x, a, True), (None, 0), h, tol)
    check(lambda x, a: torch.linalg.matrix_rank(x, atol=a, hermitian=True), (None, 0), h, tol)
    check(lambda x, a: torch.linalg.matrix_rank(x, atol=a), (0, 0), torch.randn(B, 2, 5, 5, dtype=DT), tol)
    check(lambda x, a: torch.linalg.matrix_rank(x, atol=a), (None, 0), torch.randn(0, 5, 5, dtype=DT), tol)
    check_nested(lambda x, a: torch.linalg.matrix_rank(x, atol=a), (None, 0), (None, 0), x, torch.rand(B, 2, dtype=DT) * 3)
