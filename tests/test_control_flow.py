"""cond / while_loop / scan: batched under vmap, exact under grad, jvp and compositions.

Oracles: the per-example Python loop with ordinary control flow, and torch.func on that loop.
"""

import pytest
import torch
import torch.func as tf

import pyfunctorch as pf

DT = torch.float64


def branchy(x):
    return pf.cond(x.sum() > 0, lambda x: x.sin() * 2, lambda x: x.exp() - 1, (x,))


def branchy_python(x):
    return x.sin() * 2 if x.sum() > 0 else x.exp() - 1


def halving(x):
    return pf.while_loop(lambda c: c[0].abs().sum() > 1, lambda c: (c[0] / 2 + 0.01 * c[1], c[1] + 1), (x, torch.zeros((), dtype=x.dtype)))[0]


def halving_python(x):
    c = (x, torch.zeros((), dtype=x.dtype))
    while c[0].abs().sum() > 1:
        c = (c[0] / 2 + 0.01 * c[1], c[1] + 1)
    return c[0]


def rnn_scan(x):
    w = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
    carry, ys = pf.scan(lambda h, xi: (torch.tanh(h * w + xi), h.sum()), torch.zeros(x.shape[-1], dtype=x.dtype), x)
    return carry.sum() + ys.sum()


def rnn_python(x):
    w = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
    h = torch.zeros(x.shape[-1], dtype=x.dtype)
    total = 0
    for xi in x:
        total = total + h.sum()
        h = torch.tanh(h * w + xi)
    return h.sum() + total


CASES = [(branchy, branchy_python, (3,)), (halving, halving_python, (3,)), (rnn_scan, rnn_python, (4, 3))]


@pytest.fixture(params=CASES, ids=["cond", "while_loop", "scan"])
def case(request):
    return request.param


def _batch(shape):
    torch.manual_seed(0)
    x = torch.randn((6,) + shape, dtype=DT) * 2
    x[0] = x[0].abs()  # both branches / different trip counts appear in the batch
    x[1] = -x[1].abs()
    return x


def test_vmap_matches_loop(case):
    f, ref, shape = case
    x = _batch(shape)
    got = pf.vmap(f)(x)
    want = torch.stack([ref(xi) for xi in x])
    torch.testing.assert_close(got, want)


def test_vmap_grad_matches_loop(case):
    f, ref, shape = case
    x = _batch(shape)
    scalar = lambda v: f(v).sum()  # noqa: E731
    got = pf.vmap(pf.grad(scalar))(x)
    want = torch.stack([tf.grad(lambda v: ref(v).sum())(xi) for xi in x])
    torch.testing.assert_close(got, want)


def test_grad_of_vmap_matches_loop(case):
    f, ref, shape = case
    x = _batch(shape)
    got = pf.grad(lambda xs: pf.vmap(f)(xs).pow(2).sum())(x)
    want = tf.grad(lambda xs: torch.stack([ref(xi) for xi in xs]).pow(2).sum())(x)
    torch.testing.assert_close(got, want)


def test_vmap_jvp_matches_loop(case):
    f, ref, shape = case
    x = _batch(shape)
    t = torch.ones_like(x)
    got = pf.vmap(lambda xi, ti: pf.jvp(f, (xi,), (ti,))[1])(x, t)
    want = torch.stack([tf.jvp(ref, (xi,), (ti,))[1] for xi, ti in zip(x, t)])
    torch.testing.assert_close(got, want)


def test_hessian_under_vmap_matches_loop(case):
    f, ref, shape = case
    x = _batch(shape)
    got = pf.vmap(pf.hessian(lambda v: f(v).sum()))(x)
    want = torch.stack([tf.hessian(lambda v: ref(v).sum())(xi) for xi in x])
    torch.testing.assert_close(got, want)


def test_unbatched_predicate_takes_python_path():
    calls = []
    out = pf.cond(torch.tensor(True), lambda: calls.append("t") or torch.ones(()), lambda: calls.append("f") or torch.zeros(()))
    assert calls == ["t"] and out == 1


def test_cond_errors_are_clear():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="same shape"):
        pf.vmap(lambda v: pf.cond(v.sum() > 0, lambda v: v, lambda v: v[:2], (v,)))(x.expand(2, 3))
    with pytest.raises(ValueError, match="one element per example"):
        pf.cond(x > 0, lambda v: v, lambda v: v, (x,))
    with pytest.raises(TypeError, match="tuple"):
        pf.cond(True, lambda v: v, lambda v: v, x)
