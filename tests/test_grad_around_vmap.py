"""Differentiation *around* vmap (a batched loss, an ensemble trained through vmap): the level
outside differentiates what a batching rule computes on the physical batch, so a rule that is
right as a function but not as a derivative gives wrong gradients there. Found by the AD sweep's
vjp(vmap) kind (scripts/coverage.py --ad); each case here against torch.autograd through a loop
over the examples (vmap's definition). (Embedding with padding_idx: tests/test_per_sample_shadow.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyfunctorch as pf

from conftest import assert_close

DT = torch.float64
B = 3


def _loop_grads(f, xs, ct, in_dims):
    leaves = [x.clone().requires_grad_() for x in xs]
    outs = torch.stack([f(*[x[b] if d == 0 else x for x, d in zip(leaves, in_dims)]) for b in range(B)])
    return torch.autograd.grad(outs, leaves, ct)


def test_safe_softmax_of_fully_masked_rows(device):
    # aten._safe_softmax ran decomposed (softmax + where): the decomposition's softmax of an all
    # -inf row differentiated to nan where the kernel's formula gives 0
    x = torch.randn(B, 4, 5, dtype=DT, device=device)
    x[0, 1] = float("-inf")
    x[1, 2, :2] = float("-inf")

    def f(x):
        return torch.ops.aten._safe_softmax.default(x, -1)

    out, back = pf.vjp(pf.vmap(f), x)
    ct = torch.randn(out.shape, dtype=DT, device=device)
    (want,) = _loop_grads(f, [x], ct, (0,))
    assert_close(out, f(x))
    assert_close(back(ct)[0], want)


needs_lce = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13")


def _lce_options():
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    return LinearCrossEntropyOptions(allow_retain_graph=True, batch_chunk_size=2)


@needs_lce
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("in_dims", [(0, None), (0, 0)])
def test_linear_cross_entropy_with_chunking_options(reduction, in_dims, device):
    # its chunked path precomputes gradients in its forward and mutates them in its backward:
    # differentiated around vmap it gave wrong gradients (errors ~2). Under transforms
    # F.linear_cross_entropy runs its reference path.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 5, generator=g, dtype=DT).to(device)
    W = torch.randn(7, 5, generator=g, dtype=DT).to(device)
    if in_dims[1] == 0:
        W = W + 0.1 * torch.randn(B, 7, 5, generator=g, dtype=DT).to(device)
    t = torch.randint(0, 7, (4,), generator=g).to(device)
    opts = _lce_options()

    def f(x, W):
        return F.linear_cross_entropy(x, W, t, reduction=reduction, options=opts)

    out, back = pf.vjp(pf.vmap(f, in_dims=in_dims), x, W)
    ct = torch.randn(out.shape, generator=g, dtype=DT).to(device)
    assert_close(back(ct), _loop_grads(f, [x, W], ct, in_dims))
    # per-sample gradients and the per-example values as before
    grads = pf.vmap(pf.grad(lambda x, W: f(x, W).sum(), argnums=(0, 1)), in_dims=in_dims)(x, W)
    want = [torch.stack(z) for z in zip(*[_one_example_grads(f, x[b], W if in_dims[1] is None else W[b])
                                         for b in range(B)])]
    assert_close(grads, tuple(want))


def _one_example_grads(f, x, W):
    xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
    return torch.autograd.grad(f(xr, Wr).sum(), (xr, Wr))


@needs_lce
def test_chunked_linear_cross_entropy_ops_reached_directly_are_refused():
    # a reference to the function taken before the transform (op_db's, `from ... import`) reaches
    # the chunked custom ops: differentiated around vmap they are refused, never a wrong gradient
    original = F.linear_cross_entropy  # (taken outside a transform: torch's own function)
    x, W, t = torch.randn(B, 4, 5, dtype=DT), torch.randn(7, 5, dtype=DT), torch.randint(0, 7, (4,))
    opts = _lce_options()
    with pytest.raises(NotImplementedError, match="linear_cross_entropy with chunking options"):
        pf.grad(lambda x: pf.vmap(lambda xi: original(xi, W, t, options=opts))(x).sum())(x)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_bag_with_per_example_tables(mode, padding_idx, weighted, scale_grad_by_freq, device):
    # F.embedding_bag picks the forward-only kernel for the vmap level's wrappers (they do not
    # require grad); their physical values carry the derivative of the level around vmap, which
    # that kernel refused ("Autograd not support dtype: Long"). With scale_grad_by_freq the
    # folded call's gradient was not each example's (silently wrong, errors ~2).
    if weighted and mode != "sum":
        pytest.skip("per_sample_weights: mode='sum' only (torch)")
    if scale_grad_by_freq and mode == "max":
        pytest.skip("scale_grad_by_freq: not with mode='max' (torch)")
    g = torch.Generator().manual_seed(2)
    W = torch.randn(B, 10, 5, generator=g, dtype=DT).to(device)
    idx = torch.tensor([1, 2, 4, 5, 4, 2, 2, 9], device=device)
    off = torch.tensor([0, 4], device=device)
    psw = torch.rand(B, 8, generator=g, dtype=DT).to(device)

    def f(w, p):
        return F.embedding_bag(idx, w, off, mode=mode, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                               per_sample_weights=p if weighted else None).sin()

    out, back = pf.vjp(pf.vmap(f), W, psw)
    ct = torch.randn(out.shape, generator=g, dtype=DT).to(device)
    want = _loop_grads(f, [W, psw], ct, (0, 0)) if weighted else \
        (_loop_grads(lambda w: f(w, None), [W], ct, (0,))[0], torch.zeros_like(psw))
    assert_close(back(ct), want)


def test_batch_norm_of_one_input_with_per_example_affine(device):
    # the input shared by the examples, weight and bias batched, training mode with running
    # statistics: the rule normalizes once without affine parameters, and torch's derivative of
    # that call refuses weight=None (in plain torch too): explicit ones and zeros there
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 5, generator=g, dtype=DT).to(device)
    w = torch.randn(B, 3, generator=g, dtype=DT).to(device)
    b = torch.randn(B, 3, generator=g, dtype=DT).to(device)

    def f(x, w, b):
        rm, rv = torch.zeros(3, dtype=DT, device=device), torch.ones(3, dtype=DT, device=device)
        # (the op torch's export and compile paths use for training-mode batch norm)
        return torch.ops.aten._batch_norm_with_update.default(x, w, b, rm, rv, 0.1, 1e-5)[0].sin()

    out, back = pf.vjp(pf.vmap(f, in_dims=(None, 0, 0)), x, w, b)
    ct = torch.randn(out.shape, generator=g, dtype=DT).to(device)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(torch.stack([f(xr, wr[i], br[i]) for i in range(B)]), (xr, wr, br), ct)
    assert_close(back(ct), want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_with_an_example_whose_targets_are_all_ignored(reduction, device):
    # around vmap the nll_loss rule's own arithmetic gave inf / nan gradients for the example
    # whose targets are all ignored ('mean': 0 / 0); it now takes the kernel's gradient there too,
    # and forward-over-reverse (hessian) around vmap goes through its jvp
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 4, 5, generator=g, dtype=DT).to(device)
    t = torch.tensor([[1, -100, 2, 3], [-100, -100, -100, -100], [0, 4, -100, 1]], device=device)

    def f(xi, ti):
        return F.cross_entropy(xi, ti, reduction=reduction)

    def loss(x):
        return pf.vmap(f)(x, t).nan_to_num().square().sum()

    xr = x.clone().requires_grad_()
    total = torch.stack([f(xr[b], t[b]) for b in range(B)]).nan_to_num().square().sum()
    (want,) = torch.autograd.grad(total, xr, create_graph=True)
    assert_close(pf.grad(loss)(x), want)
    hess = torch.stack([torch.autograd.grad(gi, xr, retain_graph=True)[0] for gi in want.reshape(-1)])
    assert_close(pf.hessian(loss)(x), hess.reshape(x.shape + x.shape))
