"""grad, grad_and_value, vjp, jvp, linearize, jacrev, jacfwd, hessian, functional_call and
stack_module_state against torch.func, torch.autograd and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.func as tf
import torch.nn as nn
import torch.nn.functional as F

import pyfunctorch as pf

from conftest import assert_close, fd_assert_close, numerical_jacobian

DT = torch.float64

_A = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(3))

# scalar functions of one (4,)-shaped input
SCALAR_FNS = {
    "sin_sum": lambda x: torch.sin(x).sum(),
    "exp_tanh": lambda x: (torch.exp(x) * torch.tanh(x)).mean(),
    "quadratic": lambda x: x @ _A @ x,
    "softmax_dot": lambda x: (torch.softmax(x, 0) * x).sum(),
    "prod": lambda x: x.prod(),
    "division": lambda x: (x / (1 + x**2)).sum(),
    "logsumexp": lambda x: torch.logsumexp(x, 0),
    "norm": lambda x: x.norm(),
    "matmul_chain": lambda x: torch.tanh(_A @ x).dot(torch.sigmoid(_A.T @ x)),
    "cumprod": lambda x: x.cumprod(0).sum(),
    "max_relu": lambda x: F.relu(x).max() + x.abs().sum(),
    "outer_trace": lambda x: torch.outer(x, x.sin()).trace(),
}


def _x(device="cpu"):
    return torch.tensor([0.3, -0.7, 1.1, 0.5], dtype=DT, device=device)


def autograd_grad(f, *xs):
    xs = [x.detach().requires_grad_() for x in xs]
    (g,) = torch.autograd.grad(f(*xs), xs) if len(xs) == 1 else (torch.autograd.grad(f(*xs), xs),)
    return g


# ----------------------------------------------------------------------------------------
# grad / grad_and_value
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCALAR_FNS))
def test_grad_vs_torch_func_autograd_and_fd(name, device):
    f = SCALAR_FNS[name]
    x = _x(device)
    if device != "cpu":
        f_dev = f
        A = _A.to(device)
        f = {"quadratic": lambda x: x @ A @ x, "matmul_chain": lambda x: torch.tanh(A @ x).dot(torch.sigmoid(A.T @ x))}.get(name, f_dev)
    got = pf.grad(f)(x)
    assert_close(got, tf.grad(f)(x))
    assert_close(got, autograd_grad(f, x))
    if device == "cpu":
        fd_assert_close(got, numerical_jacobian(f, (x,)))


@pytest.mark.parametrize("name", sorted(SCALAR_FNS))
def test_grad_and_value(name):
    f = SCALAR_FNS[name]
    x = _x()
    g, v = pf.grad_and_value(f)(x)
    g_ref, v_ref = tf.grad_and_value(f)(x)
    assert_close((g, v), (g_ref, v_ref))
    assert_close(v, f(x))


def test_grad_float32(device):
    x = torch.randn(5, device=device)
    f = lambda x: (x.exp() * x.cos()).sum()  # noqa: E731
    assert_close(pf.grad(f)(x), tf.grad(f)(x))


def test_grad_argnums_int_negative_tuple(device):
    x, y, z = torch.randn(3, dtype=DT, device=device), torch.randn(3, dtype=DT, device=device), torch.randn(3, dtype=DT, device=device)

    def f(x, y, z):
        return (x.sin() * y.exp() / (2 + z.cos())).sum()

    for argnums in [0, 1, 2, -1, -3, (0, 2), (2, 0), (-1, 1), (0, 1, 2)]:
        got = pf.grad(f, argnums=argnums)(x, y, z)
        want = tf.grad(f, argnums=argnums)(x, y, z)
        assert_close(got, want)
        assert isinstance(got, tuple) == isinstance(argnums, tuple)
    # finite differences for each argument
    for i in range(3):
        fd_assert_close(pf.grad(f, argnums=i)(x, y, z), numerical_jacobian(f, (x, y, z), argnum=i))


def test_grad_single_element_tuple_argnums_returns_tuple(device):
    x = torch.randn(3, dtype=DT, device=device)
    got = pf.grad(lambda x, y: (x * y).sum(), argnums=(1,))(x, x)
    assert isinstance(got, tuple) and len(got) == 1
    assert_close(got[0], x)


def test_grad_has_aux(device):
    x = torch.randn(4, dtype=DT, device=device)

    def f(x):
        y = x.sin()
        return y.sum(), {"y": y, "pair": (x.cos(), x.exp().sum())}

    g, aux = pf.grad(f, has_aux=True)(x)
    g_ref, aux_ref = tf.grad(f, has_aux=True)(x)
    assert_close(g, g_ref)
    assert_close(aux, aux_ref)
    (g2, (v2, aux2)) = pf.grad_and_value(f, has_aux=True)(x)
    (g2r, (v2r, aux2r)) = tf.grad_and_value(f, has_aux=True)(x)
    assert_close((g2, v2, aux2), (g2r, v2r, aux2r))


def test_grad_has_aux_non_tensor_leaves_rejected_as_torch_func(device):
    # torch.func rejects non-tensor aux leaves with a RuntimeError; so does pyfunctorch
    x = torch.randn(4, dtype=DT, device=device)
    f = lambda x: (x.pow(2).sum(), {"n": 3, "s": "tag", "t": x.sum()})  # noqa: E731
    with pytest.raises(RuntimeError):
        torch.func.grad(f, has_aux=True)(x)
    with pytest.raises(RuntimeError, match="aux must be a tensor or a pytree"):
        pf.grad(f, has_aux=True)(x)


def test_grad_pytree_inputs_dict_and_tuple(device):
    params = {"w": torch.randn(3, 2, dtype=DT, device=device), "b": torch.randn(2, dtype=DT, device=device), "nested": (torch.randn(2, dtype=DT, device=device), [torch.randn((), dtype=DT, device=device)])}
    x = torch.randn(5, 3, dtype=DT, device=device)

    def loss(p, x):
        h = torch.tanh(x @ p["w"] + p["b"])
        return (h * p["nested"][0]).sum() * p["nested"][1][0].exp()

    got = pf.grad(loss)(params, x)
    want = tf.grad(loss)(params, x)
    assert_close(got, want)
    got_x = pf.grad(loss, argnums=(0, 1))(params, x)
    assert_close(got_x, tf.grad(loss, argnums=(0, 1))(params, x))
    # autograd oracle
    leaves = [t.detach().requires_grad_() for t in torch.utils._pytree.tree_leaves(params)]
    p2 = torch.utils._pytree.tree_unflatten(leaves, torch.utils._pytree.tree_structure(params))
    ag = torch.autograd.grad(loss(p2, x), leaves)
    assert_close(torch.utils._pytree.tree_leaves(got), list(ag))


def test_grad_kwargs_are_not_differentiated(device):
    x = torch.randn(3, dtype=DT, device=device)
    s = torch.randn(3, dtype=DT, device=device)
    got = pf.grad(lambda x, *, scale: (x * scale).pow(2).sum())(x, scale=s)
    assert_close(got, 2 * x * s**2)


def test_grad_unused_input_gives_zeros(device):
    x, y = torch.randn(3, dtype=DT, device=device), torch.randn(2, dtype=DT, device=device)
    got = pf.grad(lambda x, y: x.sum() * 2, argnums=(0, 1))(x, y)
    assert_close(got, (torch.full((3,), 2.0, dtype=DT, device=device), torch.zeros(2, dtype=DT, device=device)))


def test_grad_of_constant_function_is_zero(device):
    x = torch.randn(3, dtype=DT, device=device)
    c = torch.tensor(4.0, dtype=DT, device=device)
    assert_close(pf.grad(lambda x: c * 2)(x), torch.zeros(3, dtype=DT, device=device))


def test_grad_with_inplace_ops_inside(device):
    x = torch.randn(4, dtype=DT, device=device)

    def f(x):
        y = x.clone()
        y.mul_(x)
        y.add_(x.sin())
        y[1:] *= 2
        return y.sum()

    assert_close(pf.grad(f)(x), tf.grad(f)(x))
    fd_assert_close(pf.grad(f)(x), numerical_jacobian(f, (x,)))


def test_grad_ignores_outer_no_grad(device):
    """torch.func.grad computes gradients even under torch.no_grad() (it re-enables grad)."""
    x = torch.randn(3, dtype=DT, device=device)
    f = lambda x: (x.sin() * x.exp()).sum()  # noqa: E731
    with torch.no_grad():
        got = pf.grad(f)(x)
        want = tf.grad(f)(x)
    assert_close(got, want)
    assert_close(got, x.cos() * x.exp() + x.sin() * x.exp())


def test_grad_input_requiring_grad_is_differentiable_by_autograd():
    """Plain autograd over pyfunctorch.grad: checked with gradcheck (finite differences)."""
    f = SCALAR_FNS["matmul_chain"]
    x = _x().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pf.grad(f)(x), (x,))
    assert torch.autograd.gradcheck(lambda x: pf.grad(SCALAR_FNS["softmax_dot"])(x), (x,))


def test_grad_does_not_touch_input_requires_grad_or_dot_grad(device):
    x = torch.randn(3, dtype=DT, device=device)
    pf.grad(lambda x: x.pow(3).sum())(x)
    assert not x.requires_grad and x.grad is None
    y = torch.randn(3, dtype=DT, requires_grad=True, device=device)
    g = pf.grad(lambda y: y.pow(3).sum())(y)
    assert y.grad is None
    assert_close(g.detach(), 3 * y.detach() ** 2)


# ----------------------------------------------------------------------------------------
# vjp
# ----------------------------------------------------------------------------------------


def test_vjp_single_output_vs_torch_func_and_fd():
    x = torch.randn(4, dtype=DT)
    f = lambda x: torch.tanh(_A @ x) * x.exp()  # noqa: E731
    out, fn = pf.vjp(f, x)
    out_r, fn_r = tf.vjp(f, x)
    v = torch.randn(4, dtype=DT)
    assert_close(out, out_r)
    (ct,) = fn(v)
    assert_close(ct, fn_r(v)[0])
    fd_assert_close(ct, v @ numerical_jacobian(f, (x,)))


def test_vjp_multiple_primals_and_pytree_outputs(device):
    x, y = torch.randn(3, dtype=DT, device=device), torch.randn(3, 2, dtype=DT, device=device)

    def f(x, y):
        return {"a": x @ y, "b": (x.sin(), (y * 2).sum())}

    out, fn = pf.vjp(f, x, y)
    out_r, fn_r = tf.vjp(f, x, y)
    assert_close(out, out_r)
    ct = {"a": torch.randn(2, dtype=DT, device=device), "b": (torch.randn(3, dtype=DT, device=device), torch.randn((), dtype=DT, device=device))}
    got = fn(ct)
    assert isinstance(got, tuple) and len(got) == 2
    assert_close(got, fn_r(ct))


def test_vjp_pytree_primals(device):
    p = {"w": torch.randn(2, 3, dtype=DT, device=device), "b": torch.randn(2, dtype=DT, device=device)}
    x = torch.randn(3, dtype=DT, device=device)
    f = lambda p, x: torch.sigmoid(p["w"] @ x + p["b"])  # noqa: E731
    out, fn = pf.vjp(f, p, x)
    out_r, fn_r = tf.vjp(f, p, x)
    v = torch.randn(2, dtype=DT, device=device)
    assert_close(out, out_r)
    assert_close(fn(v), fn_r(v))


def test_vjp_fn_called_twice_and_has_aux(device):
    x = torch.randn(3, dtype=DT, device=device)
    f = lambda x: (x.exp(), {"aux": x.sum(), "k": x.cos()})  # noqa: E731
    out, fn, aux = pf.vjp(f, x, has_aux=True)
    out_r, fn_r, aux_r = tf.vjp(f, x, has_aux=True)
    assert_close((out, aux), (out_r, aux_r))
    v1, v2 = torch.randn(3, dtype=DT, device=device), torch.randn(3, dtype=DT, device=device)
    assert_close(fn(v1), fn_r(v1))
    assert_close(fn(v2), fn_r(v2))


def test_vjp_output_independent_of_input(device):
    x = torch.randn(3, dtype=DT, device=device)
    c = torch.randn(2, dtype=DT, device=device)
    out, fn = pf.vjp(lambda x: c * 2, x)
    assert_close(out, c * 2)
    assert_close(fn(torch.ones(2, dtype=DT, device=device)), (torch.zeros(3, dtype=DT, device=device),))


# ----------------------------------------------------------------------------------------
# jvp / linearize
# ----------------------------------------------------------------------------------------


def test_jvp_vs_torch_func_and_fd(device):
    x = torch.randn(4, dtype=DT, device=device)
    t = torch.randn(4, dtype=DT, device=device)
    A = _A.to(device)
    f = lambda x: torch.tanh(A @ x) * x.exp() / (1 + x**2)  # noqa: E731
    out, tan = pf.jvp(f, (x,), (t,))
    out_r, tan_r = tf.jvp(f, (x,), (t,))
    assert_close((out, tan), (out_r, tan_r))
    if device == "cpu":
        fd_assert_close(tan, numerical_jacobian(f, (x,)) @ t)


def test_jvp_multiple_primals_pytree_out_and_aux(device):
    x, y = torch.randn(3, dtype=DT, device=device), torch.randn(3, 2, dtype=DT, device=device)
    tx, ty = torch.randn(3, dtype=DT, device=device), torch.randn(3, 2, dtype=DT, device=device)

    def f(x, y):
        return {"a": x @ y, "b": [x.sin() * y.sum()]}, {"aux": x.cos()}

    got = pf.jvp(f, (x, y), (tx, ty), has_aux=True)
    want = tf.jvp(f, (x, y), (tx, ty), has_aux=True)
    assert len(got) == 3
    assert_close(got, want)


def test_jvp_pytree_primals(device):
    p = ({"w": torch.randn(2, 3, dtype=DT, device=device)}, torch.randn(3, dtype=DT, device=device))
    t = ({"w": torch.randn(2, 3, dtype=DT, device=device)}, torch.randn(3, dtype=DT, device=device))
    f = lambda d, x: torch.sin(d["w"] @ x)  # noqa: E731
    assert_close(pf.jvp(f, p, t), tf.jvp(f, p, t))


def test_jvp_output_independent_of_input(device):
    x = torch.randn(3, dtype=DT, device=device)
    c = torch.randn(2, dtype=DT, device=device)
    out, tan = pf.jvp(lambda x: c.sin(), (x,), (torch.ones(3, dtype=DT, device=device),))
    assert_close((out, tan), (c.sin(), torch.zeros(2, dtype=DT, device=device)))


def test_linearize_vs_torch_func():
    x = torch.randn(4, dtype=DT)
    f = lambda x: torch.softmax(_A @ x, 0) * x.cos()  # noqa: E731
    out, jfn = pf.linearize(f, x)
    out_r, jfn_r = tf.linearize(f, x)
    assert_close(out, out_r)
    for _ in range(3):
        t = torch.randn(4, dtype=DT)
        assert_close(jfn(t), jfn_r(t))
        fd_assert_close(jfn(t), numerical_jacobian(f, (x,)) @ t)


def test_linearize_multiple_primals(device):
    x, y = torch.randn(3, dtype=DT, device=device), torch.randn(3, dtype=DT, device=device)
    f = lambda x, y: (x * y.exp(), x.sum())  # noqa: E731
    out, jfn = pf.linearize(f, x, y)
    out_r, jfn_r = tf.linearize(f, x, y)
    tx, ty = torch.randn(3, dtype=DT, device=device), torch.randn(3, dtype=DT, device=device)
    assert_close(out, out_r)
    assert_close(jfn(tx, ty), jfn_r(tx, ty))


# ----------------------------------------------------------------------------------------
# jacrev / jacfwd / hessian
# ----------------------------------------------------------------------------------------

VEC_FNS = {
    "sin": (lambda x: torch.sin(x), (4,)),
    "matvec_tanh": (lambda x: torch.tanh(_A[:3] @ x), (4,)),
    "softmax": (lambda x: torch.softmax(x, -1), (4,)),
    "matrix_in": (lambda x: (x @ x.T).exp(), (2, 3)),
    "scalar_out": (lambda x: (x.exp() / x.cosh()).sum(), (3,)),
    "scalar_in": (lambda x: torch.stack([x.sin(), x * x, x.exp()]), ()),
    "division": (lambda x: x[:2] / (1 + x[1:] ** 2), (3,)),
    "cumsum_prod": (lambda x: x.cumsum(0) * x.prod(), (3,)),
}


@pytest.mark.parametrize("name", sorted(VEC_FNS))
@pytest.mark.parametrize("which", ["jacrev", "jacfwd"])
def test_jacobian_vs_torch_func_and_fd(device, name, which):
    f, shape = VEC_FNS[name]
    x = torch.randn(shape, dtype=DT, device=device)
    got = getattr(pf, which)(f)(x)
    assert_close(got, getattr(tf, which)(f)(x))
    fd_assert_close(got, numerical_jacobian(f, (x,)))


@pytest.mark.parametrize("which", ["jacrev", "jacfwd"])
def test_jacobian_argnums(device, which):
    x, y = torch.randn(3, dtype=DT, device=device), torch.randn(2, dtype=DT, device=device)
    f = lambda x, y: torch.cat([x.sin() * y.sum(), y.exp() * x.prod()])  # noqa: E731
    for argnums in [0, 1, -1, -2, (0, 1), (1, 0), (-1, 0)]:
        got = getattr(pf, which)(f, argnums=argnums)(x, y)
        # oracle: torch.func.jacrev (torch.func.jacfwd returns zeros for negative argnums
        # in torch 2.13, a torch bug)
        assert_close(got, tf.jacrev(f, argnums=argnums)(x, y))
    fd_assert_close(getattr(pf, which)(f, argnums=1)(x, y), numerical_jacobian(f, (x, y), argnum=1))


@pytest.mark.parametrize("which", ["jacrev", "jacfwd"])
def test_jacobian_pytree_in_and_out(device, which):
    p = {"w": torch.randn(2, 3, dtype=DT, device=device), "b": torch.randn(2, dtype=DT, device=device)}
    x = torch.randn(3, dtype=DT, device=device)

    def f(p, x):
        h = p["w"] @ x + p["b"]
        return {"h": torch.tanh(h), "s": (h**2).sum()}

    got = getattr(pf, which)(f, argnums=(0, 1))(p, x)
    want = getattr(tf, which)(f, argnums=(0, 1))(p, x)
    assert_close(got, want)


@pytest.mark.parametrize("which", ["jacrev", "jacfwd"])
def test_jacobian_has_aux(device, which):
    x = torch.randn(3, dtype=DT, device=device)
    f = lambda x: (x.sin() * x.sum(), {"c": x.cos()})  # noqa: E731
    got = getattr(pf, which)(f, has_aux=True)(x)
    want = getattr(tf, which)(f, has_aux=True)(x)
    assert_close(got, want)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 100])
def test_jacrev_chunk_size(device, chunk_size):
    x = torch.randn(5, dtype=DT, device=device)
    f = lambda x: torch.tanh(torch.outer(x, x.exp()))[:, :3]  # noqa: E731
    got = pf.jacrev(f, chunk_size=chunk_size)(x)
    assert_close(got, tf.jacrev(f)(x))
    assert_close(got, pf.jacrev(f)(x))
    fd_assert_close(got, numerical_jacobian(f, (x,)))


def test_jacrev_chunk_size_multiple_outputs(device):
    x = torch.randn(3, dtype=DT, device=device)
    f = lambda x: (x.sin(), x.sum() * x[:2])  # noqa: E731
    assert_close(pf.jacrev(f, chunk_size=2)(x), tf.jacrev(f, chunk_size=2)(x))


HESS_FNS = {
    "cubic": (lambda x: (x**3).sum(), lambda x: torch.diag(6 * x)),
    "quadratic": (lambda x: x @ _A[:3, :3] @ x, lambda x: _A[:3, :3] + _A[:3, :3].T),
    "exp_sum": (lambda x: torch.exp(x).sum(), lambda x: torch.diag(torch.exp(x))),
    "sin_prod": (lambda x: torch.sin(x).prod(), None),
    "logsumexp": (lambda x: torch.logsumexp(x * 2, 0), None),
    "rational": (lambda x: (x[0] / (1 + x[1] ** 2)) * x[2].exp(), None),
}


@pytest.mark.parametrize("name", sorted(HESS_FNS))
def test_hessian_vs_torch_func_exact_and_fd(device, name):
    f, exact = HESS_FNS[name]
    x = torch.randn(3, dtype=DT, device=device)
    got = pf.hessian(f)(x)
    assert_close(got, tf.hessian(f)(x))
    if exact is not None:
        assert_close(got, exact(x))
    # finite differences of the (autograd) gradient
    fd_assert_close(got, numerical_jacobian(lambda x: autograd_grad(f, x), (x,)))


@pytest.mark.parametrize("outer", ["jacfwd", "jacrev"])
def test_differentiating_vjp_fn_after_vjp_returned(device, outer):
    """vjp_fn is differentiable (jacrev's rows are vjp_fn outputs, so hessian relies on it).
    exp's backward uses its saved *output*."""
    x = torch.tensor([0.5, -1.0, 2.0], dtype=DT, device=device)

    def g(x):
        _, fn = pf.vjp(torch.exp, x)
        return fn(torch.ones(3, dtype=DT, device=device))[0]

    assert_close(getattr(pf, outer)(g)(x), torch.diag(torch.exp(x)))


def test_hessian_argnums_tuple_and_matrix_input(device):
    x, y = torch.randn(2, dtype=DT, device=device), torch.randn(2, 2, dtype=DT, device=device)
    f = lambda x, y: (torch.tanh(y @ x) * x.exp()).sum()  # noqa: E731
    assert_close(pf.hessian(f, argnums=(0, 1))(x, y), tf.hessian(f, argnums=(0, 1))(x, y))
    assert_close(pf.hessian(f, argnums=1)(x, y), tf.hessian(f, argnums=1)(x, y))


# ----------------------------------------------------------------------------------------
# functional_call and stack_module_state
# ----------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 2)
        self.register_buffer("scale", torch.tensor(1.5))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def test_functional_call_matches_module_and_torch_func():
    m = MLP().double()
    x = torch.randn(4, 3, dtype=DT)
    params = {k: v.detach() for k, v in m.named_parameters()}
    assert_close(pf.functional_call(m, params, (x,)), m(x).detach())
    new = {k: torch.randn_like(v) for k, v in params.items()}
    assert_close(pf.functional_call(m, new, x), tf.functional_call(m, new, (x,)))
    # a sequence of dicts (params, buffers), and kwargs
    bufs = {"scale": torch.tensor(-2.0, dtype=DT)}
    assert_close(pf.functional_call(m, (new, bufs), (x,)), tf.functional_call(m, (new, bufs), (x,)))
    # the module is untouched afterwards
    assert_close(m(x).detach(), pf.functional_call(m, params, (x,)))


def test_functional_call_kwargs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, *, shift):
            return self.lin(x) + shift

    m = M().double()
    p = {k: torch.randn_like(v) for k, v in m.named_parameters()}
    x, s = torch.randn(2, dtype=DT), torch.randn(2, dtype=DT)
    assert_close(pf.functional_call(m, p, (x,), {"shift": s}), tf.functional_call(m, p, (x,), {"shift": s}))


