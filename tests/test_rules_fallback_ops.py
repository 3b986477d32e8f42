"""Batching rules for ops that used to run through the per-example loop fallback:
segment_reduce, embedding_renorm_ / embedding_bag (+ backward), pdist (+ backward), histc /
histogram / histogramdd, searchsorted with a batched sorter=, nonzero_static, and CPU flash
attention with a batched attn_mask=.

Oracle: the per-example loop (conftest.loop_vmap); every case also asserts that no op went
through the loop fallback."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import pyfunctorch as pf
from pyfunctorch import batched

from conftest import loop_vmap, no_fallback

aten = torch.ops.aten
B = 3




def same(got, want, exact=False, atol=None, rtol=None):
    """Same pytree, shapes and dtypes; values equal (``exact``) or close (NaN == NaN)."""
    g, gs = torch.utils._pytree.tree_flatten(got)
    w, ws = torch.utils._pytree.tree_flatten(want)
    assert gs == ws, (gs, ws)
    for a, e in zip(g, w):
        assert type(a) is torch.Tensor, f"a transform wrapper escaped: {type(a).__name__}"
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        if exact:
            assert torch.equal(a, e), (a, e)
        else:
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True)


def check(f, in_dims, *args, exact=False, atol=None, rtol=None):
    """pyfunctorch.vmap(f) == the per-example loop, with no loop fallback."""
    with no_fallback():
        got = pf.vmap(f, in_dims=in_dims)(*args)
    same(got, loop_vmap(f, in_dims=in_dims)(*args), exact, atol, rtol)
    return got


def check_nested(f, *args, exact=False):
    """vmap(vmap(f)) over the two leading dims of every argument == a double loop."""
    with no_fallback():
        got = pf.vmap(pf.vmap(f))(*args)
    same(got, loop_vmap(loop_vmap(f))(*args), exact)


def last(x):
    """``x`` with its batch dim (0) moved last, for in_dims=-1."""
    return x.movedim(0, -1).contiguous()


def pick(args, in_dims):
    """The arguments for ``in_dims``: example 0 where unbatched, the batch moved last for -1."""
    return [a[0] if d is None else (last(a) if d == -1 else a) for a, d in zip(args, in_dims)]


# -- segment_reduce -------------------------------------------------------------------------

DATA = torch.randn(B, 2, 5, 4, dtype=torch.float64)
LENGTHS = torch.tensor([[[2, 0, 3], [1, 4, 0]], [[5, 0, 0], [0, 0, 5]], [[1, 1, 3], [2, 2, 1]]])
OFFSETS = torch.cat([torch.zeros(B, 2, 1, dtype=torch.long), LENGTHS.cumsum(-1)], -1)


@pytest.mark.parametrize("reduce", ["sum", "max", "min", "mean", "prod"])
@pytest.mark.parametrize("kind", ["lengths", "offsets"])
def test_segment_reduce(reduce, kind):
    segs = LENGTHS if kind == "lengths" else OFFSETS
    for initial in (None, 2.0):
        for axis in (1, -2):
            def f(x, s):
                return aten.segment_reduce(x, reduce, **{kind: s}, axis=axis, initial=initial)

            for in_dims in [(0, 0), (0, None), (None, 0), (-1, -1)]:
                check(f, in_dims, *pick([DATA, segs], in_dims))
    check_nested(lambda x, s: aten.segment_reduce(x, reduce, **{kind: s}, axis=1),
                 DATA.expand(2, *DATA.shape), segs.expand(2, *segs.shape))


@pytest.mark.parametrize("reduce", ["sum", "max", "mean", "prod"])
def test_segment_reduce_per_sample_grads(reduce):
    def f(x, s):
        return pf.grad(lambda y: aten.segment_reduce(y, reduce, lengths=s, axis=1).square().sum())(x)

    check(f, (0, 0), DATA, LENGTHS)
    check(f, (0, None), DATA, LENGTHS[0])


# -- embedding_renorm_ / embedding_bag -------------------------------------------------------


def renorm(w, i, max_norm=1.0, p=2.0):
    w = w.clone()
    aten.embedding_renorm_(w, i, max_norm, p)
    return w


def test_embedding_renorm(device):
    w = torch.randn(B, 6, 4, device=device) * 2
    idx = torch.tensor([[0, 2, 2, -1], [5, 5, 1, 0], [3, 3, 3, 3]], device=device)  # duplicates, a negative index
    for p in (1.0, 2.0, float("inf")):
        for max_norm in (0.5, 10.0):
            f = lambda w, i: renorm(w, i, max_norm, p)  # noqa: E731
            check(f, (0, 0), w, idx)
            check(f, (0, None), w, idx[0])
            check(f, (-1, -1), last(w), last(idx))
    check(renorm, (0, 0), w, idx.reshape(B, 2, 2))
    check(renorm, (0, 0), w, idx[:, :0])
    check(lambda w, i: (F.embedding(i, w.clone(), max_norm=1.0)), (0, 0), w, idx.clamp(min=0))
    check_nested(renorm, torch.randn(2, B, 6, 4, device=device) * 2, torch.randint(0, 6, (2, B, 5), device=device))


def test_embedding_renorm_batched_indices_into_shared_table_raises(device):
    w, idx = torch.randn(6, 4, device=device) * 2, torch.randint(0, 6, (B, 3), device=device)
    with pytest.raises(pf.errors.BatchedWriteError):
        pf.vmap(renorm, in_dims=(None, 0))(w, idx)


V, D, L = 7, 4, 9
BAG_W = torch.randn(B, V, D, dtype=torch.float64)
BAG_I = torch.randint(0, V, (B, L))
BAG_I[:, 1] = 2  # a padding entry when padding_idx=2
BAG_O = torch.tensor([[0, 2, 2, 5], [0, 0, 4, 9], [0, 3, 6, 8]])  # empty bags too
BAG_P = torch.rand(B, L, dtype=torch.float64)


@pytest.mark.parametrize("op", [aten._embedding_bag_forward_only.default, aten._embedding_bag.default])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_embedding_bag_all_outputs(op, mode):
    # all four outputs (offset2bag, bag_size, max_indices too) exactly as per example, on the
    # kernel's fast and slow paths (float32 / float64, contiguous rows or not, padding or not)
    for dtype in (torch.float32, torch.float64):
        for pad in (-1, 2):
            for ilo in (False, True):
                offs = torch.cat([BAG_O, torch.full((B, 1), L)], 1) if ilo else BAG_O
                psw = BAG_P.to(dtype) if mode == 0 else None

                def f(w, i, o, p=None):
                    return op(w, i, o, False, mode, False, p, ilo, pad)

                args = [BAG_W.to(dtype), BAG_I, offs]
                # (-1, 0, 0): each example's table rows are strided, which takes the kernel off
                # its fast path. (Not the indices: the CPU kernel reads strided indices/offsets
                # as if they were contiguous, so the per-example oracle would be wrong.)
                for in_dims in [(0, 0, 0), (None, 0, 0), (0, None, None), (-1, 0, 0)]:
                    out = check(f, in_dims, *pick(args, in_dims), exact=dtype == torch.float64)
                    assert out[0].shape == (B, offs.shape[1] - ilo, D)
                if psw is not None:
                    check(f, (0, 0, 0, 0), *args, psw)
                    check(f, (-1, 0, 0, -1), last(args[0]), *args[1:], last(psw))
                    out = check(f, (0, 0, 0, -1), *args, last(psw))  # strided weights: off the fast path
                    assert out[1].shape == (B, L)


def test_embedding_bag_nested_and_functional():
    f = lambda w, i, o: aten._embedding_bag_forward_only(w, i, o, False, 2, False, None, False, -1)  # noqa: E731
    check_nested(f, BAG_W.expand(2, *BAG_W.shape), torch.randint(0, V, (2, B, L)), BAG_O.expand(2, B, 4), exact=True)
    check(lambda w, i: F.embedding_bag(i, w, mode="mean"), (0, 0), BAG_W, BAG_I.reshape(B, 3, 3))
    check(lambda w, i, o: F.embedding_bag(i, w, o, mode="max"), (None, 0, 0), BAG_W[0], BAG_I, BAG_O)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_per_sample_grads(mode):
    for pad in (None, 2):
        for sgbf in ((False, True) if mode != "max" else (False,)):
            use_p = mode == "sum"

            def f(w, i, o, p):
                def loss(w, p):
                    out = F.embedding_bag(i, w, o, mode=mode, padding_idx=pad, scale_grad_by_freq=sgbf,
                                          per_sample_weights=p if use_p else None)
                    return out.square().sum()

                return pf.grad(loss, argnums=(0, 1))(w, p)

            for in_dims in [(0, 0, 0, 0), (None, 0, 0, 0), (0, None, None, None), (-1, 0, 0, -1)]:
                check(f, in_dims, *pick([BAG_W, BAG_I, BAG_O, BAG_P], in_dims))


def test_embedding_bag_bad_offsets_raise():
    f = lambda w, i, o: aten._embedding_bag_forward_only(w, i, o, False, 0, False, None, False, -1)  # noqa: E731
    bad = BAG_O.clone()
    bad[1, 0] = 1
    with pytest.raises(RuntimeError, match=r"offsets\[0\]"):
        pf.vmap(f)(BAG_W, BAG_I, bad)
    idx = BAG_I.clone()
    idx[2, 0] = V
    with pytest.raises(IndexError):
        pf.vmap(f)(BAG_W, idx, BAG_O)


# -- pdist ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.0, float("inf")])
def test_pdist(device, p):
    x = torch.randn(B, 6, 4, dtype=torch.float64, device=device)
    x[:, 0] = x[:, -1]  # a zero distance
    f = lambda t: torch.pdist(t, p)  # noqa: E731
    check(f, (0,), x)
    check(f, (-1,), last(x))
    for n, m in [(1, 3), (2, 1), (3, 0)]:
        check(f, (0,), torch.randn(B, n, m, device=device))
    check(lambda t: pf.grad(lambda y: torch.pdist(y, p).square().sum())(t), (0,), x)
    _, vjp_fn = pf.vjp(f, x[0])
    check(vjp_fn, (0,), torch.randn(B, 15, dtype=torch.float64, device=device))
    check_nested(f, torch.randn(2, B, 5, 3, device=device))


# -- histc / histogram / histogramdd ------------------------------------------------------------


def hist_data(dtype):
    # values on bin edges, a constant example (its range widens), ties
    x = torch.randint(-20, 20, (B, 37)).to(dtype) / 3
    x[1] = 3.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_histc(dtype):
    x = hist_data(dtype)
    for bins in (1, 3, 10):
        for lo, hi in ((0, 0), (-2.5, 3.0), (1, 1)):
            check(lambda t: torch.histc(t, bins, lo, hi), (0,), x, exact=True)
    xn = x.clone()
    xn[2, 3], xn[0, 1] = float("nan"), float("inf")
    check(lambda t: torch.histc(t, 5, -1, 2), (0,), xn, exact=True)
    check(lambda t: torch.histc(t, 6), (-1,), last(x), exact=True)
    check(lambda t: torch.histc(t, 4), (0,), torch.randn(B, 0, dtype=dtype), exact=True)
    check_nested(lambda t: torch.histc(t, 6), torch.randn(2, B, 20, dtype=dtype), exact=True)


def test_histc_non_finite_data_range_raises(device):
    x = torch.randn(B, 5, device=device)
    x[1, 2] = float("inf")
    with pytest.raises(RuntimeError, match="not finite"):
        pf.vmap(lambda t: torch.histc(t, 3))(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_histogram(dtype):
    x, w = hist_data(dtype), torch.rand(B, 37, dtype=dtype)
    for bins in (1, 3, 10):
        check(lambda t: torch.histogram(t, bins), (0,), x, exact=True)
        check(lambda t: torch.histogram(t, bins, range=(-1.0, 2.0)), (0,), x, exact=True)
        check(lambda t, w: torch.histogram(t, bins, weight=w, density=True), (0, 0), x, w)
        check(lambda t, w: torch.histogram(t, bins, weight=w), (None, 0), x[0], w)
        edges = torch.sort(torch.randn(B, bins + 1, dtype=dtype) * 5, dim=1).values
        check(lambda t, e: torch.histogram(t, e), (0, 0), x, edges, exact=True)
        check(lambda t, e: torch.histogram(t, e), (0, None), x, edges[0], exact=True)
        check(lambda t, e: torch.histogram(t, e, density=True), (None, 0), x[0], edges)
    check(lambda t: torch.histogram(t, 6), (-1,), last(x), exact=True)
    check(lambda t: torch.histogram(t, 4), (0,), torch.randn(B, 0, dtype=dtype), exact=True)
    check_nested(lambda t: torch.histogram(t, 6), torch.randn(2, B, 20, dtype=dtype), exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_histogramdd(dtype):
    x = hist_data(dtype)[:, :36].reshape(B, 12, 3)
    w = torch.rand(B, 12, dtype=dtype)
    for bins in ([1, 2, 3], [4, 1, 2]):
        check(lambda t: torch.histogramdd(t, bins), (0,), x, exact=True)
        check(lambda t: torch.histogramdd(t, bins, range=[-1.0, 1.0, 0.0, 2.0, -3.0, 3.0]), (0,), x, exact=True)
        check(lambda t, w: torch.histogramdd(t, bins, weight=w, density=True), (0, 0), x, w)
        check(lambda t, w: torch.histogramdd(t, bins, weight=w), (None, 0), x[0], w)
        e = [torch.sort(torch.randn(B, n + 1, dtype=dtype) * 5, dim=1).values for n in bins]
        check(lambda t, a, b, c: torch.histogramdd(t, [a, b, c]), (0, 0, None, 0), x, e[0], e[1][0], e[2], exact=True)
    check(lambda t: torch.histogramdd(t, [2, 3]), (0,), torch.randn(B, 0, 2, dtype=dtype), exact=True)
    check_nested(lambda t: torch.histogramdd(t.reshape(10, 2), [3, 2]), torch.randn(2, B, 20, dtype=dtype), exact=True)


# -- searchsorted(sorter=), nonzero_static -----------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.searchsorted.*non-contiguous")  # (the loop's strided examples)
@pytest.mark.parametrize("kw", [{}, {"right": True}, {"side": "right"}, {"out_int32": True}])
def test_searchsorted_batched_sorter(device, kw):
    seq = torch.randn(B, 4, 7, device=device)
    srt = torch.argsort(seq, -1)
    v = torch.randn(B, 4, 5, device=device)

    def f(s, x, o):
        return torch.searchsorted(s, x, sorter=o, **kw)

    check(f, (0, 0, 0), seq, v, srt, exact=True)
    check(f, (0, None, 0), seq, v[0], srt, exact=True)
    check(f, (-1, -1, -1), last(seq), last(v), last(srt), exact=True)
    shared = torch.randn(4, 7, device=device)  # one sequence, per-example sorters (all sort it)
    check(f, (None, 0, 0), shared, v, torch.stack([torch.argsort(shared, -1)] * B), exact=True)
    s1 = torch.randn(B, 9, device=device)
    check(f, (0, 0, 0), s1, torch.randn(B, 4, device=device), torch.argsort(s1, -1), exact=True)
    check(lambda s, o: torch.searchsorted(s, 0.3, sorter=o, **kw), (0, 0), s1, torch.argsort(s1, -1), exact=True)
    s2 = torch.randn(2, B, 9, device=device)
    check_nested(f, s2, torch.randn(2, B, 4, device=device), torch.argsort(s2, -1), exact=True)


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 2), (3, 0, 2)])
def test_nonzero_static(device, shape):
    x = (torch.randn((B,) + shape, device=device) > 0.3).float()
    for size in (0, 1, 5, 30):
        for fill in (-1, 7):
            f = lambda t: torch.nonzero_static(t, size=size, fill_value=fill)  # noqa: E731
            check(f, (0,), x, exact=True)
            if shape:
                check(f, (-1,), last(x), exact=True)
    check_nested(lambda t: torch.nonzero_static(t, size=6), torch.randn((2, B) + shape, device=device) > 0, exact=True)


# -- CPU flash attention with a batched attn_mask ----------------------------------------------


@pytest.mark.parametrize("mshape", [(4, 5), (1, 1, 4, 5), (2, 3, 4, 5), (1, 3, 1, 5)])
@pytest.mark.parametrize("boolean", [False, True])
def test_sdpa_batched_mask(device, mshape, boolean):
    q, k, v = torch.randn(B, 2, 3, 4, 8, device=device), torch.randn(B, 2, 3, 5, 8, device=device), torch.randn(B, 2, 3, 5, 8, device=device)
    m = torch.randn((B,) + mshape, device=device)
    m = m > -0.5 if boolean else m

    def f(a, b, c, mask):
        return F.scaled_dot_product_attention(a, b, c, attn_mask=mask)

    for in_dims in [(0, 0, 0, 0), (None, None, None, 0), (0, None, 0, 0), (0, 0, 0, None), (-1, -1, -1, -1)]:
        check(f, in_dims, *pick([q, k, v, m], in_dims))
    if not boolean:
        def g(a, b, c, mask):
            return pf.grad(lambda a, b, c: f(a, b, c, mask).square().sum(), argnums=(0, 1, 2))(a, b, c)

        check(g, (0, 0, 0, 0), q, k, v, m, atol=1e-4, rtol=1e-4)
        check(g, (None, None, None, 0), q[0], k[0], v[0], m, atol=1e-4, rtol=1e-4)
    check_nested(f, *(t.expand(2, *t.shape) for t in (q, k, v)), m.expand(2, *m.shape))


# -- hash_tensor (a reduction over dim; [] means every dim) --------------------------------------


@pytest.mark.skipif(not hasattr(torch, "hash_tensor"), reason="torch without hash_tensor")
@pytest.mark.parametrize("kw", [{}, {"dim": 1}, {"dim": [0, 1], "keepdim": True}, {"dim": -1, "keepdim": True}], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_hash_tensor(device, kw, dtype):
    x = (torch.randn(B, 4, 5, device=device) * 100).to(dtype)
    check(lambda t: torch.hash_tensor(t, **kw), 0, x, exact=True)
    check(lambda t: torch.hash_tensor(t, **kw), 2, x.movedim(0, 2).contiguous(), exact=True)


def test_embedding_bag_out_of_range_index_raises_under_nested_vmap(device):
    """Per-example tables folded into one: an out-of-range index (here batched at the outer
    level, where the inner rule cannot read it) must raise, not read another example's row."""
    W = torch.randn(3, 5, 4, device=device)
    IDX = torch.tensor([[0, 2, 4, 1], [0, 2, 5, 1]], device=device)
    off = torch.tensor([0, 2], device=device)

    def f(i):
        return pf.vmap(lambda w: F.embedding_bag(i, w, off))(W)

    with pytest.raises((RuntimeError, IndexError)):
        pf.vmap(f)(IDX)
    ok = IDX.clamp(max=4)
    want = torch.stack([torch.stack([F.embedding_bag(i, w, off) for w in W]) for i in ok])
    same(pf.vmap(f)(ok), want)


