"""Compositions of transforms, each against the same composition in torch.func and, where a
closed form exists, against the exact answer. Plus the perturbation-confusion cases."""

from __future__ import annotations

import pytest
import torch
import torch.func as tf

import pyfunctorch as pf

from conftest import assert_close, loop_vmap

DT = torch.float64
B = 3

_M = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(7))


def _mat(x):
    return _M[: x.shape[-1], : x.shape[-1]].to(x.device)


# scalar-valued functions of an x of any shape with at least one dim
SCALAR = {
    "sin_exp": lambda x: (torch.sin(x) * torch.exp(x)).sum(),
    "tanh_matmul": lambda x: torch.tanh(x @ _mat(x)).sum(),
    "softmax": lambda x: (torch.softmax(x, -1) * torch.cos(x)).sum(),
    "prod_div": lambda x: (x.prod(-1) / (1 + (x**2).sum(-1))).sum(),
}
# vector-valued functions (for jvp / vjp)
VECTOR = {
    "sin_exp": lambda x: torch.sin(x) * torch.exp(x),
    "tanh_matmul": lambda x: torch.tanh(x @ _mat(x)),
    "softmax": lambda x: torch.softmax(x, -1) / (2 + torch.cos(x)),
    "prod_div": lambda x: x.prod(-1, keepdim=True) / (1 + x**2),
}
SHAPES = [(3,), (2, 3)]


def _rand(shape, batch=False, device="cpu"):
    s = ((B,) if batch else ()) + tuple(shape)
    return (torch.rand(s, dtype=DT, device=device) - 0.5) * 2


params_scalar = pytest.mark.parametrize("fname", sorted(SCALAR))
params_vector = pytest.mark.parametrize("fname", sorted(VECTOR))
params_shape = pytest.mark.parametrize("shape", SHAPES, ids=str)


# ----------------------------------------------------------------------------------------
# each composition: pf vs torch.func
# ----------------------------------------------------------------------------------------


@params_scalar
@params_shape
def test_vmap_grad(device, fname, shape):
    f = SCALAR[fname]
    xb = _rand(shape, batch=True, device=device)
    got = pf.vmap(pf.grad(f))(xb)
    assert_close(got, tf.vmap(tf.grad(f))(xb))
    assert_close(got, loop_vmap(tf.grad(f))(xb))


@params_scalar
@params_shape
def test_grad_vmap(device, fname, shape):
    f = SCALAR[fname]
    xb = _rand(shape, batch=True, device=device)
    got = pf.grad(lambda xb: pf.vmap(f)(xb).sum())(xb)
    assert_close(got, tf.grad(lambda xb: tf.vmap(f)(xb).sum())(xb))


@params_scalar
@params_shape
def test_grad_grad_grad(device, fname, shape):
    f = SCALAR[fname]
    x = _rand(shape, device=device)

    def third(M):
        g1 = lambda x: M.grad(f)(x).sin().sum()  # noqa: E731
        g2 = lambda x: (M.grad(g1)(x) * x).sum()  # noqa: E731
        return M.grad(g2)(x)

    assert_close(third(pf), third(tf))


@params_scalar
@params_shape
@pytest.mark.parametrize("outer,inner", [("jacfwd", "jacrev"), ("jacrev", "jacrev"), ("jacfwd", "jacfwd"), ("jacrev", "jacfwd")])
def test_jacobian_of_jacobian(device, fname, shape, outer, inner):
    f = SCALAR[fname]
    x = _rand(shape, device=device)
    got = getattr(pf, outer)(getattr(pf, inner)(f))(x)
    want = tf.jacfwd(tf.jacrev(f))(x)
    assert_close(got, want)


@params_scalar
@params_shape
def test_jvp_grad(device, fname, shape):
    f = SCALAR[fname]
    x, t = _rand(shape, device=device), _rand(shape, device=device)
    got = pf.jvp(pf.grad(f), (x,), (t,))
    assert_close(got, tf.jvp(tf.grad(f), (x,), (t,)))


@params_scalar
@params_shape
def test_grad_jvp(device, fname, shape):
    f = SCALAR[fname]
    x, t = _rand(shape, device=device), _rand(shape, device=device)
    got = pf.grad(lambda x: pf.jvp(f, (x,), (t,))[1])(x)
    assert_close(got, tf.grad(lambda x: tf.jvp(f, (x,), (t,))[1])(x))


