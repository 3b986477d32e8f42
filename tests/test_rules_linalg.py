"""Batching rules for the linear-algebra solvers in batching/linalg.py: lstsq, ldl_solve,
pinv with tensor tolerances, and matrix_rank with an unbatched matrix but batched tolerances;
complex inputs (conjugate views inside a rule), the add* products in integer, bool and
low-precision dtypes, and linalg_cross.

Oracle: the per-example Python loop (``loop_vmap``). Every check also asserts that the op
ran through its rule, never through the per-example loop fallback.
"""

from __future__ import annotations


import pytest
import torch
from conftest import assert_close, loop_vmap, no_fallback

import pyfunctorch as pf
from pyfunctorch.errors import DataDependentError

DT = torch.float64
B = 3
DRIVERS = ["gels", "gelsy", "gelsd", "gelss"]




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


def test_lstsq_default_driver_and_rcond(device):
    A, b = torch.randn(B, 5, 3, dtype=DT, device=device), torch.randn(B, 5, 2, dtype=DT, device=device)
    check(lambda A, b: torch.linalg.lstsq(A, b), (0, 0), A, b)
    check(lambda A, b: torch.linalg.lstsq(A, b, rcond=1e-3, driver="gelsd"), (0, None), A, b[0])


@pytest.mark.parametrize("driver", DRIVERS)
def test_lstsq_example_batch_dims(device, driver):
    """Examples that are themselves batches of matrices, with b broadcasting over them."""

    def f(A, b):
        return torch.linalg.lstsq(A, b, driver=driver)

    A = torch.randn(B, 2, 5, 3, dtype=DT, device=device)
    check(f, (0, 0), A, torch.randn(B, 1, 5, 2, dtype=DT, device=device))
    check(f, (0, None), A, torch.randn(1, 5, 2, dtype=DT, device=device))
    check(f, (None, 0), A[0], torch.randn(B, 1, 5, 2, dtype=DT, device=device))
    check(f, (None, 0), A[0, :1], torch.randn(B, 2, 5, 2, dtype=DT, device=device))
    check(f, (0, 0), A, torch.randn(B, 2, 5, dtype=DT, device=device))  # vector b per matrix
    check(f, (None, 0), A[0], torch.randn(B, 2, 5, dtype=DT, device=device))


@pytest.mark.parametrize("driver", ["gelsd", "gelss"])
def test_lstsq_residuals_rank_deficient(device, driver):
    """gelsd/gelss return residuals only when every matrix of the call has full rank."""

    def f(A, b):
        return torch.linalg.lstsq(A, b, driver=driver)

    A, b = torch.randn(B, 5, 3, dtype=DT, device=device), torch.randn(B, 5, 2, dtype=DT, device=device)
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


def test_lstsq_gels_rank_deficient_raises(device):
    A, b = torch.randn(B, 5, 3, dtype=DT, device=device), torch.randn(B, 5, 2, dtype=DT, device=device)
    A[1, :, 2] = 0
    with pytest.raises(RuntimeError, match="full rank"):
        torch.linalg.lstsq(A[1], b[1], driver="gels")
    with pytest.raises(RuntimeError, match="full rank"):
        pf.vmap(lambda A, b: torch.linalg.lstsq(A, b, driver="gels"))(A, b)


def test_lstsq_nested(device):
    f = lambda A, b: torch.linalg.lstsq(A, b, driver="gelsd")
    A, b = torch.randn(2, B, 5, 3, dtype=DT, device=device), torch.randn(5, 2, B, 2, dtype=DT, device=device)
    check_nested(f, (0, 1), (0, 1), A, b)
    check_nested(f, (None, 1), (None, 1), A[0, 0], b)
    check_nested(f, (0, None), (0, None), A, b[:, 0, 0])
    check_nested(f, (1, 1), (0, None), A.transpose(0, 1), b[:, :, 0])