def test_grad_of_functional_call_vs_backward():
    m = MLP().double()
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p):
        return F.mse_loss(pf.functional_call(m, p, (x,)), y)

    got = pf.grad(loss)(params)
    m.zero_grad()
    F.mse_loss(m(x), y).backward()
    want = {k: v.grad for k, v in m.named_parameters()}
    assert_close(got, want)
    assert_close(got, tf.grad(lambda p: F.mse_loss(tf.functional_call(m, p, (x,)), y))(params))


def test_stack_module_state():
    models = [MLP().double() for _ in range(3)]
    params, buffers = pf.stack_module_state(models)
    params_r, buffers_r = tf.stack_module_state(models)
    assert list(params) == list(params_r) and list(buffers) == list(buffers_r)
    assert_close({k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in params_r.items()})
    assert_close(buffers, buffers_r)
    for k, v in params.items():
        assert v.shape == (3,) + dict(models[0].named_parameters())[k].shape
        assert v.requires_grad and v.is_leaf
        assert_close(v.detach()[1], dict(models[1].named_parameters())[k].detach())


def test_autograds_detach_of_a_live_wrapper_keeps_the_inner_value_without_a_dispatch(monkeypatch):
    # trap 2 on the fast path: autograd saving an output of a grad level's op detaches the
    # wrapper; the result wraps the same inner value (lower levels' graphs intact) and no
    # interpreter runs for it
    from pyfunctorch import reverse

    calls = []
    orig = reverse.GradInterpreter.dispatch

    def counting(self, func, args, kwargs):
        calls.append(func)
        return orig(self, func, args, kwargs)

    monkeypatch.setattr(reverse.GradInterpreter, "dispatch", counting)
    seen = {}

    def f(x):
        y = torch.tanh(x * 2)
        d = torch.ops.aten.detach.default(y)
        if hasattr(y, "_value"):  # (pyfunctorch's wrapper; f also runs under torch.func)
            seen["same"] = d._value is y._value and type(d) is type(y)
        return (y * y).sum()

    x = torch.randn(5, dtype=torch.float64)
    assert_close(pf.grad(f)(x), tf.grad(f)(x))  # (a shadow graph: the inner value is cut, see test_shadow_graph)
    xs = torch.randn(2, 5, dtype=torch.float64)
    assert_close(pf.vmap(pf.grad(f))(xs), tf.vmap(tf.grad(f))(xs))  # (the per-sample shadow: cut too)
    monkeypatch.setattr(reverse, "PER_SAMPLE_SHADOW", False)
    assert_close(pf.vmap(pf.grad(f))(xs), tf.vmap(tf.grad(f))(xs))  # (no shadow: the wrappers' graph)
    assert seen["same"]
    assert torch.ops.aten.detach.default not in calls
    # second order: the saved tanh output keeps the outer level's graph
    g = lambda a: pf.grad(f)(a).sum()  # noqa: E731
    h = lambda a: tf.grad(f)(a).sum()  # noqa: E731
    assert_close(pf.grad(g)(x), tf.grad(h)(x))


@pytest.mark.parametrize("cut", ["data", "new_tensor", "detach"])
@pytest.mark.parametrize("composition", ["grad", "grad(grad)", "jacfwd(grad)", "vmap(grad)", "jacrev"])
def test_data_new_tensor_and_detach_cut_levels_as_torch_func(cut, composition):
    # x.data cuts the level it is read at (the lower levels keep their graphs); new_tensor(x)
    # and x.detach() give a constant at every level -- torch.func's semantics for each
    import warnings

    def cutter(y):
        if cut == "data":
            return y.data
        if cut == "detach":
            return y.detach()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return y.new_tensor(y)

    def f(a):
        y = a.sin()
        return (cutter(y) * y * a).sum()

    def build(lib):
        return {
            "grad": lib.grad(f),
            "grad(grad)": lambda x: lib.grad(lambda a: lib.grad(f)(a).sum())(x),
            "jacfwd(grad)": lib.jacfwd(lib.grad(f)),
            "vmap(grad)": lambda x: lib.vmap(lib.grad(f))(x.expand(2, 3)),
            "jacrev": lib.jacrev(lambda a: f(a) * a),
        }[composition]

    x = torch.randn(3, dtype=torch.float64)
    assert_close(build(pf)(x), build(tf)(x))
