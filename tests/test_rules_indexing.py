"""Batching rules of batching/indexing.py against oracles: the per-example loop (always) and
torch.func.vmap (where it supports the case and agrees with the loop)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.func as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyfunctorch
from pyfunctorch import batched
from pyfunctorch.batching import factories, indexing, reductions

aten = torch.ops.aten
B = 3

#: every op that has a rule in indexing.py, or in the files its histc/histogram and new_* rules moved to
_MODULES = {indexing.__name__, factories.__name__, reductions.__name__}
RULE_OPS = {op for op, fn in pyfunctorch.batching.BATCH_RULES.items() if fn.__module__ in _MODULES}


@contextlib.contextmanager
def no_fallback():
    """No loop fallback for an op of indexing.py. (The warning fires only once per op per
    process, so watch the fallback counters too; fallbacks of other files' ops are not
    this file's business.)"""
    before = dict(batched.FALLBACK_COUNTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pyfunctorch.PerformanceWarning)
        yield
    grown = {op for op, n in batched.FALLBACK_COUNTS.items() if n > before.get(op, 0)}
    assert not (grown & RULE_OPS), f"loop fallback used for {grown & RULE_OPS}"
    for w in caught:
        if issubclass(w.category, pyfunctorch.PerformanceWarning):
            assert not any(str(op) in str(w.message) for op in RULE_OPS), str(w.message)


def loop(f, in_dims, args):
    """The per-example oracle: stack f over the examples."""
    in_dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    n = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = [f(*[a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)]) for b in range(n)]
    return torch.stack(outs)


def check(f, in_dims, *args, func=True, atol=1e-5):
    """pyfunctorch.vmap(f) == loop; and == torch.func.vmap(f) unless func=False."""
    with no_fallback():
        got = pyfunctorch.vmap(f, in_dims=in_dims)(*args)
    exp = loop(f, in_dims, args)
    torch.testing.assert_close(got, exp, atol=atol, rtol=1e-5)
    if func:
        torch.testing.assert_close(tf.vmap(f, in_dims=in_dims)(*args), got, atol=atol, rtol=1e-5)
    return got


def check_inplace(f, in_dims, *args, func=False):
    """An in-place op on a clone of the first argument: batched data written into an unbatched
    clone must raise; otherwise as check()."""
    if in_dims[0] is None:
        with pytest.raises(RuntimeError, match="not batched"):
            pyfunctorch.vmap(f, in_dims=in_dims)(*args)
        return
    check(f, in_dims, *args, func=func)


def bdim_last(x):
    """x with its batch dim (dim 0) moved last: for in_dims=-1."""
    return x.movedim(0, -1).contiguous()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- aten.index --------------------------------------------------------------------------

X = torch.randn(B, 4, 5, 6)
I3 = torch.tensor([0, 2, -1])


@pytest.mark.parametrize("key", [
    lambda i: (i,),
    lambda i: (slice(None), i),
    lambda i: (slice(None), slice(None), i),
    lambda i: (i, slice(None), i[:2] if i.dim() == 1 else i),  # separated: result dims first
    lambda i: (slice(None), i, i),
    lambda i: (Ellipsis, i),
    lambda i: (i, None, slice(1, 3)),
])
@pytest.mark.parametrize("who", ["self", "index", "both"])
def test_index_int(key, who):
    x = X
    i = torch.randint(-4, 4, (B, 2))
    if who == "self":
        i0 = i[0]
        check(lambda x: x[key(i0)], 0, x)
    elif who == "index":
        check(lambda x, i: x[key(i)], (None, 0), x[0], i)
    else:
        check(lambda x, i: x[key(i)], (0, 0), x, i)


def test_index_broadcasting_indices():
    x = X
    rows = torch.randint(0, 4, (B, 3, 1))
    cols = torch.randint(0, 5, (2,))
    check(lambda x, r: x[r, cols], (0, 0), x, rows)
    check(lambda x, r: x[:, :, r[..., 0] % 6], (0, 0), x, rows)  # adjacent at dim 2
    check(lambda x, r: x[r, :, cols], (None, 0), x[0], rows)  # separated
    check(lambda x, r: x[:, r % 5, cols[:, None, None]], (0, 0), x, rows)  # rank-3 broadcast


def test_index_scalar_and_high_rank_indices():
    x = X
    # 0-d index per example (aten.index: Python's x[i] turns a 0-d index into .item())
    check(lambda x, i: aten.index.Tensor(x, [None, i]), (0, 0), x, torch.tensor([1, 3, -2]))
    check(lambda x, i: x[:, i], (None, 0), x[0], torch.randint(0, 5, (B, 2, 2, 2)))
    check(lambda x, i: x[i, 1:, i], (0, 0), x, torch.randint(0, 4, (B, 2, 3)))