def test_lstsq_grad_per_example(device):
    """Per-example gradients through lstsq (rules under a grad level)."""
    A, b = torch.randn(B, 5, 3, dtype=DT, device=device), torch.randn(B, 5, 2, dtype=DT, device=device)

    def loss(A, b):
        return torch.linalg.lstsq(A, b, driver="gelsd").solution.pow(2).sum()

    with no_fallback():
        actual = pf.vmap(pf.grad(loss, argnums=(0, 1)))(A, b)
    expected = loop_vmap(lambda A, b: torch.autograd.grad(loss(A, b), (A, b)))(
        A.clone().requires_grad_(), b.clone().requires_grad_())
    assert_close(actual, expected)


def test_lstsq_invalid_shapes_raise(device):
    with pytest.raises(RuntimeError):
        pf.vmap(lambda A, b: torch.linalg.lstsq(A, b))(torch.randn(B, 5, 3, device=device), torch.randn(B, 2, 5, 2, device=device))


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


def test_pinv_tensor_tolerances(device):
    def f(x, atol, rtol):
        return torch.linalg.pinv(x, atol=atol, rtol=rtol)

    x = torch.randn(B, 2, 5, 4, dtype=DT, device=device)
    tol = lambda *s: torch.rand(s, dtype=DT, device=device) * 2
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
    check(f, (None, 0, None), torch.randn(2, 0, 0, dtype=DT, device=device), tol(B, 3, 1), tol())
    check(f, (0, 0, None), torch.randn(B, 2, 3, 0, dtype=DT, device=device), tol(B), tol())


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


def test_pinv_nested_and_grad(device):
    f = lambda x, a: torch.linalg.pinv(x, atol=a)
    x = torch.randn(2, B, 5, 4, dtype=DT, device=device)
    a = torch.rand(B, 2, dtype=DT, device=device)
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


# -- complex inputs: conjugate views inside a rule -------------------------------------------------
# A rule run straight from __torch_dispatch__ sees torch's dispatch-time exclude set, without the
# Conjugate/Negative fallbacks: ops that do not read the conj bit themselves (mul, add) computed
# with unconjugated values (linalg_pinv scales Vh.mH; addmm adds a bias M.conj()).


@pytest.mark.parametrize("dt", [torch.complex64, torch.complex128])
def test_complex_pinv(device, dt):
    x = torch.randn(B, 5, 4, dtype=dt, device=device)
    check(torch.linalg.pinv, 0, x)  # no keyword: vmap's fast path
    check(torch.linalg.pinv, -1, x.movedim(0, -1))
    check(lambda x: torch.linalg.pinv(x.conj()), 0, x)
    check(lambda x: torch.linalg.pinv(x.mH), 0, x)
    check(lambda x: torch.linalg.pinv(x, rtol=0.2), 0, x)
    check(lambda x, a: torch.linalg.pinv(x, atol=a), (0, 0), x, torch.rand(B, dtype=torch.float64, device=device))
    h = x[:, :4] @ x[:, :4].mH
    check(lambda x: torch.linalg.pinv(x, hermitian=True), 0, h)
    check(torch.pinverse, 0, x)
    check_nested(torch.linalg.pinv, 0, 0, torch.randn(2, B, 3, 4, dtype=dt, device=device))
    # the singular OpInfo variant: a rank-deficient product
    u, v = torch.randn(B, 6, 2, dtype=dt, device=device), torch.randn(B, 5, 2, dtype=dt, device=device)
    check(lambda u, v: torch.linalg.pinv(u @ v.mT), (0, 0), u, v)
    check(lambda u, v: torch.linalg.pinv(u @ v.mT), (None, 0), u[0], v)