@params_vector
@params_shape
def test_jvp_jvp(device, fname, shape):
    g = VECTOR[fname]
    x, t1, t2 = _rand(shape, device=device), _rand(shape, device=device), _rand(shape, device=device)

    def run(M):
        return M.jvp(lambda x: M.jvp(g, (x,), (t1,))[1], (x,), (t2,))

    assert_close(run(pf), run(tf))


@params_vector
@params_shape
def test_vmap_jvp(device, fname, shape):
    g = VECTOR[fname]
    xb, tb = _rand(shape, True, device=device), _rand(shape, True, device=device)
    run = lambda M: M.vmap(lambda x, t: M.jvp(g, (x,), (t,)))(xb, tb)  # noqa: E731
    assert_close(run(pf), run(tf))


@params_vector
@params_shape
def test_vmap_jvp_unbatched_tangent(device, fname, shape):
    g = VECTOR[fname]
    xb, t = _rand(shape, True, device=device), _rand(shape, device=device)
    run = lambda M: M.vmap(lambda x: M.jvp(g, (x,), (t,)))(xb)  # noqa: E731
    assert_close(run(pf), run(tf))


@params_vector
@params_shape
def test_jvp_vmap(device, fname, shape):
    g = VECTOR[fname]
    xb, tb = _rand(shape, True, device=device), _rand(shape, True, device=device)
    run = lambda M: M.jvp(M.vmap(g), (xb,), (tb,))  # noqa: E731
    assert_close(run(pf), run(tf))


@params_vector
@params_shape
def test_vmap_vjp(device, fname, shape):
    g = VECTOR[fname]
    xb = _rand(shape, True, device=device)
    vb = torch.randn_like(tf.vmap(g)(xb))

    def run(M):
        def one(x, v):
            out, fn = M.vjp(g, x)
            return out, fn(v)[0]

        return M.vmap(one)(xb, vb)

    assert_close(run(pf), run(tf))


@params_vector
@params_shape
def test_vmap_over_vjp_fn(device, fname, shape):
    g = VECTOR[fname]
    x = _rand(shape, device=device)
    out = g(x)
    vb = torch.randn((B,) + tuple(out.shape), dtype=DT, device=device)

    def run(M):
        _, fn = M.vjp(g, x)
        return M.vmap(fn)(vb)

    assert_close(run(pf), run(tf))


@params_vector
@params_shape
def test_vjp_vmap(device, fname, shape):
    g = VECTOR[fname]
    xb = _rand(shape, True, device=device)
    vb = torch.randn_like(tf.vmap(g)(xb))

    def run(M):
        out, fn = M.vjp(M.vmap(g), xb)
        return out, fn(vb)

    assert_close(run(pf), run(tf))


@params_scalar
@params_shape
def test_vmap_hessian(device, fname, shape):
    f = SCALAR[fname]
    xb = _rand(shape, True, device=device)
    assert_close(pf.vmap(pf.hessian(f))(xb), tf.vmap(tf.hessian(f))(xb))


@params_scalar
@params_shape
def test_grad_vmap_grad(device, fname, shape):
    f = SCALAR[fname]
    xb = _rand(shape, True, device=device)
    run = lambda M: M.grad(lambda xb: (M.vmap(M.grad(f))(xb) ** 2).sum())(xb)  # noqa: E731
    assert_close(run(pf), run(tf))


@params_vector
def test_vmap_vmap_mixed_negative_in_dims(device, fname):
    g = VECTOR[fname]
    a = _rand((4, 3, 2), device=device)  # outer batch at -1 (size 2), inner batch at 0 (size 4): example (3,)
    b = _rand((2, 3), device=device)  # outer batch at 0, inner: unbatched

    def h(x, y):
        return g(x * y)

    def run(M):
        return M.vmap(M.vmap(h, in_dims=(0, None), out_dims=-1), in_dims=(-1, 0), out_dims=1)(a, b)

    got = run(pf)
    assert_close(got, run(tf))
    assert_close(got, loop_vmap(loop_vmap(h, in_dims=(0, None), out_dims=-1), in_dims=(-1, 0), out_dims=1)(a, b))