def test_index_nonzero_in_dims():
    x = bdim_last(X)
    i = torch.randint(0, 5, (2, B))
    check(lambda x, i: x[:, i], (-1, 1), x, i)
    check(lambda x, i: x[i % 4, :, I3[:2]], (3, None), x, i[:, 0])


def test_index_bool_masks():
    x = X
    m = torch.rand(4, 5) > 0.5
    check(lambda x: x[m], 0, x)
    check(lambda x: x[:, m[0]], 0, x)
    check(lambda x: x[m[:, 0], :, I3[:1]], 0, x)
    check(lambda x, i: x[m[:, 0], i], (0, 0), x, torch.randint(0, 5, (B, 1)))


def test_index_batched_bool_mask_equal_counts():
    mb = torch.zeros(B, 5, dtype=torch.bool)
    for b in range(B):
        mb[b, torch.randperm(5)[:2]] = True
    # torch.func does not batch boolean masks at all
    check(lambda x, m: x[:, m], (0, 0), X, mb, func=False)
    check(lambda x, m: x[m], (None, 0), X[0, 0], mb, func=False)
    m2 = torch.zeros(B, 4, 5, dtype=torch.bool)
    for b in range(B):
        m2[b].view(-1)[torch.randperm(20)[:3]] = True
    check(lambda x, m: x[m], (0, 0), X, m2, func=False)


def test_index_batched_bool_mask_unequal_counts():
    # ragged per-example results: strict=True errors, else vmap re-runs per example
    mb = torch.zeros(B, 5, dtype=torch.bool)
    mb[0, 0] = True
    mb[2, 1:] = True
    f = lambda x, m: x[:, m]  # noqa: E731
    with pytest.raises(pyfunctorch.DataDependentError):
        pyfunctorch.vmap(f, strict=True)(X, mb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyfunctorch.PerformanceWarning)
        out = pyfunctorch.vmap(f)(X, mb)
    for b, part in enumerate(out.unbind()):
        torch.testing.assert_close(part, f(X[b], mb[b]))
    # inside an inner vmap, the signal reaches the inner level, which re-runs per example
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyfunctorch.PerformanceWarning)
        out = pyfunctorch.vmap(lambda x: pyfunctorch.vmap(lambda m: f(x, m).sum())(mb))(X)
    torch.testing.assert_close(out, torch.stack([torch.stack([f(X[a], mb[b]).sum() for b in range(B)])
                                                 for a in range(B)]))


def test_index_nested_vmap(device):
    x = torch.randn(2, B, 5, 4, device=device)
    i = torch.randint(0, 5, (2, B, 3), device=device)
    f = lambda x, i: x[i, 1:]  # noqa: E731
    with no_fallback():
        got = pyfunctorch.vmap(pyfunctorch.vmap(f, in_dims=(0, 0)), in_dims=(0, 0))(x, i)
    torch.testing.assert_close(got, tf.vmap(tf.vmap(f))(x, i))
    with no_fallback():
        got = pyfunctorch.vmap(pyfunctorch.vmap(f, in_dims=(None, 0)), in_dims=(0, None))(x[:, 0], i[0])
    torch.testing.assert_close(got, tf.vmap(tf.vmap(f, in_dims=(None, 0)), in_dims=(0, None))(x[:, 0], i[0]))


# hypothesis: random index lists (slices, int tensors of broadcastable shapes, bool masks)
# on a random self; any subset of them batched.

