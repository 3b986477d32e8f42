"""Regressions found while building pyfunctorch, each checked against plain torch or a loop."""

import torch
import torch.func as tf
import pytest

import pyfunctorch as pf


def test_plain_torch_unchanged_after_transforms():
    # patching a slot method (Tensor.__getitem__) on torch.Tensor changes the type for good
    pf.grad(torch.sin)(torch.tensor(1.0))
    pf.vmap(torch.sin)(torch.randn(2))
    assert torch.equal(torch.tensor([torch.tensor(0.5), 0.0]), torch.tensor([0.5, 0.0]))
    assert torch.randn(3, 4)[torch.tensor(1)].shape == (4,)


def test_batched_scalar_index_stays_batched():
    x, i = torch.randn(3, 4, 5), torch.tensor([1, 3, -2])
    with _no_fallback():
        got = pf.vmap(lambda x, i: x[i])(x, i)
    assert torch.equal(got, torch.stack([a[b] for a, b in zip(x, i)]))


class _no_fallback:
    def __enter__(self):
        import warnings

        self.ctx = warnings.catch_warnings()
        self.ctx.__enter__()
        warnings.simplefilter("error", pf.PerformanceWarning)

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def test_jvp_writes_constant_into_lower_level_tangent():
    # gaussian_nll_loss clamps a clone in place under no_grad: forward AD then updates a
    # lower-level tangent in place with a value that carries no derivative of the level
    i, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    v = torch.rand(3, 4, dtype=torch.float64) + 0.1
    f = lambda i, t, v: torch.nn.functional.gaussian_nll_loss(i, t, v)  # noqa: E731
    torch.testing.assert_close(pf.jvp(f, (i, t, v), (i, t, v))[1], tf.jvp(f, (i, t, v), (i, t, v))[1])


def test_writing_a_derivative_into_an_outside_tensor_raises_before_writing():
    b = torch.zeros(3)
    for transform in (lambda f, x: pf.grad(f)(x), lambda f, x: pf.jvp(f, (x,), (torch.ones(3),))):
        with pytest.raises(RuntimeError, match="came from outside"):
            transform(lambda xi: b.copy_(xi).sum(), torch.randn(3))
    assert torch.equal(b, torch.zeros(3))


def test_transforms_in_several_threads_keep_torch_patched_only_while_needed():
    import threading

    import pyfunctorch._core as core

    originals = (torch.randn, torch.zeros, torch.Tensor.detach)
    errors = []

    def work():
        try:
            for _ in range(40):
                x = torch.randn(4, 3)
                out = pf.vmap(lambda a: a.sin() + torch.randn(()), randomness="different")(x)
                assert out.shape == (4, 3)
                torch.testing.assert_close(pf.grad(lambda a: a.exp().sum())(x), x.exp())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (torch.randn, torch.zeros, torch.Tensor.detach) == originals
    assert core._patch_users == 0


def test_autograd_function_closing_over_a_differentiated_tensor_raises():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(c):
            return c * Scale.x

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g

    def f(x):
        Scale.x = x  # read through a closure, not passed to apply(): the derivative would be lost
        return Scale.apply(torch.ones(3)).sum()

    with pytest.raises(RuntimeError, match="as an argument"):
        pf.grad(f)(torch.randn(3))