@params_scalar
def test_vmap_vmap_grad_negative_in_dims(device, fname):
    f = SCALAR[fname]
    x = _rand((3, 2, 4), device=device)  # outer over dim -1 (4), inner over dim 0 (3): example (2,)
    run = lambda M: M.vmap(M.vmap(M.grad(f), in_dims=0), in_dims=-1)(x)  # noqa: E731
    assert_close(run(pf), run(tf))


@params_vector
def test_jacrev_jacfwd_of_vector_function(device, fname):
    g = VECTOR[fname]
    x = _rand((3,), device=device)
    assert_close(pf.jacrev(pf.jacfwd(g))(x), tf.jacrev(tf.jacfwd(g))(x))


@params_scalar
def test_vmap_jacrev_with_in_dims_none(device, fname):
    f = SCALAR[fname]
    x = _rand((3,), device=device)
    w = _rand((3,), True, device=device)
    run = lambda M: M.vmap(M.jacrev(lambda x, w: f(x * w)), in_dims=(None, 0))(x, w)  # noqa: E731
    assert_close(run(pf), run(tf))


# ----------------------------------------------------------------------------------------
# exact answers (sin: every derivative is known)
# ----------------------------------------------------------------------------------------


def test_exact_answers_for_sin(device):
    x = _rand((4,), device=device)
    xb = _rand((4,), True, device=device)
    t = _rand((4,), device=device)
    f = lambda x: torch.sin(x).sum()  # noqa: E731
    assert_close(pf.vmap(pf.grad(f))(xb), torch.cos(xb))
    assert_close(pf.grad(lambda xb: pf.vmap(f)(xb).sum())(xb), torch.cos(xb))
    assert_close(pf.hessian(f)(x), torch.diag(-torch.sin(x)))
    assert_close(pf.jacrev(pf.jacrev(f))(x), torch.diag(-torch.sin(x)))
    assert_close(pf.jvp(pf.grad(f), (x,), (t,)), (torch.cos(x), -torch.sin(x) * t))
    assert_close(pf.grad(lambda x: pf.jvp(f, (x,), (t,))[1])(x), -torch.sin(x) * t)
    assert_close(pf.vmap(pf.hessian(f))(xb), torch.diag_embed(-torch.sin(xb)))
    # d/dx sum(cos(x)^2) = -sin(2x)
    assert_close(pf.grad(lambda xb: (pf.vmap(pf.grad(f))(xb) ** 2).sum())(xb), -torch.sin(2 * xb))
    # third derivative of sin is -cos
    s = torch.tensor(0.7, dtype=DT, device=device)
    assert_close(pf.grad(pf.grad(pf.grad(torch.sin)))(s), -torch.cos(s))
    # fourth, mixing modes: jvp(grad(grad(grad)))
    assert_close(pf.jvp(pf.grad(pf.grad(pf.grad(torch.sin))), (s,), (torch.ones((), dtype=DT, device=device),))[1], torch.sin(s))


def test_exact_jvp_jvp_of_product(device):
    # d2/dadb of x*y along (t1 on x) and (t2 on y) = t1*t2
    x, y = _rand((3,), device=device), _rand((3,), device=device)
    t1, t2 = _rand((3,), device=device), _rand((3,), device=device)
    z = torch.zeros(3, dtype=DT, device=device)
    out = pf.jvp(lambda x, y: pf.jvp(lambda x, y: x * y, (x, y), (t1, z))[1], (x, y), (z, t2))[1]
    assert_close(out, t1 * t2)


# ----------------------------------------------------------------------------------------
# perturbation confusion
# ----------------------------------------------------------------------------------------

ONE = torch.tensor(1.0, dtype=DT)


@pytest.mark.parametrize("xv", [0.5, 2.0, -3.0])
def test_perturbation_confusion_reverse(xv):
    x = torch.tensor(xv, dtype=DT)
    got = pf.grad(lambda x: pf.grad(lambda y: x * y)(x))(x)
    assert_close(got, ONE)
    assert_close(got, tf.grad(lambda x: tf.grad(lambda y: x * y)(x))(x))