@st.composite
def index_cases(draw):
    r = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=r, max_size=r))
    bshape = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    entries = []
    d = 0
    while d < r:
        kind = draw(st.sampled_from(["none", "int", "int", "mask"]))
        if kind == "mask" and d + 1 < r and draw(st.booleans()):
            entries.append(("mask", 2, draw(st.booleans())))
            d += 2
            continue
        if kind == "mask":
            entries.append(("mask", 1, draw(st.booleans())))
        elif kind == "int":
            # a shape that broadcasts to bshape: drop leading dims, set some to 1
            k = draw(st.integers(0, len(bshape)))
            ishape = [s if draw(st.booleans()) else 1 for s in bshape[len(bshape) - k:]]
            entries.append(("int", ishape, draw(st.booleans())))
        else:
            entries.append(("none",))
        d += 1
    cut = draw(st.integers(1, len(entries)))  # trailing entries may be left out
    entries = entries[:cut]
    # at most one mask; its element count broadcasts with the int indices only if their
    # last dim is 1
    masks = [j for j, e in enumerate(entries) if e[0] == "mask"]
    for j in masks[1:]:
        entries[j] = ("none",)
    if masks:
        entries = [("int", e[1][:-1] + [1], e[2]) if e[0] == "int" and e[1] else e for e in entries]
    if all(e[0] == "none" for e in entries):
        entries[0] = ("int", [], True)
    return shape, entries, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def _build(shape, entries, self_batched, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([B] + shape if self_batched else shape, generator=g)
    idx, idims, d = [], [], 0
    for e in entries:
        if e[0] == "none":
            idx.append(None)
            idims.append(None)
            d += 1
        elif e[0] == "int":
            n = shape[d]
            s = ([B] if e[2] else []) + list(e[1])
            idx.append(torch.randint(-n, n, s, generator=g))
            idims.append(0 if e[2] else None)
            d += 1
        else:
            k, batched_ = e[1], e[2]
            mshape = shape[d:d + k]
            numel = 1
            for s in mshape:
                numel *= s
            c = int(torch.randint(0, numel + 1, (), generator=g))
            rows = []
            for _ in range(B if batched_ else 1):  # equal counts per example
                m = torch.zeros(numel, dtype=torch.bool)
                m[torch.randperm(numel, generator=g)[:c]] = True
                rows.append(m.reshape(mshape))
            idx.append(torch.stack(rows) if batched_ else rows[0])
            idims.append(0 if batched_ else None)
            d += k
    return x, idx, idims


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(index_cases())
def test_index_hypothesis(case):
    shape, entries, self_batched, seed = case
    x, idx, idims = _build(shape, entries, self_batched, seed)
    if not self_batched and all(d is None for d in idims):
        x = x.unsqueeze(0).expand((B,) + x.shape).contiguous()
        self_batched = True
    tensors = [t for t in idx if t is not None]
    tdims = [d for t, d in zip(idx, idims) if t is not None]
    where = [i for i, t in enumerate(idx) if t is not None]

    def f(x, *ts):
        ind = list(idx)
        for w, t in zip(where, ts):
            ind[w] = t
        return aten.index.Tensor(x, ind)

    in_dims = (0 if self_batched else None, *tdims)
    check(f, in_dims, x, *tensors, func=False)

    # index_put with accumulate (duplicates allowed) and values of the per-example result
    # shape, batched; and the same through a constant scalar value without accumulate
    per = loop(f, in_dims, (x, *tensors))
    vals = torch.randn(per.shape)

    def g(x, v, *ts):
        ind = list(idx)
        for w, t in zip(where, ts):
            ind[w] = t
        return aten.index_put.default(x, ind, v, True)

    check(g, (in_dims[0], 0, *tdims), x, vals, *tensors, func=False)

    def h(x, *ts):
        ind = list(idx)
        for w, t in zip(where, ts):
            ind[w] = t
        return aten.index_put.default(x, ind, torch.tensor(7.0))

    check(h, in_dims, x, *tensors, func=False)


# -- index_put -------------------------------------------------------------------------


@pytest.mark.parametrize("acc", [False, True])
def test_index_put_cases(acc):
    x = X
    ip = lambda x, ind, v: aten.index_put.default(x, ind, v, acc)  # noqa: E731
    perm = torch.stack([torch.randperm(4)[:2] for _ in range(B)])  # unique per example
    check(lambda x, i, v: ip(x, [i], v), (0, 0, 0), x, perm, torch.randn(B, 2, 5, 6))
    check(lambda x, i, v: ip(x, [None, i], v), (None, 0, 0), x[0], perm, torch.randn(B, 6))  # values broadcast
    check(lambda x, i, v: ip(x, [i, None, I3[:2]], v), (0, 0, 0), x, perm, torch.randn(B, 2, 5))
    check(lambda x, i, v: ip(x, [None, i, I3[:2]], v), (0, 0, None), x, perm, torch.randn(4, 2))
    check(lambda x, v: ip(x, [I3, None, I3], v), (0, 0), x, torch.randn(B, 3, 5))  # separated, no batched index
    check(lambda x, v: ip(x, [I3, None, I3], v), (0, None), x, torch.randn(3, 5))
    check(lambda x, v: ip(x, [None, I3[:2]], v), (None, 0), x[0], torch.randn(B, 4, 2, 6))  # only values batched
    check(lambda x, v: ip(x, [I3[:2]], v), (None, 0), x[0], torch.randn(B, 5, 6))


def test_index_put_mask_and_nonzero_in_dims():
    x = X
    m = torch.rand(4, 5) > 0.5
    check(lambda x, v: aten.index_put.default(x, [m], v), (-1, 0), bdim_last(x), torch.randn(B, 6), func=False)
    m6 = torch.tensor([True, False, True, True, False, False])
    check(lambda x, v: aten.index_put.default(x, [None, None, m6], v, True), (0, 1), x, torch.randn(4, B, 5, 1))


def test_index_put_inplace_and_setitem():
    x = X
    perm = torch.stack([torch.randperm(5)[:2] for _ in range(B)])

    def f(x, i, v):
        y = x.clone()
        y[:, i] = v
        return y

    # torch.func mis-shapes the values of this setitem (batched index after a slice)
    check(f, (0, 0, 0), x, perm, torch.randn(B, 4, 2, 6), func=False)
    check(f, (0, None, 0), x, perm[0], torch.randn(B, 4, 2, 6))

    def g(x, i, v):
        y = x.clone()
        aten._index_put_impl_.default(y, [None, i], v, True, False)
        return y

    check(g, (0, 0, 0), x, perm, torch.randn(B, 4, 2, 6), func=False)

    def h(x, i, v):
        y = x.clone()
        y.index_put_((i,), v, accumulate=True)
        return y

    check(h, (0, 0, None), x, perm % 4, torch.randn(5, 6))
    check(h, (-1, 1, None), bdim_last(x), (perm % 4).T.contiguous(), torch.randn(5, 6))  # batch dim not in front


def test_index_put_inplace_into_unbatched_raises():
    x = X[0].clone()

    def f(v):
        return x.index_put_((I3,), v)

    with pytest.raises(RuntimeError, match="not batched"):
        pyfunctorch.vmap(f)(torch.randn(B, 5, 6))


# -- gather / scatter ------------------------------------------------------------------


G = torch.randn(B, 4, 5)
GI = torch.randint(0, 5, (B, 4, 3))


@pytest.mark.parametrize("in_dims", [(0, 0), (None, 0), (0, None)])
def test_gather(in_dims):
    x = G if in_dims[0] == 0 else G[0]
    i = GI if in_dims[1] == 0 else GI[0]
    check(lambda x, i: x.gather(1, i), in_dims, x, i)
    check(lambda x, i: x.gather(-1, i), in_dims, x, i)
    check(lambda x, i: torch.gather(x, 0, i % 4), in_dims, x, i)
    check(lambda x, i: torch.take_along_dim(x, i, dim=1), in_dims, x, i)


def test_gather_scalar_and_nonzero_in_dims():
    check(lambda x, i: x.gather(0, i), (0, 0), torch.randn(B), torch.zeros(B, dtype=torch.long))
    check(lambda x, i: x.gather(1, i), (2, 1), G.permute(1, 2, 0), GI.permute(1, 0, 2))


@pytest.mark.parametrize("variant", ["src", "value", "add", "reduce_add", "sr_amax", "sr_mean", "sr_prod"])
@pytest.mark.parametrize("in_dims", [(0, 0, 0), (None, 0, 0), (0, None, 0), (0, 0, None), (None, None, 0),
                                     (None, 0, None), (0, None, None)])
def test_scatter(variant, in_dims):
    x = G if in_dims[0] == 0 else G[0]
    # unique indices along dim 1 for the non-accumulating forms
    i = torch.stack([torch.stack([torch.randperm(5)[:3] for _ in range(4)]) for _ in range(B)])
    i = i if in_dims[1] == 0 else i[0]
    s = torch.randn(B, 4, 3) if in_dims[2] == 0 else torch.randn(4, 3)
    fs = {
        "src": lambda x, i, s: x.scatter(1, i, s),
        "value": lambda x, i, s: x.scatter(-1, i, 2.5) + s.sum(),
        "add": lambda x, i, s: x.scatter_add(1, i % 2, s),
        "reduce_add": lambda x, i, s: x.scatter(1, i % 2, s, reduce="add"),
        "sr_amax": lambda x, i, s: x.scatter_reduce(1, i % 2, s, "amax", include_self=False),
        "sr_mean": lambda x, i, s: x.scatter_reduce(1, i % 2, s, "mean"),
        "sr_prod": lambda x, i, s: x.scatter_reduce(1, i % 2, s, "prod"),
    }
    check(fs[variant], in_dims, x, i, s)


def test_scatter_inplace():
    i = GI % 5

    def f(x, i, s):
        y = x.clone()
        y.scatter_(1, i, s, reduce="add")
        y.scatter_add_(0, i % 4, s)
        y.scatter_reduce_(1, i, s, "amin")
        return y.scatter_(1, i[:, :1], 0.5)

    check(f, (0, 0, 0), G, i, torch.randn(B, 4, 3), func=False)  # torch.func warns on scatter reduce=
    check(f, (1, None, 0), G.transpose(0, 1), i[0], torch.randn(B, 4, 3), func=False)
    y = G[0].clone()
    with pytest.raises(RuntimeError, match="not batched"):
        pyfunctorch.vmap(lambda s: y.scatter_add_(1, i[0], s))(torch.randn(B, 4, 3))


def test_scatter_scalar_self(device):
    check(lambda x, s: x.scatter(0, torch.tensor(0, device=device), s), (0, 0), torch.randn(B, device=device), torch.randn(B, device=device))


# -- index_select / index_add / index_copy / index_fill / index_reduce ------------------


@pytest.mark.parametrize("in_dims", [(0, 0), (None, 0), (0, None), (-1, -1)])
def test_index_select(in_dims):
    x = X if in_dims[0] is not None else X[0]
    i = torch.randint(0, 5, (B, 4)) if in_dims[1] is not None else torch.tensor([4, 0, 0, 2])
    if in_dims == (-1, -1):
        x, i = bdim_last(x), i.T.contiguous()
    check(lambda x, i: x.index_select(1, i), in_dims, x, i)
    check(lambda x, i: torch.index_select(x, -2, i), in_dims, x, i)


def test_index_select_zero_dim():
    # torch.func gets a batched 0-d index wrong (keeps the whole dim): loop only
    check(lambda x, i: x.index_select(0, i), (None, 0), X[0], torch.tensor([1, 0, 3]), func=False)
    check(lambda x, i: x.index_select(0, i), (0, None), torch.randn(B), torch.tensor([0]))


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (None, 0, 0), (0, None, 0), (0, 0, None), (None, 0, None),
                                     (None, None, 0), (0, None, None)])