def test_complex_conj_bias_and_operands(device):
    c = torch.complex128
    M, a, b = (torch.randn(B, 3, 3, dtype=c, device=device) for _ in range(3))
    v = torch.randn(B, 3, dtype=c, device=device)
    check(lambda M, a, b: torch.addmm(M.conj(), a, b), (0, 0, 0), M, a, b)
    check(lambda M, a, b: torch.addmm(M.conj(), a.mH, b), (0, None, None), M, a[0], b[0])
    check(lambda M, a, b: torch.addmm(M, a.conj(), b.mH, alpha=2j, beta=0.5), (None, 0, 0), M[0], a, b)
    check(lambda M, a, b: torch.baddbmm(M.conj(), a.conj(), b), (0, 0, 0), M.unsqueeze(1), a.unsqueeze(1), b.unsqueeze(1))
    check(lambda M, a, b: torch.addbmm(M.conj(), a, b), (0, 0, None), M, a.unsqueeze(1).expand(B, 2, 3, 3), b[:2])
    check(lambda M, a, v: torch.addmv(M.conj(), a.conj(), v), (0, 0, 0), M[:, 0], a, v)
    check(lambda M, u, w: torch.addr(M.conj(), u.conj(), w, alpha=1j), (0, 0, 0), M, v, v.flip(0))
    check(lambda u, w: torch.vdot(u.conj(), w), (0, 0), v, v.flip(0))
    check(lambda a, b: torch.mm(a.conj(), b), (None, 0), a[0], b)


@pytest.mark.parametrize("hermitian", [False, True])
def test_complex_ldl_solve(device, hermitian):
    """Complex LDL: hermitian=True factors A = L D L^H (conjugate transpose), hermitian=False a
    complex *symmetric* A = L D L^T (plain transpose); the flag is passed through per call."""
    c = torch.complex128

    def f(LD, piv, rhs):
        return torch.linalg.ldl_solve(LD, piv, rhs, hermitian=hermitian)

    a = torch.randn(B, 4, 4, dtype=c, device=device)
    A = a @ a.mH + 4 * torch.eye(4, device=device) if hermitian else a + a.mT
    LD, piv = torch.linalg.ldl_factor(A, hermitian=hermitian)
    rhs = torch.randn(B, 4, 2, dtype=c, device=device)
    check(f, (0, 0, 0), LD, piv, rhs)
    check(f, (0, 0, None), LD, piv, rhs[0])
    check(f, (None, None, 0), LD[0], piv[0], rhs)  # one factorization: columns of one solve
    check(f, (0, None, 0), LD, piv[0], rhs)
    check(f, (-1, -1, 1), LD.movedim(0, -1), piv.movedim(0, -1), rhs.movedim(0, 1))
    check(lambda LD, piv, rhs: f(LD, piv, rhs.conj()), (0, 0, 0), LD, piv, rhs)
    # the solution solves A x = rhs per example
    with no_fallback():
        x = pf.vmap(f)(LD, piv, rhs)
    assert_close(A @ x, rhs)


# -- integer and bool inputs: alpha / beta as the kernels read them --------------------------------
# For integral dtypes addmm & co. convert alpha/beta with Scalar::to<int64_t>: a float truncates
# toward zero (beta=0.2 drops the bias, alpha=2.6 scales by 2), and the result stays integral.

_INT_ADD_OPS = {
    "addmm": (lambda M, a, b, **k: torch.addmm(M, a, b, **k), (3, 4), (3, 5), (5, 4)),
    "addmv": (lambda M, a, b, **k: torch.addmv(M, a, b, **k), (3,), (3, 5), (5,)),
    "addbmm": (lambda M, a, b, **k: torch.addbmm(M, a, b, **k), (3, 4), (2, 3, 5), (2, 5, 4)),
    "baddbmm": (lambda M, a, b, **k: torch.baddbmm(M, a, b, **k), (2, 3, 4), (2, 3, 5), (2, 5, 4)),
    "addr": (lambda M, a, b, **k: torch.addr(M, a, b, **k), (3, 4), (3,), (4,)),
}