@pytest.mark.parametrize("xv", [0.5, 2.0, -3.0])
def test_perturbation_confusion_forward(xv):
    x = torch.tensor(xv, dtype=DT)
    got = pf.jvp(lambda x: pf.jvp(lambda y: x * y, (x,), (ONE,))[1], (x,), (ONE,))[1]
    assert_close(got, ONE)
    assert_close(got, tf.jvp(lambda x: tf.jvp(lambda y: x * y, (x,), (ONE,))[1], (x,), (ONE,))[1])


@pytest.mark.parametrize("xv", [0.5, 2.0, -3.0])
def test_perturbation_confusion_grad_over_jvp(xv):
    x = torch.tensor(xv, dtype=DT)
    got = pf.grad(lambda x: pf.jvp(lambda y: x * y, (x,), (ONE,))[1])(x)
    assert_close(got, ONE)
    assert_close(got, tf.grad(lambda x: tf.jvp(lambda y: x * y, (x,), (ONE,))[1])(x))


@pytest.mark.parametrize("xv", [0.5, 2.0, -3.0])
def test_perturbation_confusion_jvp_over_grad(xv):
    x = torch.tensor(xv, dtype=DT)
    got = pf.jvp(lambda x: pf.grad(lambda y: x * y)(x), (x,), (ONE,))[1]
    assert_close(got, ONE)
    assert_close(got, tf.jvp(lambda x: tf.grad(lambda y: x * y)(x), (x,), (ONE,))[1])


def test_perturbation_confusion_siskind_pearlmutter():
    # d/dx [ x * (d/dy (x + y))|_{y=x} ] = 1 (a confused implementation gives 2)
    x = torch.tensor(1.3, dtype=DT)
    for M in (pf,):
        assert_close(M.grad(lambda x: x * M.grad(lambda y: x + y)(x))(x), ONE)
        assert_close(M.jvp(lambda x: x * M.jvp(lambda y: x + y, (x,), (ONE,))[1], (x,), (ONE,))[1], ONE)
        assert_close(M.grad(lambda x: x * M.jvp(lambda y: x + y, (x,), (ONE,))[1])(x), ONE)
        assert_close(M.jvp(lambda x: x * M.grad(lambda y: x + y)(x), (x,), (ONE,))[1], ONE)


def test_perturbation_confusion_under_vmap():
    xs = torch.tensor([0.5, 2.0, -3.0], dtype=DT)
    ones = torch.ones(3, dtype=DT)
    assert_close(pf.vmap(lambda x: pf.grad(lambda x: pf.grad(lambda y: x * y)(x))(x))(xs), ones)
    assert_close(pf.vmap(lambda x: pf.jvp(lambda x: pf.jvp(lambda y: x * y, (x,), (ONE,))[1], (x,), (ONE,))[1])(xs), ones)
    assert_close(pf.vmap(lambda x: pf.grad(lambda x: pf.jvp(lambda y: x * y, (x,), (ONE,))[1])(x))(xs), ones)
    assert_close(pf.vmap(lambda x: pf.jvp(lambda x: pf.grad(lambda y: x * y)(x), (x,), (ONE,))[1])(xs), ones)


def test_perturbation_confusion_nontrivial():
    # d/dx grad_y[ sin(x*y) ]|_{y=x}: grad_y = x cos(xy); at y=x -> x cos(x^2)
    # d/dx x cos(x^2) = cos(x^2) - 2 x^2 sin(x^2)
    x = torch.tensor(0.8, dtype=DT)
    want = torch.cos(x**2) - 2 * x**2 * torch.sin(x**2)
    assert_close(pf.grad(lambda x: pf.grad(lambda y: torch.sin(x * y))(x))(x), want)
    assert_close(pf.jvp(lambda x: pf.grad(lambda y: torch.sin(x * y))(x), (x,), (ONE,))[1], want)
    assert_close(pf.grad(lambda x: pf.jvp(lambda y: torch.sin(x * y), (x,), (ONE,))[1])(x), want)
    assert_close(pf.jvp(lambda x: pf.jvp(lambda y: torch.sin(x * y), (x,), (ONE,))[1], (x,), (ONE,))[1], want)