def test_index_add_copy_reduce(in_dims):
    x = X if in_dims[0] == 0 else X[0]
    uniq = torch.stack([torch.randperm(5)[:3] for _ in range(B)])
    i = uniq if in_dims[1] == 0 else uniq[0]
    s = torch.randn(B, 4, 3, 6) if in_dims[2] == 0 else torch.randn(4, 3, 6)
    check(lambda x, i, s: x.index_add(1, i, s), in_dims, x, i, s)
    check(lambda x, i, s: x.index_add(-2, i % 2, s, alpha=-1.5), in_dims, x, i, s)
    check(lambda x, i, s: x.index_copy(1, i, s), in_dims, x, i, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # index_reduce is "beta"
        for red in ["prod", "mean", "amax", "amin"]:
            check(lambda x, i, s: x.index_reduce(1, i % 2, s, red), in_dims, x, i, s)
            check(lambda x, i, s: x.index_reduce(1, i, s, red, include_self=False), in_dims, x, i, s)


def test_index_add_inplace_and_scalar():
    uniq = torch.stack([torch.randperm(5)[:3] for _ in range(B)])

    def f(x, i, s):
        y = x.clone()
        y.index_add_(1, i, s)
        y.index_copy_(1, i, 2 * s)
        return y

    check(f, (0, 0, 0), X, uniq, torch.randn(B, 4, 3, 6))
    check(f, (0, None, 0), X, uniq[0], torch.randn(B, 4, 3, 6))
    check(lambda x, s: x.index_add(0, torch.tensor([0]), s), (0, 0), torch.randn(B), torch.randn(B))
    with pytest.raises(RuntimeError, match="not batched"):
        pyfunctorch.vmap(lambda s: X[0].index_add_(1, uniq[0], s))(torch.randn(B, 4, 3, 6))


@pytest.mark.parametrize("in_dims", [(0, 0, None), (None, 0, None), (0, None, None), (0, None, 0), (None, None, 0),
                                     (0, 0, 0), (None, 0, 0)])
def test_index_fill(in_dims):
    x = X if in_dims[0] == 0 else X[0]
    i = torch.randint(0, 5, (B, 2)) if in_dims[1] == 0 else torch.tensor([4, 1])
    v = torch.randn(B) if in_dims[2] == 0 else torch.tensor(-3.0)
    # torch.func gets an unbatched self with a batched fill value wrong
    check(lambda x, i, v: x.index_fill(1, i, v), in_dims, x, i, v, func=in_dims[0] is not None or in_dims[2] is None)
    check(lambda x, i, v: x.index_fill(1, i, 2.0) * v, in_dims, x, i, v)

    def inplace(x, i, v):
        y = x.clone()
        return y.index_fill_(-2, i, v)

    check_inplace(inplace, in_dims, x, i, v)


def test_index_fill_negative_batched_index():
    # torch.func ignores index_fill's wrapping of negative indices when the index is batched
    i = torch.tensor([[-1, -3], [-5, -2], [0, -4]])
    check(lambda x, i: x.index_fill(1, i, -1.0), (0, 0), X, i, func=False)


# -- masked_scatter / take / put ----------------------------------------------------------


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (None, 0, 0), (0, None, 0), (0, 0, None), (0, None, None),
                                     (None, 0, None), (None, None, 0)])
