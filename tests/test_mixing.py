"""Mixing pyfunctorch and torch.func transforms.

torch.func transforms *inside* pyfunctorch ones work (torch.func's C++ layers wrap
pyfunctorch's wrapper tensors like any tensor); pyfunctorch transforms inside torch.func
ones raise MixedTransformsError (a RuntimeError) before running, saying to use pyfunctorch
for every level. Oracle: torch.func for every level.
"""

import pytest
import torch
import torch.func as tf

import pyfunctorch as pf


def _mlp_loss_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))

    def loss(p, x, y):
        out = tf.functional_call(model, p, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, y.unsqueeze(0))

    return loss, params, x, y


def test_pyfunctorch_vmap_of_torch_func_grad_matches_torch_func():
    loss, params, x, y = _mlp_loss_setup()
    expected = tf.vmap(tf.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    got = pf.vmap(tf.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])


def test_torch_func_inside_pyfunctorch_other_orders():
    z = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(pf.vmap(tf.vmap(lambda a: a @ a))(z), tf.vmap(tf.vmap(lambda a: a @ a))(z))
    s = torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(pf.grad(tf.grad(torch.sin))(s), -torch.sin(s))
    torch.testing.assert_close(pf.grad(lambda v: tf.vmap(torch.sin)(v).sum())(z), z.cos())


@pytest.mark.parametrize("outer, inner", [
    ("vmap", "grad"), ("grad", "vmap"), ("vmap", "vmap"), ("jacrev", "jvp"), ("grad", "grad"),
])
def test_pyfunctorch_inside_torch_func_raises_clear_error(outer, inner):
    x = torch.randn(3, 4)
    x0 = x.clone()
    if inner == "grad":
        f = pf.grad(lambda v: v.sin().sum())
    elif inner == "vmap":
        f = pf.vmap(torch.sin)
    else:
        def f(v):
            return pf.jvp(torch.sin, (v,), (torch.ones_like(v),))[1]
    if outer in ("grad",):
        g = getattr(tf, outer)(lambda v: f(v).sum())
    else:
        g = getattr(tf, outer)(f)
    with pytest.raises(RuntimeError, match="inside a torch.func transform") as info:
        g(x)
    assert isinstance(info.value, pf.MixedTransformsError)
    assert "pyfunctorch.vmap(pyfunctorch.grad(f))" in str(info.value)
    torch.testing.assert_close(x, x0)
    # nothing is left behind: the same pyfunctorch transform works outside torch.func
    assert pf.vmap(pf.grad(lambda v: v.sin().sum()))(x).shape == x.shape
