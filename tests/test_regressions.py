"""Regressions found while building pyfunctorch, each checked against plain torch or a loop."""

import torch
import torch.func as tf
import pytest

import pyfunctorch as pf

from conftest import run_in_threads


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
    originals = (torch.randn, torch.zeros, torch.Tensor.detach)

    def work():
        for _ in range(40):
            x = torch.randn(4, 3)
            out = pf.vmap(lambda a: a.sin() + torch.randn(()), randomness="different")(x)
            assert out.shape == (4, 3)
            torch.testing.assert_close(pf.grad(lambda a: a.exp().sum())(x), x.exp())

    assert run_in_threads(work, 4) == []
    assert (torch.randn, torch.zeros, torch.Tensor.detach) == originals
    from pyfunctorch import _patching
    assert _patching._patch_users == 0


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


@pytest.mark.parametrize("as_method", [False, True])
def test_tensor_split_with_batched_tensor_sections_is_ragged_per_example(as_method):
    """torch's C++ composite reads the sections tensor's data (a wrapper has none: torch
    crashed). Each example now splits at its own indices; the parts are ragged."""
    import warnings

    x = torch.randn(2, 5, 3)
    idx = torch.tensor([[1, 2, 3], [3, 3, 3]])

    def f(a, i):
        return a.tensor_split(i, dim=0) if as_method else torch.tensor_split(a, i, dim=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = pf.vmap(f)(x, idx)
    loop = [torch.tensor_split(a, i, dim=0) for a, i in zip(x, idx)]
    assert len(parts) == 4
    for k, part in enumerate(parts):
        pieces = part.unbind() if part.is_nested else part.unbind(0)
        for b in range(2):
            assert torch.equal(pieces[b], loop[b][k])


def test_tensor_split_with_unbatched_sections_tensor_inside_vmap():
    x = torch.randn(3, 6)
    got = pf.vmap(lambda a: torch.tensor_split(a, torch.tensor([2, 4])))(x)
    for g, e in zip(got, torch.tensor_split(x, torch.tensor([2, 4]), dim=1)):
        assert torch.equal(g, e)


def test_item_and_tolist_on_tensors_created_inside_vmap():
    """Constants made inside the function have one value for every example: .item(),
    .tolist(), float() and bool() on them need no per-example re-run (and no warning)."""
    import warnings

    def f(x):
        c, s = torch.tensor([2.0, 4.0]), torch.tensor(3.0)
        return x * s.item() + c.tolist()[1] + float(s) + (1 if bool(s > 2) else 0)

    X = torch.randn(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pf.vmap(f)(X)
        got2 = pf.vmap(pf.vmap(f))(X.reshape(3, 2, 1))
    assert torch.allclose(got, torch.stack([f(x) for x in X]))
    assert torch.allclose(got2, X.reshape(3, 2, 1) * 3 + 8)


def test_item_in_the_per_example_rerun_on_a_tensor_made_inside():
    """The per-example re-run gives tensors made inside the function a size-1 level; an
    .item() on one that was written with example data must answer, not raise again."""
    import warnings

    def f(x):
        acc = torch.zeros(())
        acc += x.sum()
        return x * acc.item()

    X = torch.randn(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = pf.vmap(f)(X)
    assert torch.allclose(got, torch.stack([f(x) for x in X]))


def test_view_as_complex_is_a_batched_view():
    x = torch.randn(3, 4, 2)
    with _no_fallback():
        got = pf.vmap(torch.view_as_complex)(x)
        moved = pf.vmap(torch.view_as_complex, in_dims=1)(x.transpose(0, 1).contiguous())
    assert torch.equal(got, torch.view_as_complex(x)) and torch.equal(moved, torch.view_as_complex(x))
    base = x.clone()
    pf.vmap(lambda a: torch.view_as_complex(a).mul_(2))(base)  # a view: the write reaches the input
    assert torch.equal(base, 2 * x)


def test_embedding_with_per_example_tables_refuses_an_out_of_range_index():
    """The batched lookup shifts each example's indices into one table of B*V rows: an
    out-of-range index must raise as in the loop, not read another example's row."""
    W = torch.randn(3, 5, 2)
    idx = torch.tensor([[0, 4], [1, 5], [2, 3]])  # 5 is out of range for a 5-row table
    with pytest.raises(IndexError, match="out of range"):
        torch.nn.functional.embedding(idx[1], W[1])
    with pytest.raises(IndexError, match="out of range"):
        pf.vmap(torch.nn.functional.embedding)(idx, W)
    with pytest.raises(IndexError, match="out of range"):
        pf.vmap(torch.nn.functional.embedding)(idx - 1, W)  # -1 too
    ok = idx.clamp(max=4)
    assert torch.equal(pf.vmap(torch.nn.functional.embedding)(ok, W),
                       torch.stack([torch.nn.functional.embedding(i, w) for i, w in zip(ok, W)]))


def test_vector_norm_of_0dim_complex_examples_is_real():
    """A 0-dim complex example's norm is real (dtype= names the input's computation dtype)."""
    X = torch.randn(3, dtype=torch.complex64)
    for ord_ in (2, 0, float("inf")):
        got = pf.vmap(lambda x: torch.linalg.vector_norm(x, ord_, dim=0, keepdim=True, dtype=torch.complex64))(X)
        want = torch.stack([torch.linalg.vector_norm(x, ord_, dim=0, keepdim=True, dtype=torch.complex64) for x in X])
        assert got.dtype == want.dtype == torch.float32
        assert torch.allclose(got, want)


def test_conj_and_neg_views_in_a_rules_own_arithmetic():
    """vmap's outermost level calls rules straight from __torch_dispatch__, whose exclude set
    switches off the Conjugate/Negative fallbacks: a rule's own mul/add on a lazy conj() or
    neg view then used the unconjugated values (silently wrong). Complex and neg-view
    arguments take the guarded path."""
    import warnings

    x = torch.randn(3, 4, dtype=torch.complex64)
    M, a, b = (torch.randn(3, 4, 5, dtype=torch.complex64), torch.randn(3, 4, 6, dtype=torch.complex64),
               torch.randn(3, 6, 5, dtype=torch.complex64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pf.vmap(lambda x: x.conj() * x + x.conj().imag)(x)
        got_mm = pf.vmap(lambda M, a, b: torch.addmm(M.conj(), a, b))(M, a, b)
        got_pinv = pf.vmap(torch.linalg.pinv)(M)
        neg = pf.vmap(torch._neg_view)(x)
    assert torch.allclose(got, torch.stack([v.conj() * v + v.conj().imag for v in x]), atol=1e-6)
    assert torch.allclose(got_mm, torch.stack([torch.addmm(m.conj(), p, q) for m, p, q in zip(M, a, b)]), atol=1e-5)
    assert torch.allclose(got_pinv, torch.stack([torch.linalg.pinv(m) for m in M]), atol=1e-5)
    assert neg.is_neg() and torch.equal(neg.resolve_neg(), -x)


def test_pytree_fast_path_equals_torch_pytree():
    # pyfunctorch._pytree flattens a tensor and short flat tuples/lists of tensors without
    # torch's pytree machinery: leaves, specs and round trips must be torch's
    import collections

    from torch.utils import _pytree as tp

    from pyfunctorch._pytree import tree_flatten, tree_unflatten

    x, y = torch.randn(2), torch.randn(3)
    Point = collections.namedtuple("Point", "a b")
    trees = [x, (x,), [x, y], (), [], (x, 1), (x, None), {"a": x}, (x, (y,)), Point(x, y), torch.Size([2, 3]),
             tuple([x] * 17), [x] * 16, 3, None, (torch.nn.Parameter(x),)]
    for t in trees:
        leaves, spec = tree_flatten(t)
        want_leaves, want_spec = tp.tree_flatten(t)
        assert len(leaves) == len(want_leaves) and all(a is b for a, b in zip(leaves, want_leaves)), t
        assert spec == want_spec, t
        back, want_back = tree_unflatten(leaves, spec), tp.tree_unflatten(want_leaves, want_spec)
        assert type(back) is type(want_back) and tp.tree_flatten(back)[1] == tp.tree_flatten(want_back)[1], t
    with pytest.raises((ValueError, TypeError)):
        tree_unflatten([x], tree_flatten((x, y))[1])  # wrong number of leaves: torch's error