def test_masked_scatter(in_dims):
    x = G if in_dims[0] == 0 else G[0]
    m = torch.rand(B, 4, 5) > 0.5 if in_dims[1] == 0 else torch.rand(4, 5) > 0.5
    s = torch.randn(B, 20) if in_dims[2] == 0 else torch.randn(4, 5)
    # torch.func has no batched masked_scatter for a batched mask: loop only there
    check(lambda x, m, s: x.masked_scatter(m, s), in_dims, x, m, s, func=in_dims[1] is None)

    def inplace(x, m, s):
        return x.clone().masked_scatter_(m, s)

    check_inplace(inplace, in_dims, x, m, s)


def test_masked_scatter_broadcast_mask(device):
    check(lambda x, m, s: x.masked_scatter(m, s), (0, 0, 0), torch.randn(B, 4, 1, device=device), torch.rand(B, 5, device=device) > 0.3,
          torch.randn(B, 20, device=device), func=False)


@pytest.mark.parametrize("in_dims", [(0, 0), (None, 0), (0, None)])
def test_take_put(in_dims):
    x = G if in_dims[0] == 0 else G[0]
    uniq = torch.stack([torch.randperm(20)[:6] - 10 for _ in range(B)]).reshape(B, 2, 3)
    i = uniq if in_dims[1] == 0 else uniq[0]
    check(lambda x, i: x.take(i), in_dims, x, i)
    check(lambda x, i: x.put(i, torch.ones(2, 3)), in_dims, x, i, func=False)
    check(lambda x, i: x.put(i % 3, torch.arange(6.0).reshape(3, 2), accumulate=True), in_dims, x, i, func=False)
    i0 = torch.tensor(-3)
    check(lambda x: x.take(i0), 0, G)  # 0-d index

    def put_(x, i):
        return x.clone().put_(i, -torch.ones(6))

    check_inplace(put_, in_dims, x, i)