# vjp_fn runs its backward after the vjp level ended (dead wrappers stand for their inner
# values). Under two jvp levels those inner values carry the tangents of both, and the inner
# level's kernel took the outer tangent as its own: jvp over hessian(f, argnums=1) (jacfwd of
# jacrev, which calls vjp_fn) with an operand from the outer jvp was wrong, primal included
# (fuzzer seeds 10722, 12905). Oracle: plain torch.autograd.functional (double backward, then
# its jvp).
_MIXED = {
    "x*y": lambda x, y: (x * y).sum(),
    "x*y*y": lambda x, y: (x * y * y).sum(),
    "x*exp(y)": lambda x, y: (x * y.exp()).sum(),
    "tanh(x/(1+y^2))": lambda x, y: torch.tanh(x / (1 + y * y)).mean(),
    "maximum": lambda x, y: torch.tanh(torch.maximum(x / (1 + y * y), y)).mean() + torch.tanh(y).sum(),
}


def _vjp_fn_under_jvp(L, f):
    def g(x, y):
        out, fn = L.vjp(lambda z: f(x, z), y)
        return fn(torch.ones_like(out))[0]

    return lambda x, y: L.jvp(lambda z: g(x, z), (y,), (torch.ones_like(y),))[1]


_SECOND_IN_Y = {
    "hessian": lambda L, f: L.hessian(f, argnums=1),
    "jacfwd_jacrev": lambda L, f: L.jacfwd(L.jacrev(f, argnums=1), argnums=1),
    "jacrev_jacrev": lambda L, f: L.jacrev(L.jacrev(f, argnums=1), argnums=1),
    "jvp_vjp_fn": _vjp_fn_under_jvp,
}


@pytest.mark.parametrize("y_shape", [(), (2,)])
@pytest.mark.parametrize("second", list(_SECOND_IN_Y))
@pytest.mark.parametrize("fname", list(_MIXED))
def test_jvp_over_second_derivative_with_outer_operand(device, fname, second, y_shape):
    f = _MIXED[fname]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, generator=g, dtype=DT).to(device)
    y = torch.randn(y_shape, generator=g, dtype=DT).to(device)
    t = torch.randn(2, generator=g, dtype=DT).to(device)
    got = pf.jvp(lambda a: _SECOND_IN_Y[second](pf, f)(a, y), (x,), (t,))

    def h(a):  # the same second derivative in y, by plain autograd
        H = torch.autograd.functional.hessian(lambda z: f(a, z), y, create_graph=True)
        # (jvp_vjp_fn: the Hessian times the ones tangent)
        return H @ torch.ones_like(y) if second == "jvp_vjp_fn" and y.dim() else H

    want = torch.autograd.functional.jvp(h, x, t)
    assert_close(got, want)


# A reduction's backward broadcasts its gradient (an expanded, internally overlapping tensor);
# where it met a jvp level's dual in an additive op (log_softmax's backward: g - exp(y) *
# g.sum()), the explicit zero tangent for that constant (_core.zero_tangents_for_constants)
# made it a dual's primal, which torch cannot be (it copies the tangent into the primal's
# overlapping layout): fourth derivatives raised "more than one element of the written-to
# tensor refers to a single memory location" (fuzzer seed 35303). Oracle: torch.func.
_FOURTH = {
    "log_softmax_sum": lambda a: torch.log_softmax(a, 0).sum(),
    "log_softmax_weighted": lambda a: (torch.log_softmax(a, 0) * torch.arange(1.0, 4.0, dtype=a.dtype)).sum(),
    "softmax_sum_sq": lambda a: (torch.softmax(a, 0).sum() * a).sum(),
    "logsumexp": lambda a: torch.logsumexp(a, 0) + a.sum(),
    "centered": lambda a: ((a - a.mean()) ** 3).sum(),
}


@pytest.mark.parametrize("order", ["hessian_hessian", "jacfwd_jacrev_jacrev_grad"])
@pytest.mark.parametrize("fname", list(_FOURTH))
def test_fourth_derivative_through_broadcast_reduction_gradients(fname, order):
    f = _FOURTH[fname]
    x = torch.tensor([0.3, -0.8, 1.1], dtype=DT)
    if order == "hessian_hessian":
        got, want = pf.hessian(pf.hessian(f))(x), tf.hessian(tf.hessian(f))(x)
    else:
        got = pf.jacfwd(pf.jacrev(pf.jacrev(pf.grad(f))))(x)
        want = tf.jacfwd(tf.jacrev(tf.jacrev(tf.grad(f))))(x)
    assert_close(got, want)