def test_assert_async_checks_every_example(device):
    def f(x):
        torch._assert_async(x > 0, "positive")
        return x

    with no_fallback():
        pf.vmap(f)(torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(RuntimeError, match="positive"):
        pf.vmap(f)(torch.tensor([1.0, -2.0], device=device))


@pytest.mark.parametrize("fn", [lambda x: torch.histc(x, 5), lambda x: torch.histogram(x, 5)[0]],
                         ids=["histc", "histogram"])
def test_histogram_non_finite_range_raises_under_nested_vmap(device, fn):
    """The data batched at the outer level reaches the inner rule as wrappers it must not read:
    the finiteness check is a tensor assert (it used to be skipped: a silent wrong result)."""
    X = torch.randn(2, 3, 10, device=device)
    X[1, 2, 4] = float("inf")
    with pytest.raises(RuntimeError, match="not finite"):
        pf.vmap(lambda row: pf.vmap(fn)(row))(X)
    ok = torch.randn(2, 3, 10, device=device)
    with no_fallback():
        got = pf.vmap(lambda row: pf.vmap(fn)(row))(ok)
    same(got, torch.stack([torch.stack([fn(x) for x in r]) for r in ok]), exact=True)


def test_embedding_bag_bad_offsets_raise_under_nested_vmap(device):
    W = torch.randn(3, 5, 4, device=device)
    idx = torch.tensor([0, 2, 4, 1], device=device)

    def f(o):
        return pf.vmap(lambda w: F.embedding_bag(idx, w, o))(W)

    with pytest.raises(RuntimeError, match="offsets\\[0\\] has to be 0"):
        pf.vmap(f)(torch.tensor([[0, 2], [1, 2]], device=device))
    with pytest.raises(RuntimeError, match="can not be greater"):
        pf.vmap(f)(torch.tensor([[0, 2], [0, 5]], device=device))
    ok = torch.tensor([[0, 2], [0, 3]], device=device)
    same(pf.vmap(f)(ok), torch.stack([torch.stack([F.embedding_bag(idx, w, o) for w in W]) for o in ok]))