# -- searchsorted / bucketize / histc ----------------------------------------------------


SEQ = torch.randn(B, 7).sort(-1).values
VALS = torch.randn(B, 4, 3)


@pytest.mark.parametrize("in_dims", [(0, 0), (None, 0), (0, None)])
def test_searchsorted_bucketize(in_dims):
    s = SEQ if in_dims[0] == 0 else SEQ[0]
    v = VALS if in_dims[1] == 0 else VALS[0]
    check(lambda s, v: torch.searchsorted(s, v), in_dims, s, v)
    check(lambda s, v: torch.searchsorted(s, v, right=True, out_int32=True), in_dims, s, v)
    check(lambda s, v: torch.searchsorted(s, v, side="right"), in_dims, s, v)
    check(lambda s, v: torch.bucketize(v, s), in_dims, s, v)
    check(lambda s, v: torch.bucketize(v, s, right=True), in_dims, s, v)
    check(lambda s, v: torch.bucketize(v[0, 0], s), in_dims, s, v)  # 0-d values


def test_searchsorted_nd_scalar_sorter():
    seq = SEQ.unsqueeze(1).expand(B, 4, 7).contiguous()
    check(lambda s, v: torch.searchsorted(s, v), (0, 0), seq, VALS)
    check(lambda s, v: torch.searchsorted(s, v), (0, None), seq, VALS[0])
    check(lambda s: torch.searchsorted(s, 0.25), 0, SEQ)
    check(lambda s: torch.bucketize(0.25, s, right=True), 0, SEQ, func=False)
    # (a batched sorter is a kwarg: the dispatcher sends that call to the loop fallback)
    unsorted = torch.randn(B, 7)
    sorter = unsorted.argsort(-1)
    check(lambda s: torch.searchsorted(s, VALS[0], sorter=sorter[0]), 0, unsorted, func=False)


def test_histc(device):
    x = torch.randn(B, 40, device=device)
    x[1] = (x[1] * 4).round() / 4  # values on bin edges
    x[2] = 1.0  # constant: the range is widened by one on both sides
    check(lambda x: torch.histc(x, 7), 0, x, func=False)
    check(lambda x: torch.histc(x, bins=5, min=-1, max=1), 0, x, func=False)
    check(lambda x: torch.histc(x, bins=4, min=1, max=1), 1, x.T.contiguous(), func=False)


# -- backward and *_scatter forms of views, new_* ---------------------------------------


def test_view_backward_ops(device):
    # grads shaped like the forward view of a (4, 5, 6) input
    x = torch.zeros(4, 5, 6, device=device)

    def g_like(view):
        return torch.randn((B,) + view.shape, device=device)

    check(lambda g: aten.select_backward.default(g, [4, 5, 6], 1, -1), 0, g_like(x.select(1, -1)))
    check(lambda g: aten.slice_backward.default(g, [4, 5, 6], -3, 1, 4, 2), 0, g_like(x[1:4:2]))
    check(lambda g: aten.diagonal_backward.default(g, [4, 5, 6], 1, -1, 0), 0, g_like(x.diagonal(1, -1, 0)))
    check(lambda g: aten.unfold_backward.default(g, [4, 5, 6], -1, 2, 2), 0, g_like(x.unfold(-1, 2, 2)))
    check(lambda g: aten.unfold_backward.default(g, [4, 5, 6], 1, 3, 1), 0, g_like(x.unfold(1, 3, 1)))