@pytest.mark.parametrize("case", ["0-dim", "shape (1,)", "pytree out", "two argnums", "aux", "chunked", "under vmap"])
def test_jacrev_of_one_output_element_matches_torch_func(case):
    """jacrev with one output element takes one vjp instead of a vmap over a one-row basis
    (speed: hessian = jacfwd(jacrev(f)) of a scalar f); the result must be the same as
    torch.func's in every shape and structure."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    X = torch.randn(4, 3, 2, dtype=torch.float64)

    def f(a, b):
        return (a.sin() @ b).exp().sum()

    if case == "0-dim":
        got, want = pf.jacrev(f)(x, y), tf.jacrev(f)(x, y)
    elif case == "shape (1,)":
        got, want = pf.jacrev(lambda a: f(a, y).reshape(1))(x), tf.jacrev(lambda a: f(a, y).reshape(1))(x)
    elif case == "pytree out":
        g = lambda a: {"v": f(a, y).reshape(1, 1)}  # noqa: E731
        got, want = pf.jacrev(g)(x), tf.jacrev(g)(x)
    elif case == "two argnums":
        got, want = pf.jacrev(f, argnums=(0, 1))(x, y), tf.jacrev(f, argnums=(0, 1))(x, y)
    elif case == "aux":
        g = lambda a: (f(a, y), a.cos())  # noqa: E731
        got, want = pf.jacrev(g, has_aux=True)(x), tf.jacrev(g, has_aux=True)(x)
    elif case == "chunked":
        got, want = pf.jacrev(f, chunk_size=1)(x, y), tf.jacrev(f, chunk_size=1)(x, y)
    else:
        got = pf.vmap(pf.jacrev(lambda a: f(a, y)))(X)
        want = tf.vmap(tf.jacrev(lambda a: f(a, y)))(X)
    assert_close(got, want)
    # and the second derivative through it (hessian = jacfwd(jacrev)), against torch.func
    if case == "0-dim":
        assert_close(pf.hessian(f, argnums=(0, 1))(x, y), tf.hessian(f, argnums=(0, 1))(x, y))
        assert_close(pf.jacrev(pf.jacrev(f))(x, y), tf.jacrev(tf.jacrev(f))(x, y))


@pytest.mark.parametrize("case", ["add const", "mul const", "sub broadcast", "div 0-dim", "where", "rank mix",
                                  "hvp"])
def test_forward_ad_with_constant_operands_under_vmap_matches_torch_func(case):
    """Forward AD meeting an operand without a tangent (a closed-over constant) computes an
    efficient zero tensor's metadata with torch's Python meta kernels on meta copies of our
    batched tangents; elementwise prims ops on meta values take a shortcut (the prims op on
    broadcast meta values). Results must equal torch.func's (jacfwd = vmap over jvp)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64)
    b, c = torch.randn(4, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    s = torch.tensor(1.7, dtype=torch.float64)
    fns = {
        "add const": lambda a: a.sin() + b,
        "mul const": lambda a: a.exp() * c,
        "sub broadcast": lambda a: c - a.cos() - b,
        "div 0-dim": lambda a: a.tanh() / s + s,
        "where": lambda a: torch.where(a > 0, a * b, c),
        "rank mix": lambda a: (a.sum(0) + b) * b + a[0],
    }
    if case == "hvp":
        f = lambda a: ((a @ b).tanh() * 2 + s).sum()  # noqa: E731
        V = torch.randn(5, 3, 4, dtype=torch.float64)
        got = pf.vmap(lambda v: pf.jvp(pf.grad(f), (x,), (v,))[1])(V)
        want = tf.vmap(lambda v: tf.jvp(tf.grad(f), (x,), (v,))[1])(V)
    else:
        got, want = pf.jacfwd(fns[case])(x), tf.jacfwd(fns[case])(x)
        assert_close(pf.hessian(lambda a: fns[case](a).sum())(x), tf.hessian(lambda a: fns[case](a).sum())(x))
    assert_close(got, want)