@pytest.mark.parametrize("name", sorted(_INT_ADD_OPS))
@pytest.mark.parametrize("dt", [torch.int64, torch.int8])
def test_integer_add_products(device, name, dt):
    op, *shapes = _INT_ADD_OPS[name]
    M, a, b = (torch.randint(-4, 5, (B,) + s, dtype=dt, device=device) for s in shapes)
    coeffs = [{}, {"beta": 2, "alpha": -3}, {"beta": 0, "alpha": 1}]
    if name != "addr":  # addr refuses float coefficients for integral results
        coeffs += [{"beta": 0.2, "alpha": 0.6}, {"beta": 1.7, "alpha": -2.6}]
    for kw in coeffs:
        f = lambda M, a, b, kw=kw: op(M, a, b, **kw)
        for in_dims in [(0, 0, 0), (0, None, None), (None, 0, None), (None, None, 0), (-1, 0, None)]:
            args = [x.movedim(0, -1) if d == -1 else (x[0] if d is None else x) for x, d in zip((M, a, b), in_dims)]
            check(f, in_dims, *args)
    # a 0-dim bias broadcasts
    check(lambda M, a, b: op(M, a, b, beta=3, alpha=0.9 if name != "addr" else 1), (0, 0, 0), M[:, 0].flatten()[:B], a, b)


def test_integer_add_products_dtype_and_errors(device):
    i = torch.randint(-4, 5, (B, 3, 3), device=device)
    out = pf.vmap(lambda M, a, b: torch.addmm(M, a, b, beta=0.2, alpha=0.6))(i, i, i)
    assert out.dtype == torch.int64 and not out.any()  # both coefficients truncate to 0
    with pytest.raises(RuntimeError, match="must not be a floating point number"):
        pf.vmap(lambda M, u, w: torch.addr(M, u, w, beta=0.5))(i, i[:, 0], i[:, 1])
    with pytest.raises(RuntimeError, match="Boolean alpha only supported for Boolean results"):
        pf.vmap(lambda M, u, w: torch.addr(M, u, w, alpha=True))(i, i[:, 0], i[:, 1])
    with pytest.raises(RuntimeError, match="without overflow"):
        pf.vmap(lambda M, a, b: torch.addmm(M, a, b, alpha=1j))(i, i, i)
    with pytest.raises(RuntimeError, match="without overflow"):
        pf.vmap(lambda M, a, b: torch.addmm(M, a, b, beta=1j))(i.double(), i.double(), i.double())
    with pytest.raises(RuntimeError, match="same dtype"):
        pf.vmap(lambda M, a, b: torch.addmm(M, a, b))(i, i.float(), i.float())
    check(lambda M, a, b: torch.addmm(M, a, b, alpha=2 + 0j), (0, 0, 0), i, i, i)  # imaginary part 0: fine
    # addr promotes its operands, a 0-dim unbatched bias included
    f = lambda M, u, w: torch.addr(M, u, w)
    check(f, (None, 0, 0), torch.tensor(1.5, dtype=torch.float64, device=device), torch.randn(B, 3, device=device), torch.randn(B, 4, device=device))
    check(f, (0, 0, None), i[:, :, 0].float(), i[:, 0], torch.randn(3, dtype=torch.float64, device=device))


def test_bool_addr(device):
    M, u, w = torch.rand(B, 3, 4, device=device) > 0.5, torch.rand(B, 3, device=device) > 0.5, torch.rand(B, 4, device=device) > 0.5
    for kw in [{}, {"beta": 0}, {"alpha": 0}, {"beta": 2, "alpha": 3}, {"beta": False, "alpha": True}]:
        f = lambda M, u, w, kw=kw: torch.addr(M, u, w, **kw)
        check(f, (0, 0, 0), M, u, w)
        check(f, (None, 0, 0), M[0], u, w)
        check(f, (0, None, None), M, u[0], w[0])


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_low_precision_add_products_round_once(device, dt):
    """addmm/baddbmm accumulate in float32 and round once: the rule gives torch's bits."""
    M, a, b = (torch.randn(B, *s, dtype=dt, device=device) for s in [(2, 6, 7), (2, 6, 8), (2, 8, 7)])
    f = lambda M, a, b: torch.baddbmm(M, a, b, beta=0.3, alpha=0.7)
    with no_fallback():
        assert torch.equal(pf.vmap(f)(M, a, b), loop_vmap(f)(M, a, b))
    g = lambda M, a, b: torch.addmm(M, a, b, beta=0.3, alpha=0.7)
    with no_fallback():
        assert torch.equal(pf.vmap(g, in_dims=(0, None, 0))(M[:, 0], a[0, 0], b[:, 0]),
                           loop_vmap(g, (0, None, 0))(M[:, 0], a[0, 0], b[:, 0]))


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_low_precision_addbmm_and_addr_round_as_the_kernels(device, dt):
    """addbmm's kernel is one addmm_ per inner batch (the running sum rounded each time);
    addr's rounds alpha and beta to the dtype, then each product and the sum."""
    M, a, b = (torch.randn(B, *s, dtype=dt, device=device) for s in [(6, 7), (4, 6, 8), (4, 8, 7)])
    f = lambda M, a, b: torch.addbmm(M, a, b, beta=0.3, alpha=0.7)
    u, w = torch.randn(B, 6, dtype=dt, device=device), torch.randn(B, 7, dtype=dt, device=device)
    g = lambda M, u, w: torch.addr(M, u, w, beta=0.2, alpha=0.6)
    with no_fallback():
        assert torch.equal(pf.vmap(f)(M, a, b), loop_vmap(f)(M, a, b))
        assert torch.equal(pf.vmap(f, in_dims=(None, 0, 0))(M[0], a, b), loop_vmap(f, (None, 0, 0))(M[0], a, b))
        assert torch.equal(pf.vmap(g)(M, u, w), loop_vmap(g)(M, u, w))