@pytest.mark.parametrize("in_dims", [(0, 0), (None, 0), (0, None)])
def test_scatter_view_ops(in_dims):
    x = X if in_dims[0] == 0 else X[0]
    pick = lambda t: t if in_dims[1] == 0 else t[0]  # noqa: E731
    check(lambda x, s: torch.select_scatter(x, s, 1, -2), in_dims, x, pick(torch.randn(B, 4, 6)))
    check(lambda x, s: torch.slice_scatter(x, s, dim=-1, start=1, step=2), in_dims, x, pick(torch.randn(B, 4, 5, 3)))
    check(lambda x, s: torch.slice_scatter(x, s), in_dims, x, pick(torch.randn(B, 4, 5, 6)))
    check(lambda x, s: torch.diagonal_scatter(x, s, 1, 1, 2), in_dims, x, pick(torch.randn(B, 4, 5)))

    # as_strided's offset is absolute (in the example's storage, where the example starts
    # at its own offset): the oracle is the loop over the examples themselves
    def f(x, s):
        return torch.as_strided_scatter(x, s, (2, 3), (6, 2), 1)

    s = pick(torch.randn(B, 2, 3))
    with no_fallback():
        got = pyfunctorch.vmap(f, in_dims=in_dims)(x, s)
    exp = torch.stack([f(x[b] if in_dims[0] == 0 else x, s[b] if in_dims[1] == 0 else s) for b in range(B)])
    torch.testing.assert_close(got, exp)  # (torch.func has no rule for as_strided_scatter)


def test_new_factories():
    # one fresh tensor per example (torch internals write batched data into them)
    check(lambda x: aten.new_zeros.default(x, [2, 3]), 0, X)
    check(lambda x: aten.new_ones.default(x, [2], dtype=torch.float64), 0, X)
    check(lambda x: aten.new_full.default(x, [2], 7.0), 0, X)
    check(lambda x: x.new_zeros(5, 6) + x[0], 0, X)

    def shapes(x):
        e, s = aten.new_empty.default(x, [2]), aten.new_empty_strided.default(x, [2, 3], [1, 2])
        assert e.shape == (2,) and s.shape == (2, 3) and s.stride() == (1, 2)
        return s.copy_(x[0, :2, :3])

    check(shapes, 0, X, func=False)


@pytest.mark.parametrize("in_dims", [(0, 0), (None, 0), (0, None)])
def test_new_zeros_with_same_feature_meta(device, in_dims):
    x = torch.randn(B, 4, 5, device=device) if in_dims[0] == 0 else torch.randn(4, 5, device=device)
    o = torch.randn(B, 5, 3, device=device).transpose(1, 2) if in_dims[1] == 0 else torch.randn(5, 3, device=device).t()

    def f(x, o):
        out = aten._new_zeros_with_same_feature_meta.default(x, o, self_num_batch_dims=1)
        assert out.shape == (4, 3, 5) and out.stride()[1:] == (1, 3)  # (dim 0: per storage size)
        return out

    check(f, in_dims, x, o, func=False)


# -- through grad / jacrev / jacfwd -----------------------------------------------------------


def _grad_check(f, in_dims, *args, func_vmap=True):
    with no_fallback():
        got = pyfunctorch.vmap(pyfunctorch.grad(f), in_dims=in_dims)(*args)
    torch.testing.assert_close(got, loop(tf.grad(f), in_dims, args), atol=1e-5, rtol=1e-5)
    if func_vmap:
        torch.testing.assert_close(got, tf.vmap(tf.grad(f), in_dims=in_dims)(*args), atol=1e-5, rtol=1e-5)


def test_vmap_grad_indexing_losses():
    x = X
    i = torch.randint(0, 5, (B, 3))
    _grad_check(lambda x: x[I3].sin().sum(), 0, x)
    _grad_check(lambda x, i: x[:, i, I3[:1]].sin().sum(), (0, 0), x, i)
    _grad_check(lambda x, i: x[i, :, i % 6].pow(2).sum(), (0, 0), x, i % 4)
    _grad_check(lambda x: x[1:3, ::2, 1].sin().sum() + x.diagonal(0, 1, 2).cos().sum(), 0, x)
    _grad_check(lambda x: x.unfold(-1, 2, 2).sin().sum(), 0, x)
    _grad_check(lambda x, i: x.index_select(1, i).sin().sum(), (0, 0), x, i)
    _grad_check(lambda x, i: x.take(i).exp().sum(), (0, 0), x, i)
    m = torch.rand(4, 5) > 0.5
    _grad_check(lambda x: x[m].sin().sum(), 0, x)


def test_vmap_grad_gather_scatter_losses():
    logits = torch.randn(B, 4, 5)
    target = torch.randint(0, 5, (B, 4, 1))

    def nll(logits, target):
        return -logits.log_softmax(-1).gather(-1, target).mean()

    _grad_check(nll, (0, 0), logits, target)
    _grad_check(nll, (0, None), logits, target[0])

    def seg_sum(x, seg):
        out = torch.zeros(3, 5).scatter_add(0, seg, x)
        return (out ** 2).sum()

    seg = torch.randint(0, 3, (B, 4, 5))
    _grad_check(seg_sum, (0, 0), logits, seg)
    _grad_check(lambda x, i: x.index_add(1, i, x[:, :3] * 2).pow(2).sum(), (0, 0), logits, torch.randint(0, 5, (B, 3)))
    _grad_check(lambda x: x.index_put((I3,), x[:3] * 3, accumulate=True).pow(2).sum(), 0, logits)
    _grad_check(lambda x: x.masked_scatter(x > 0, x * 2).sin().sum(), 0, logits, func_vmap=False)


def test_jacrev_jacfwd_through_indexing(device):
    x = torch.randn(4, 5, device=device)
    i = torch.tensor([[0, 3], [2, 2]], device=device)

    def f(x):
        y = x[i, 1:] * 2 + x.gather(1, torch.tensor([[4], [0], [1], [1]], device=device)).sum()
        z = torch.zeros(3, 4, device=device).scatter_add(0, torch.tensor([[0, 1, 2, 0]], device=device), x[1:2, :4])
        return y.sum(-1).reshape(-1).sin() + z.sum() + x.index_select(1, torch.tensor([4, 0], device=device))[:, 0].sum()

    for jac_ours, jac_ref in [(pyfunctorch.jacrev, tf.jacrev), (pyfunctorch.jacfwd, tf.jacfwd)]:
        with no_fallback():
            got = jac_ours(f)(x)
        torch.testing.assert_close(got, jac_ref(f)(x), atol=1e-5, rtol=1e-5)
    # batched over examples too
    xs = torch.randn(B, 4, 5, device=device)
    with no_fallback():
        got = pyfunctorch.vmap(pyfunctorch.jacrev(f))(xs)
    torch.testing.assert_close(got, loop(tf.jacrev(f), 0, (xs,)), atol=1e-5, rtol=1e-5)
    with no_fallback():
        got = pyfunctorch.vmap(pyfunctorch.jacfwd(f))(xs)
    torch.testing.assert_close(got, loop(tf.jacfwd(f), 0, (xs,)), atol=1e-5, rtol=1e-5)


def test_hessian_of_gather_loss(device):
    x = torch.randn(6, device=device)
    idx = torch.tensor([0, 5, 2, 2], device=device)

    def f(x):
        return (x.gather(0, idx) ** 3).sum() + x[idx[:2]].prod()

    with no_fallback():
        got = pyfunctorch.hessian(f)(x)
    torch.testing.assert_close(got, tf.hessian(f)(x), atol=1e-5, rtol=1e-5)


def test_grad_of_vmap_through_rules(device):
    # vmap inside grad: the rules run on grad-level wrappers and must stay differentiable
    x = torch.randn(B, 4, 5, device=device)
    i = torch.randint(0, 5, (B, 3), device=device)
    m = torch.rand(B, 4, 5, device=device) > 0.5

    def per_example(x, i, m):
        y = x[:, i] * 2 + x.gather(1, i.expand(4, 3)).cos()
        z = x.index_put((i[:2] % 4, i[1:]), y[0, :2], accumulate=True)
        z = z.scatter_add(1, i.expand(4, 3), y).index_add(1, i, y * 3)
        z = z.masked_scatter(m, x.exp()).index_fill(1, i[:1], 0.5)
        return (z.take(i) ** 2).sum() + x.index_select(1, i).sin().sum()

    def loss(vmap_, x):
        return vmap_(per_example)(x, i, m).sum()

    with no_fallback():
        got = pyfunctorch.grad(lambda x: loss(pyfunctorch.vmap, x))(x)
    exp = torch.stack([tf.grad(per_example)(x[b], i[b], m[b]) for b in range(B)])
    torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-5)
    with no_fallback():
        got = pyfunctorch.jacfwd(lambda x: pyfunctorch.vmap(per_example)(x, i, m))(x)
    torch.testing.assert_close(got, tf.jacfwd(lambda x: torch.stack([per_example(x[b], i[b], m[b]) for b in range(B)]))(x),
                               atol=1e-4, rtol=1e-5)


def test_int32_indices():
    i = torch.randint(0, 5, (B, 2), dtype=torch.int32)
    check(lambda x, i: x[:, i], (0, 0), X, i)
    check(lambda x, i: x[I3, :, i[:1]], (0, 0), X, i, func=False)
    check(lambda x, i: aten.index_put.default(x, [None, i], torch.tensor(1.0), True), (0, 0), X, i)