@pytest.mark.parametrize("dt", [torch.float64, torch.complex64, torch.bfloat16])
def test_linalg_cross(device, dt):
    """linalg_cross through its kernel (the decomposition rounds each product in bfloat16)."""
    x, y = torch.randn(B, 4, 3, dtype=dt, device=device), torch.randn(B, 4, 3, dtype=dt, device=device)
    f = lambda x, y: torch.linalg.cross(x, y)
    for in_dims, args in [((0, 0), (x, y)), ((None, 0), (x[0], y)), ((0, None), (x, y[0, :1])), ((1, 0), (x.movedim(0, 1), y))]:
        with no_fallback():
            assert torch.equal(pf.vmap(f, in_dims=in_dims)(*args), loop_vmap(f, in_dims)(*args))
    check(lambda x, y: torch.linalg.cross(x, y, dim=0), (1, 1), x.mT.movedim(0, 1), y.mT.movedim(0, 1))
    check(lambda x, y: torch.cross(x, y, dim=-1), (0, None), x, y[0])
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        pf.vmap(f)(x, y[:, 0])


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_low_precision_kernels_that_round_in_their_own_order_match_bit_for_bit(device, dt):
    """addmv/addbmm/addr kernels accumulate and round in an order that differs between ops,
    devices and torch releases: the rule's imitation is probed once against the kernel, and
    where it differs (addmv on CPU in torch 2.13) the kernel runs per example."""
    import warnings

    M, a, b = torch.randn(B, 6, dtype=dt, device=device), torch.randn(B, 6, 8, dtype=dt, device=device), \
        torch.randn(B, 8, dtype=dt, device=device)
    f = lambda M, a, b: torch.addmv(M, a, b, beta=0.3, alpha=0.7)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(pf.vmap(f)(M, a, b), loop_vmap(f)(M, a, b))
        assert torch.equal(pf.vmap(f, in_dims=(None, 0, None))(M[0], a, b[0]), loop_vmap(f, (None, 0, None))(M[0], a, b[0]))


def test_an_op_without_a_meta_kernel_is_checked_per_example_on_its_kernel(device):
    # geqrf has no meta kernel: the per-example check runs the kernel on the first example, so a
    # 1-D example raises torch's own error (the batched call alone would read (B, n) as one matrix)
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        torch.geqrf(torch.randn(4, device=device))
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        pf.vmap(torch.geqrf)(torch.randn(3, 4, device=device))
    a = torch.randn(3, 4, 2, device=device, dtype=torch.float64)
    got = pf.vmap(torch.geqrf)(a)
    want = [torch.geqrf(a[i]) for i in range(3)]
    assert_close(tuple(got), tuple(torch.stack([w[k] for w in want]) for k in range(2)))
