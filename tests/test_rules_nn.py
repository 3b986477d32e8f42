"""Batching rules for neural-network ops (batching/convolution.py, normalization.py, embedding.py, losses.py, attention.py, recurrent.py) against oracles.

Oracles: the per-example Python loop (``loop_vmap``), torch.func.vmap where it supports
the case, and per-example ``torch.autograd.grad`` for per-sample gradients. Every check
also asserts that the op ran through a rule or an exact decomposition, never through the
per-example loop fallback.
"""

from __future__ import annotations


import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import pyfunctorch as pf

from conftest import assert_close, loop_vmap, no_fallback

DT = torch.float64
aten = torch.ops.aten
B = 3




def check_vmap(f, args, in_dims=0, *, func_oracle=True, atol=None, rtol=None):
    """pyfunctorch.vmap(f) == the per-example loop (and torch.func.vmap when it can)."""
    with no_fallback():
        got = pf.vmap(f, in_dims=in_dims)(*args)
    assert_close(got, loop_vmap(f, in_dims=in_dims)(*args), atol=atol, rtol=rtol)
    if func_oracle:
        assert_close(got, tf.vmap(f, in_dims=in_dims)(*args), atol=atol, rtol=rtol)
    return got


def per_sample_grads(loss, args, in_dims, argnums=0, check=True):
    """vmap(grad(loss)) against a loop of torch.autograd.grad over the examples (with
    ``check=False``: only the loop's result)."""
    if check:
        with no_fallback():
            got = pf.vmap(pf.grad(loss, argnums=argnums), in_dims=in_dims)(*args)
    nums = (argnums,) if isinstance(argnums, int) else argnums
    n = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = []
    for b in range(n):
        ex = [a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]
        ex = [a.detach().clone().requires_grad_(i in nums) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for i, a in enumerate(ex)]
        gs = torch.autograd.grad(loss(*ex), [ex[i] for i in nums])
        outs.append(gs[0] if isinstance(argnums, int) else tuple(gs))
    if isinstance(argnums, int):
        want = torch.stack(outs)
    else:
        want = tuple(torch.stack(c) for c in zip(*outs))
    if not check:
        return want
    assert_close(got, want)
    return got


def r(*shape, dtype=DT):
    return torch.randn(*shape, dtype=dtype)


# ----------------------------------------------------------------------------------------
# convolution
# ----------------------------------------------------------------------------------------

_CONV = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d), 3: (F.conv3d, F.conv_transpose3d)}


def _conv_setup(nd, transposed, groups):
    C, O, S = 4, 6 if not transposed else 4, {1: 7, 2: 5, 3: 4}[nd]
    x = r(B, 2, C, *(S,) * nd)
    if transposed:
        w = r(B, C, O // groups, *(2,) * nd)
        f = lambda x, w, b: _CONV[nd][1](x, w, b, stride=2, padding=1, output_padding=1, groups=groups)  # noqa: E731
    else:
        w = r(B, O, C // groups, *(2,) * nd)
        f = lambda x, w, b: _CONV[nd][0](x, w, b, stride=1, padding=1, dilation=2 if nd < 3 else 1, groups=groups)  # noqa: E731
    bias = r(B, O)
    return f, x, w, bias


_CONV_IN_DIMS = {
    "input": (0, None, None),
    "weight": (None, 0, 0),
    "both": (0, 0, 0),
    "bias": (None, None, 0),
    "input_and_bias": (0, None, 0),
}


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("which", list(_CONV_IN_DIMS))
def test_convolution(nd, transposed, groups, which):
    f, x, w, bias = _conv_setup(nd, transposed, groups)
    in_dims = _CONV_IN_DIMS[which]
    args = [x if in_dims[0] == 0 else x[0], w if in_dims[1] == 0 else w[0], bias if in_dims[2] == 0 else bias[0]]
    check_vmap(f, args, in_dims)


@pytest.mark.parametrize("transposed", [False, True])
def test_convolution_nonzero_in_dims_and_no_n_dim(transposed):
    f, x, w, bias = _conv_setup(2, transposed, 2)
    # batch dims elsewhere than 0
    check_vmap(f, (x.movedim(0, 2), w.movedim(0, 1), bias.movedim(0, 1)), (2, 1, 1))
    check_vmap(f, (x.movedim(0, 3), w[0], bias[0]), (3, None, None))
    # a logical input without the N dim: (C, H, W) per example
    xs = x[:, 0]
    check_vmap(f, (xs, w[0], bias[0]), (0, None, None))
    check_vmap(f, (xs, w, bias), (0, 0, 0))
    check_vmap(f, (xs[0], w, bias[0]), (None, 0, None))
    check_vmap(lambda x, w: f(x, w, None), (xs, w), (0, 0))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_convolution_per_sample_grads(nd, transposed, groups):
    f, x, w, bias = _conv_setup(nd, transposed, groups)
    loss = lambda x, w, b: f(x, w, b).tanh().pow(2).sum()  # noqa: E731
    # per-sample gradients: input batched, parameters shared
    per_sample_grads(loss, (x, w[0], bias[0]), (0, None, None), argnums=(0, 1, 2))
    # model ensembling: parameters batched, input shared
    per_sample_grads(loss, (x[0], w, bias), (None, 0, 0), argnums=(0, 1, 2))
    # everything batched; input gradient only
    per_sample_grads(loss, (x, w, bias), (0, 0, 0), argnums=0)


def test_convolution_backward_no_n_dim_and_bias_only():
    f, x, w, bias = _conv_setup(2, False, 1)
    loss = lambda x, w, b: f(x, w, b).sin().sum()  # noqa: E731
    per_sample_grads(loss, (x[:, 0], w[0], bias[0]), (0, None, None), argnums=(0, 1, 2))
    per_sample_grads(loss, (x[:, 0], w[0], bias[0]), (0, None, None), argnums=(0, 2))
    per_sample_grads(loss, (x[:, 0], w, bias[0]), (0, 0, None), argnums=(1, 2))


def test_convolution_vmap_of_jacrev_and_jvp():
    x, w = r(B, 1, 2, 5, 5), r(3, 2, 3, 3)
    f = lambda x, w: F.conv2d(x, w, padding=1).tanh()  # noqa: E731
    with no_fallback():
        got = pf.vmap(pf.jacrev(f, argnums=(0, 1)), in_dims=(0, None))(x, w)
    assert_close(got, tf.vmap(tf.jacrev(f, argnums=(0, 1)), in_dims=(0, None))(x, w))
    t = r(B, 1, 2, 5, 5)
    jv = lambda x, t: pf.jvp(lambda x: f(x, w), (x,), (t,))  # noqa: E731
    with no_fallback():
        got = pf.vmap(jv)(x, t)
    assert_close(got, tf.vmap(lambda x, t: tf.jvp(lambda x: f(x, w), (x,), (t,)))(x, t))
    # grad over vmap: the rule runs on the grad level's tensors
    with no_fallback():
        gw = pf.grad(lambda w: pf.vmap(f, in_dims=(0, None))(x, w).pow(2).sum())(w)
    wr = w.clone().requires_grad_()
    assert_close(gw, torch.autograd.grad(sum(f(xb, wr).pow(2).sum() for xb in x), wr)[0])


# ----------------------------------------------------------------------------------------
# pooling, padding, upsampling, pixel shuffle, unfold/fold
# ----------------------------------------------------------------------------------------

_SPATIAL = [
    # (name, fn, per-example input shape)
    ("max_pool1d", lambda x: F.max_pool1d(x, 2), (2, 3, 8)),
    ("max_pool2d", lambda x: F.max_pool2d(x, 3, stride=2, padding=1), (2, 3, 7, 6)),
    ("max_pool2d_noN", lambda x: F.max_pool2d(x, 2), (3, 6, 6)),
    ("max_pool2d_dilated_ceil", lambda x: F.max_pool2d(x, 2, dilation=2, ceil_mode=True), (2, 3, 7, 7)),
    ("max_pool3d", lambda x: F.max_pool3d(x, 2), (2, 2, 4, 4, 4)),
    ("max_pool3d_noN", lambda x: F.max_pool3d(x, 2), (2, 4, 4, 4)),
    ("avg_pool1d", lambda x: F.avg_pool1d(x, 3, stride=2, padding=1), (2, 3, 8)),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False), (2, 3, 7, 6)),
    ("avg_pool2d_noN_divisor", lambda x: F.avg_pool2d(x, 2, divisor_override=3), (3, 6, 6)),
    ("avg_pool3d", lambda x: F.avg_pool3d(x, 2, ceil_mode=True), (2, 2, 5, 4, 4)),
    ("adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 3), (2, 3, 8)),
    ("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), (2, 3, 7, 6)),
    ("adaptive_avg_pool2d_noN", lambda x: F.adaptive_avg_pool2d(x, 3), (3, 7, 6)),
    ("adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(x, 2), (2, 2, 5, 4, 4)),
    ("adaptive_max_pool1d", lambda x: F.adaptive_max_pool1d(x, 3), (2, 3, 8)),
    ("adaptive_max_pool2d", lambda x: F.adaptive_max_pool2d(x, (3, 2)), (2, 3, 7, 6)),
    ("adaptive_max_pool3d", lambda x: F.adaptive_max_pool3d(x, 2), (2, 2, 5, 4, 4)),
    ("max_unpool2d", lambda x: F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2), (2, 3, 6, 6)),
    ("reflect_pad1d", lambda x: F.pad(x, (2, 1), mode="reflect"), (2, 3, 6)),
    ("reflect_pad1d_noN", lambda x: F.pad(x, (2, 1), mode="reflect"), (3, 6)),
    ("reflect_pad2d", lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect"), (2, 3, 5, 6)),
    ("reflect_pad3d", lambda x: F.pad(x, (1, 1, 1, 0, 0, 1), mode="reflect"), (2, 2, 3, 4, 4)),
    ("replicate_pad1d", lambda x: F.pad(x, (2, 1), mode="replicate"), (2, 3, 6)),
    ("replicate_pad2d", lambda x: F.pad(x, (2, 1, 1, 2), mode="replicate"), (2, 3, 5, 6)),
    ("replicate_pad3d_noN", lambda x: F.pad(x, (1, 1, 1, 0, 0, 1), mode="replicate"), (2, 3, 4, 4)),
    ("constant_pad", lambda x: F.pad(x, (2, 1, 0, 3), value=1.5), (2, 3, 5, 6)),
    ("circular_pad1d", lambda x: F.pad(x, (2, 3), mode="circular"), (2, 3, 6)),
    ("circular_pad2d", lambda x: F.pad(x, (2, 1, 1, 2), mode="circular"), (2, 3, 5, 6)),
    ("circular_pad2d_crop", lambda x: F.pad(x, (-1, 2, 1, -2), mode="circular"), (3, 5, 6)),
    ("circular_pad3d", lambda x: F.pad(x, (1, 1, 0, 2, 1, 0), mode="circular"), (2, 2, 3, 4, 4)),
    ("circular_conv", lambda x: torch.nn.functional.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"),
                                                           torch.ones(2, 3, 3, 3, dtype=DT)), (2, 3, 5, 6)),
    ("nearest1d", lambda x: F.interpolate(x, scale_factor=2), (2, 3, 5)),
    ("nearest2d", lambda x: F.interpolate(x, size=(7, 5)), (2, 3, 5, 4)),
    ("nearest3d", lambda x: F.interpolate(x, scale_factor=2), (2, 2, 3, 3, 3)),
    ("nearest_exact2d", lambda x: F.interpolate(x, size=(7, 5), mode="nearest-exact"), (2, 3, 5, 4)),
    ("linear1d", lambda x: F.interpolate(x, scale_factor=1.5, mode="linear"), (2, 3, 5)),
    ("bilinear2d", lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), (2, 3, 5, 4)),
    ("bilinear2d_ac", lambda x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True), (2, 3, 5, 4)),
    ("bilinear2d_aa", lambda x: F.interpolate(x, size=(3, 2), mode="bilinear", antialias=True), (2, 3, 5, 4)),
    ("bicubic2d", lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"), (2, 3, 5, 4)),
    ("trilinear3d", lambda x: F.interpolate(x, scale_factor=2, mode="trilinear"), (2, 2, 3, 3, 3)),
    ("pixel_shuffle", lambda x: F.pixel_shuffle(x, 2), (2, 8, 3, 3)),
    ("pixel_shuffle_noN", lambda x: F.pixel_shuffle(x, 2), (8, 3, 3)),
    ("pixel_unshuffle", lambda x: F.pixel_unshuffle(x, 2), (2, 2, 4, 6)),
    ("unfold", lambda x: F.unfold(x, 2, dilation=1, padding=1, stride=2), (2, 3, 5, 6)),
    ("unfold_noN", lambda x: F.unfold(x, 3), (3, 5, 6)),
    ("fold", lambda x: F.fold(x, (4, 5), 2), (2, 12, 12)),
    ("fold_noN", lambda x: F.fold(x, (4, 5), 2), (12, 12)),
]


@pytest.mark.parametrize("name,fn,shape", _SPATIAL, ids=[s[0] for s in _SPATIAL])
def test_spatial_ops(name, fn, shape):
    x = r(B, *shape)
    check_vmap(fn, (x,), 0)
    check_vmap(fn, (x.movedim(0, -1),), -1, func_oracle=False)
    per_sample_grads(lambda x: fn(x).pow(2).sum() if not name.startswith("max_unpool") else fn(x).sum(), (x,), (0,))


def test_pooling_backward_with_only_grad_output_batched():
    # vmap over vjp: the cotangent is batched, the saved input/indices are not
    x = r(2, 3, 6, 6)
    for fn in [lambda x: F.max_pool2d(x, 2), lambda x: F.avg_pool2d(x, 2), lambda x: F.adaptive_max_pool2d(x, 2),
               lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect")]:
        with no_fallback():
            got = pf.jacrev(fn)(x)
        assert_close(got, tf.jacrev(fn)(x))


# ----------------------------------------------------------------------------------------
# normalization
# ----------------------------------------------------------------------------------------


def _param_variants(batched_shape):
    p = r(B, *batched_shape)
    return {"none": (None, None), "shared": (p[0], None), "batched": (p, 0)}


@pytest.mark.parametrize("wmode", ["none", "shared", "batched"])
@pytest.mark.parametrize("bmode", ["none", "shared", "batched"])
def test_layer_norm(wmode, bmode):
    x = r(B, 2, 3, 4)
    (w, wd), (b, bd) = _param_variants((3, 4))[wmode], _param_variants((3, 4))[bmode]
    f = lambda x, w, b: F.layer_norm(x, (3, 4), w, b)  # noqa: E731
    check_vmap(f, (x, w, b), (0, wd, bd))
    if wd is not None or bd is not None:
        check_vmap(f, (x[0], w, b), (None, wd, bd))
    loss = lambda x, w, b: f(x, w, b).sin().sum()  # noqa: E731
    nums = tuple(i for i, t in enumerate((x, w, b)) if t is not None)
    per_sample_grads(loss, (x, w, b), (0, wd, bd), argnums=nums)
    # the whole example normalized (no leading dims)
    check_vmap(lambda x, w, b: F.layer_norm(x, (2, 3, 4), None if w is None else w.expand(2, 3, 4),
                                            None if b is None else b.expand(2, 3, 4)), (x, w, b), (0, wd, bd))


@pytest.mark.parametrize("wmode", ["none", "shared", "batched"])
@pytest.mark.parametrize("bmode", ["none", "shared", "batched"])
def test_group_norm(wmode, bmode):
    x = r(B, 2, 6, 3, 2)
    (w, wd), (b, bd) = _param_variants((6,))[wmode], _param_variants((6,))[bmode]
    f = lambda x, w, b: F.group_norm(x, 3, w, b)  # noqa: E731
    check_vmap(f, (x, w, b), (0, wd, bd))
    check_vmap(f, (x.movedim(0, -1), w, b), (-1, wd, bd))  # the kernel needs a contiguous input
    check_vmap(f, (x[:, :0], w, b), (0, wd, bd), func_oracle=False)  # N = 0
    check_vmap(lambda x, w, b: F.group_norm(x, 2, w, b), (x[:, :, :, 0, 0], w, b), (0, wd, bd))  # no spatial dims
    if wd is not None or bd is not None:
        check_vmap(f, (x[0], w, b), (None, wd, bd))
    loss = lambda x, w, b: f(x, w, b).sin().sum()  # noqa: E731
    nums = tuple(i for i, t in enumerate((x, w, b)) if t is not None)
    if w is None and b is not None:
        # torch's own group_norm backward fails for a bias without a weight ("tensor does not have
        # a device"): give the per-example oracle a weight of ones, which changes no gradient
        with no_fallback():
            got = pf.vmap(pf.grad(loss, argnums=nums), in_dims=(0, wd, bd))(x, w, b)
        want = per_sample_grads(lambda x, w, b: F.group_norm(x, 3, torch.ones(6, dtype=DT), b).sin().sum(),
                                (x, w, b), (0, wd, bd), argnums=nums, check=False)
        assert_close(got, want)
        return
    per_sample_grads(loss, (x, w, b), (0, wd, bd), argnums=nums)


@pytest.mark.parametrize("wmode", ["none", "shared", "batched"])
def test_batch_norm_training_without_running_stats(wmode):
    x = r(B, 4, 3, 5)
    (w, wd), (b, bd) = _param_variants((3,))[wmode], _param_variants((3,))[wmode]
    f = lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    check_vmap(f, (x, w, b), (0, wd, bd))
    check_vmap(f, (x.movedim(0, 2), w, b), (2, wd, bd))
    check_vmap(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (x[..., 0], w, b), (0, wd, bd))
    if wd is not None:
        check_vmap(f, (x[0], w, b), (None, wd, bd))
    loss = lambda x, w, b: f(x, w, b).sin().sum()  # noqa: E731
    nums = tuple(i for i, t in enumerate((x, w, b)) if t is not None)
    per_sample_grads(loss, (x, w, b), (0, wd, bd), argnums=nums)


def test_batch_norm_eval_running_stats():
    x, rm, rv = r(B, 4, 3, 5), r(B, 3), r(B, 3).exp()
    w, b = r(3), r(3)
    f = lambda x, rm, rv: F.batch_norm(x, rm, rv, w, b, training=False)  # noqa: E731
    for in_dims, args in [((0, None, None), (x, rm[0], rv[0])), ((0, 0, 0), (x, rm, rv)),
                          ((None, 0, 0), (x[0], rm, rv)), ((0, 0, None), (x, rm, rv[0]))]:
        check_vmap(f, args, in_dims)
        if in_dims[0] == 0:
            per_sample_grads(lambda x, rm, rv: f(x, rm, rv).sin().sum(), args, in_dims)


def test_batch_norm_training_batched_running_stats_update_in_place():
    x = r(B, 4, 3, 5)
    w = r(3)
    rm, rv = r(B, 3), r(B, 3).exp()
    f = lambda x, rm, rv: F.batch_norm(x, rm, rv, w, None, training=True, momentum=0.3)  # noqa: E731
    rm_loop, rv_loop = rm.clone(), rv.clone()
    want = loop_vmap(f)(x, rm_loop, rv_loop)
    for in_dims, (rm_in, rv_in) in [(0, (rm.clone(), rv.clone())), ((0, 1, 1), (rm.clone().t(), rv.clone().t()))]:
        with no_fallback():
            got = pf.vmap(f, in_dims=in_dims)(x, rm_in, rv_in)
        assert_close(got, want)
        rm_got, rv_got = (rm_in, rv_in) if in_dims == 0 else (rm_in.t(), rv_in.t())
        assert_close(rm_got, rm_loop)
        assert_close(rv_got, rv_loop)


def test_batch_norm_training_shared_running_stats():
    """Unbatched running stats in training mode follow the per-example loop: the loop updates
    them once per example, in order, each with that example's own statistics."""
    x, w = r(B, 4, 3, 5), r(B, 3)
    fresh = lambda: (r(3), r(3).exp())  # noqa: E731
    rm0, rv0 = fresh()
    for momentum in (0.1, 0.7):
        for in_dims, args in [((0, None), (x, w[0])), ((None, 0), (x[0], w)), ((0, 0), (x, w))]:
            rm, rv = rm0.clone(), rv0.clone()
            f = lambda x, w: F.batch_norm(x, rm, rv, w, None, training=True, momentum=momentum)  # noqa: E731
            with no_fallback():
                got = pf.vmap(f, in_dims=in_dims)(*args)
            got_stats = (rm.clone(), rv.clone())
            rm, rv = rm0.clone(), rv0.clone()
            want = loop_vmap(f, in_dims=in_dims)(*args)
            assert_close(got, want)
            assert_close(got_stats, (rm, rv))
            # and the gradients (for the affine-only case the backward sees a batched
            # grad_output with everything else shared)
            per_sample_grads(lambda x, w: f(x, w).sin().sum(), args, in_dims, argnums=(0, 1))
    # under two vmap levels that both batch the input there is no single sequence: an error
    rm, rv = rm0.clone(), rv0.clone()
    f = lambda x: F.batch_norm(x, rm, rv, None, None, training=True)  # noqa: E731
    with pytest.raises(RuntimeError, match="not batched, under two vmap levels.*track_running_stats=False"):
        pf.vmap(pf.vmap(f))(r(2, B, 4, 3))
    assert_close((rm, rv), (rm0, rv0))


def test_batch_norm_module_per_sample_grads():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3, track_running_stats=False),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, t = r(B, 4, 2, 6, 6), torch.randint(0, 5, (B, 4))

    def loss(p, x, t):
        return F.cross_entropy(pf.functional_call(model, p, (x,)), t)

    with no_fallback():
        got = pf.vmap(pf.grad(loss), in_dims=(None, 0, 0))(params, x, t)
    for b in range(B):
        model.zero_grad()
        F.cross_entropy(model(x[b]), t[b]).backward()
        for k, p in model.named_parameters():
            assert_close(got[k][b], p.grad)


@pytest.mark.parametrize("op_name", ["native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                                     "_native_batch_norm_legit_no_training", "_native_batch_norm_legit.no_stats",
                                     "_batch_norm_with_update", "_batch_norm_with_update_functional",
                                     "_batch_norm_no_update"])
def test_batch_norm_aten_variants(op_name):
    packet, _, overload = op_name.partition(".")
    op = getattr(getattr(aten, packet), overload or "default")
    x, w, b, rm, rv = r(B, 4, 3, 2), r(B, 3), r(3), r(B, 3), r(B, 3).exp()
    schema = [a.name for a in op._schema.arguments]

    def f(x, w, rm, rv):
        kw = dict(input=x, weight=w, bias=b, running_mean=rm, running_var=rv, training=True, momentum=0.2, eps=1e-5)
        return op(*[kw[n] for n in schema])

    loop_stats = (rm.clone(), rv.clone())
    want = loop_vmap(f)(x, w, *loop_stats)
    stats = (rm.clone(), rv.clone())
    with no_fallback():
        got = pf.vmap(f)(x, w, *stats)
    assert_close(got, want)
    assert_close(stats, loop_stats)  # in-place updates of batched running stats
    if "running_mean" in schema:
        # unbatched running stats: read-only and functional variants leave them alone; the
        # in-place variants update them as the per-example loop does (once per example)
        ro = (rm[0].clone(), rv[0].clone())
        loop_ro = tuple(t.clone() for t in ro)
        want = loop_vmap(f, in_dims=(0, 0, None, None))(x, w, *loop_ro)
        with no_fallback():
            got = pf.vmap(f, in_dims=(0, 0, None, None))(x, w, *ro)
        assert_close(got, want)
        assert_close(ro, loop_ro)


@pytest.mark.parametrize("op", [aten.native_batch_norm_backward.default, aten.batch_norm_backward.default])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_backward_aten(op, train):
    x, go, w = r(B, 4, 3, 2), r(B, 4, 3, 2), r(B, 3)
    rm, rv = r(3), r(3).exp()

    def f(go, x, w):
        stats = (None, None) if train else (rm, rv)  # training reads no running stats
        _, sm, si = aten.native_batch_norm(x, w, None, *stats, train, 0.1, 1e-5)
        args = [go, x, w, rm, rv, sm, si, train, 1e-5, [True, True, True]]
        if op is aten.batch_norm_backward.default:
            args.append(torch.empty(0, dtype=torch.uint8))
        return op(*args)

    for in_dims in [(0, 0, 0), (0, None, None), (0, 0, None), (None, None, 0)]:
        args = [t if d == 0 else t[0] for t, d in zip((go, x, w), in_dims)]
        check_vmap(f, args, in_dims, func_oracle=False)


# ----------------------------------------------------------------------------------------
# embedding
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding(padding_idx, scale_grad_by_freq):
    W, idx = r(B, 7, 4), torch.randint(0, 7, (B, 2, 5))
    idx[:, 0, :2] = 2  # repeated indices, and the padding row
    f = lambda idx, w: F.embedding(idx, w, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)  # noqa: E731
    check_vmap(f, (idx, W[0]), (0, None))
    check_vmap(f, (idx[0], W), (None, 0))
    check_vmap(f, (idx, W), (0, 0))
    check_vmap(f, (idx.movedim(0, 2), W.movedim(0, 1)), (2, 1))
    loss = lambda w, idx: f(idx, w).sin().sum()  # noqa: E731
    per_sample_grads(loss, (W[0], idx), (None, 0))  # per-sample grads of a shared table
    per_sample_grads(loss, (W, idx[0]), (0, None))  # ensembles of tables, shared indices
    per_sample_grads(loss, (W, idx), (0, 0))


def test_embedding_model_per_sample_grads():
    emb, lin = torch.nn.Embedding(11, 4, padding_idx=0).double(), torch.nn.Linear(4, 3).double()
    params = {"emb": emb.weight.detach(), "w": lin.weight.detach(), "b": lin.bias.detach()}
    idx, t = torch.randint(0, 11, (B, 6)), torch.randint(0, 3, (B,))

    def loss(p, idx, t):
        h = F.embedding(idx, p["emb"], padding_idx=0).mean(0)
        return F.cross_entropy(F.linear(h, p["w"], p["b"]), t)

    with no_fallback():
        got = pf.vmap(pf.grad(loss), in_dims=(None, 0, 0))(params, idx, t)
    for b in range(B):
        pb = {k: v.clone().requires_grad_() for k, v in params.items()}
        gs = torch.autograd.grad(loss(pb, idx[b], t[b]), list(pb.values()))
        for k, g in zip(pb, gs):
            assert_close(got[k][b], g)


# ----------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", ["NC", "C", "NCHW"])
def test_nll_loss(reduction, weighted, shape):
    C = 4
    xs = {"NC": (B, 5, C), "C": (B, C), "NCHW": (B, 2, C, 3, 2)}[shape]
    x = r(*xs).log_softmax(1 if shape == "C" else 2)
    t = torch.randint(0, C, (xs[0],) + xs[1:2] + xs[3:]) if shape != "C" else torch.randint(0, C, (B,))
    if shape != "C":
        t.view(-1)[::3] = -1  # ignored targets
    w = r(B, C).exp() if weighted else None
    wd = 0 if weighted else None
    f = lambda x, t, w: F.nll_loss(x, t, w, ignore_index=-1, reduction=reduction)  # noqa: E731
    check_vmap(f, (x, t, None if w is None else w[0]), (0, 0, None))
    check_vmap(f, (x[0], t, None if w is None else w[0]), (None, 0, None))
    check_vmap(f, (x, t[0], w), (0, None, wd))
    check_vmap(f, (x.movedim(0, -1), t, w), (-1, 0, wd), func_oracle=weighted is False)
    loss = lambda x, t, w: f(x, t, w).sum()  # noqa: E731
    per_sample_grads(loss, (x, t, w), (0, 0, wd))
    if weighted:
        per_sample_grads(loss, (x, t, w[0]), (0, 0, None))


def test_cross_entropy_options():
    x, t = r(B, 5, 4), torch.randint(0, 4, (B, 5))
    for kw in [dict(label_smoothing=0.1), dict(reduction="sum"), dict(weight=r(4).exp(), reduction="mean")]:
        f = lambda x, t: F.cross_entropy(x, t, **kw)  # noqa: E731
        check_vmap(f, (x, t))
        per_sample_grads(f, (x, t), (0, 0))
    # probabilities as targets
    f = lambda x, p: F.cross_entropy(x, p)  # noqa: E731
    check_vmap(f, (x, r(B, 5, 4).softmax(-1)))


_LOSSES = [
    ("mse", lambda x, y, red: F.mse_loss(x, y, reduction=red), False),
    ("l1", lambda x, y, red: F.l1_loss(x, y, reduction=red), False),
    ("bce", lambda x, y, red: F.binary_cross_entropy(x.sigmoid(), y, reduction=red), True),
    ("bce_weight", lambda x, y, red: F.binary_cross_entropy(x.sigmoid(), y, weight=y + 1, reduction=red), True),
    ("bce_logits", lambda x, y, red: F.binary_cross_entropy_with_logits(x, y, pos_weight=y[0] + 1, reduction=red), True),
    ("smooth_l1", lambda x, y, red: F.smooth_l1_loss(x, y, beta=0.5, reduction=red), False),
    ("huber", lambda x, y, red: F.huber_loss(x, y, delta=0.7, reduction=red), False),
    ("soft_margin", lambda x, y, red: F.soft_margin_loss(x, y.sign(), reduction=red), False),
    ("kl_div", lambda x, y, red: F.kl_div(x.log_softmax(-1), y.softmax(-1), reduction=red), False),
    ("kl_div_log_target", lambda x, y, red: F.kl_div(x, y.log_softmax(-1), reduction=red, log_target=True), False),
]


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")
@pytest.mark.parametrize("name,fn,prob", _LOSSES, ids=[l[0] for l in _LOSSES])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_elementwise_losses(name, fn, prob, reduction):
    x, y = r(B, 4, 3), r(B, 4, 3)
    if prob:
        y = y.sigmoid()
    f = lambda x, y: fn(x, y, reduction)  # noqa: E731
    check_vmap(f, (x, y), (0, 0))
    check_vmap(f, (x, y[0]), (0, None))
    check_vmap(f, (x[0], y), (None, 0))
    # targets used as (pos_)weights or signs are not differentiable in torch
    per_sample_grads(lambda x, y: f(x, y).sum(), (x, y), (0, 0), argnums=(0, 1) if name in ("mse", "l1", "smooth_l1", "huber", "kl_div", "kl_div_log_target") or name == "bce" else 0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(5, 4), (4,), ()])
def test_margin_losses(reduction, shape):
    C = shape[-1] if shape else 1  # a 0-dim input is one row of one class
    x = r(B, *shape)
    t = torch.randint(0, C, (B,) + shape[:-1])
    for p, w in [(1, None), (2, r(C).exp()), (1, r(B, C).exp())]:
        wd = 0 if w is not None and w.dim() == 2 else None
        f = lambda x, t, w: F.multi_margin_loss(x, t, p=p, margin=0.7, weight=w, reduction=reduction)  # noqa: E731
        check_vmap(f, (x, t, w), (0, 0, wd), func_oracle=wd is None)
        check_vmap(f, (x[0], t, w), (None, 0, wd), func_oracle=wd is None)
        per_sample_grads(lambda x, t, w: f(x, t, w).sum(), (x, t, w), (0, 0, wd))
    # multilabel targets: class indices, the first -1 ends the list (repeats allowed)
    lt = torch.randint(-1, C, (B,) + shape)
    f = lambda x, t: F.multilabel_margin_loss(x, t, reduction=reduction)  # noqa: E731
    check_vmap(f, (x, lt))
    check_vmap(f, (x, lt[0]), (0, None))
    per_sample_grads(lambda x, t: f(x, t).sum(), (x, lt), (0, 0))


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_grid_sample(nd, mode):
    x = r(B, 2, 3, *(4,) * nd)
    g = torch.rand(B, 2, *(3,) * nd, nd, dtype=DT) * 2.2 - 1.1
    f = lambda x, g: F.grid_sample(x, g, mode=mode, padding_mode="border", align_corners=False)  # noqa: E731
    check_vmap(f, (x, g))
    check_vmap(f, (x[0], g), (None, 0))
    check_vmap(f, (x, g[0]), (0, None))
    per_sample_grads(lambda x, g: f(x, g).sin().sum(), (x, g), (0, 0), argnums=(0, 1) if mode == "bilinear" else 0)
    per_sample_grads(lambda x, g: f(x, g).sin().sum(), (x, g[0]), (0, None), argnums=0)


# ----------------------------------------------------------------------------------------
# attention, cdist
# ----------------------------------------------------------------------------------------


def test_cdist():
    x1, x2 = r(B, 4, 3), r(B, 5, 3)
    for p in [2.0, 1.0]:
        f = lambda a, b: torch.cdist(a, b, p=p)  # noqa: E731
        check_vmap(f, (x1, x2))
        check_vmap(f, (x1, x2[0]), (0, None))
        check_vmap(f, (r(B, 2, 4, 3), x2[0]), (0, None))
        per_sample_grads(lambda a, b: f(a, b).sum(), (x1, x2), (0, 0), argnums=(0, 1))
        per_sample_grads(lambda a, b: f(a, b).sum(), (x1, x2[0]), (0, None), argnums=(0, 1))


def _sdpa_case():
    q, k, v = r(B, 2, 2, 5, 4), r(B, 2, 2, 6, 4), r(B, 2, 2, 6, 4)
    mask = torch.rand(2, 1, 5, 6) > 0.3
    mask[..., 0] = True
    return q, k, v, mask


def _check_sdpa():
    q, k, v, mask = _sdpa_case()
    for f in [lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
              lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
              lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)]:
        check_vmap(f, (q, k, v))
        check_vmap(f, (q, k[0], v[0]), (0, None, None))
        per_sample_grads(lambda q, k, v: f(q, k, v).sin().sum(), (q, k, v), (0, 0, 0), argnums=(0, 1, 2))


def test_scaled_dot_product_attention():
    _check_sdpa()


def test_scaled_dot_product_attention_dropout_follows_randomness():
    q = r(1, 2, 5, 4).expand(B, 1, 2, 5, 4)  # identical examples
    f = lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)  # noqa: E731
    with pytest.raises(pf.RandomnessError, match="randomness='different'"):
        pf.vmap(f)(q)
    with no_fallback():
        same = pf.vmap(f, randomness="same")(q)
        out = pf.vmap(f, randomness="different")(q)
    assert out.shape == same.shape == (B, 1, 2, 5, 4)
    assert torch.equal(same[0], same[1])  # one dropout mask shared by every example
    assert not torch.equal(out[0], out[1])  # independent dropout masks per example
    # dropout_p=0 stays deterministic under the default randomness='error'
    check_vmap(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.0), (q,))


# ----------------------------------------------------------------------------------------
# models: per-sample gradients
# ----------------------------------------------------------------------------------------


def _per_sample_model_grads(model, x, t, loss_fn=F.cross_entropy):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, t):
        return loss_fn(pf.functional_call(model, p, (x.unsqueeze(0),)), t.unsqueeze(0))

    with no_fallback():
        got = pf.vmap(pf.grad(loss), in_dims=(None, 0, 0))(params, x, t)
    for b in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[b : b + 1]), t[b : b + 1]).backward()
        for k, p in model.named_parameters():
            assert_close(got[k][b], p.grad, msg=k)
    # torch.func agrees too
    want = tf.vmap(tf.grad(lambda p, x, t: loss_fn(tf.functional_call(model, p, (x.unsqueeze(0),)), t.unsqueeze(0))),
                   in_dims=(None, 0, 0))(params, x, t)
    assert_close(got, want)


def test_cnn_per_sample_grads():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 5),
    ).double()
    _per_sample_model_grads(model, r(4, 1, 8, 8), torch.randint(0, 5, (4,)))


def test_norm_models_per_sample_grads():
    ln = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 3)).double()
    _per_sample_model_grads(ln, r(4, 6), torch.randint(0, 3, (4,)))
    gn = torch.nn.Sequential(torch.nn.Conv1d(2, 6, 3), torch.nn.GroupNorm(3, 6), torch.nn.Tanh(),
                             torch.nn.AdaptiveAvgPool1d(2), torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    _per_sample_model_grads(gn, r(4, 2, 7), torch.randint(0, 3, (4,)))


def test_ensemble_of_cnns():
    # model ensembling: stacked parameters, one minibatch shared by every model
    models = [torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3), torch.nn.ReLU(),
                                  torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 4)).double()
              for _ in range(B)]
    params, _ = pf.stack_module_state(models)
    x, t = r(5, 2, 6, 6), torch.randint(0, 4, (5,))

    def loss(p, x, t):
        return F.cross_entropy(pf.functional_call(models[0], p, (x,)), t)

    with no_fallback():
        out = pf.vmap(lambda p, x: pf.functional_call(models[0], p, (x,)), in_dims=(0, None))(params, x)
        g = pf.vmap(pf.grad(loss), in_dims=(0, None, None))(params, x, t)
    for b, m in enumerate(models):
        assert_close(out[b], m(x).detach())
        m.zero_grad()
        F.cross_entropy(m(x), t).backward()
        for k, p in m.named_parameters():
            assert_close(g[k][b], p.grad, msg=k)


# ----------------------------------------------------------------------------------------
# rules running on other levels' tensors: nested vmap, jvp over vmap, grad over vmap
# ----------------------------------------------------------------------------------------

_NESTED = [
    # (name, f, args, inner in_dims, outer in_dims)
    ("conv_ensemble_of_per_sample", lambda x, w: F.conv2d(x, w, padding=1), (r(2, B, 1, 2, 5, 5), r(2, 3, 2, 3, 3)),
     (0, None), (0, 0)),
    ("conv_transposed", lambda x, w: F.conv_transpose2d(x, w, groups=2), (r(2, B, 1, 4, 4, 4), r(2, B, 4, 1, 2, 2)),
     (0, 0), (0, 0)),
    ("max_pool", lambda x: F.max_pool2d(x, 2), (r(2, B, 2, 4, 4),), (0,), (1,)),
    ("layer_norm", lambda x, w: F.layer_norm(x, (4,), w), (r(2, B, 3, 4), r(2, 4)), (0, None), (0, 0)),
    ("group_norm", lambda x, w: F.group_norm(x, 2, w), (r(2, B, 2, 4, 3), r(2, B, 4)), (0, 0), (0, 0)),
    ("batch_norm", lambda x, w: F.batch_norm(x, None, None, w, training=True), (r(2, B, 4, 3), r(2, 3)), (0, None), (0, 0)),
    ("embedding", lambda i, w: F.embedding(i, w), (torch.randint(0, 5, (2, B, 4)), r(2, 5, 3)), (0, None), (0, 0)),
    ("nll_loss", lambda x, t: F.nll_loss(x, t), (r(2, B, 4, 5).log_softmax(-1), torch.randint(0, 5, (2, B, 4))),
     (0, 0), (0, 0)),
]


@pytest.mark.parametrize("name,f,args,inner,outer", _NESTED, ids=[n[0] for n in _NESTED])
def test_nested_vmap(name, f, args, inner, outer):
    with no_fallback():
        got = pf.vmap(pf.vmap(f, in_dims=inner), in_dims=outer)(*args)
    assert_close(got, loop_vmap(loop_vmap(f, in_dims=inner), in_dims=outer)(*args))
    assert_close(got, tf.vmap(tf.vmap(f, in_dims=inner), in_dims=outer)(*args))


def test_jvp_and_grad_over_vmap():
    x, w, t = r(B, 2, 2, 5, 5), r(3, 2, 3, 3), torch.randint(0, 3, (B, 2, 3, 3))
    gw = r(3)

    def f(w, gw):
        def per_example(x, t):
            h = F.conv2d(x, w)
            h = F.batch_norm(h, None, None, gw, training=True)
            h = F.layer_norm(h, (3,))
            return F.cross_entropy(h, t)

        return pf.vmap(per_example)(x, t)

    def f_ref(w, gw):
        return torch.stack([F.cross_entropy(F.layer_norm(F.batch_norm(F.conv2d(xb, w), None, None, gw, training=True), (3,)), tb)
                            for xb, tb in zip(x, t)])

    tw, tg = r(3, 2, 3, 3), r(3)
    with no_fallback():
        got = pf.jvp(f, (w, gw), (tw, tg))
    assert_close(got, tf.jvp(f_ref, (w, gw), (tw, tg)))
    with no_fallback():
        got = pf.grad(lambda w, gw: f(w, gw).sum(), argnums=(0, 1))(w, gw)
    assert_close(got, tf.grad(lambda w, gw: f_ref(w, gw).sum(), argnums=(0, 1))(w, gw))


def test_per_sample_hessian_of_cross_entropy():
    x, t, W = r(B, 4), torch.randint(0, 3, (B,)), r(3, 4)
    loss = lambda W, x, t: F.cross_entropy(x @ W.t(), t)  # noqa: E731
    want = tf.vmap(tf.hessian(loss), in_dims=(None, 0, 0))(W, x, t)
    # Hessian rows as grads of <grad, v> over a basis of directions v (vmap over vmap over grad∘grad)
    hvp = lambda W, x, t, v: pf.grad(lambda W: (pf.grad(loss)(W, x, t) * v).sum())(W)  # noqa: E731
    basis = torch.eye(12, dtype=DT).reshape(12, 3, 4)
    with no_fallback():
        got = pf.vmap(pf.vmap(hvp, in_dims=(None, None, None, 0)), in_dims=(None, 0, 0, None))(W, x, t, basis)
    assert_close(got.reshape(B, 3, 4, 3, 4), want)

    # and through hessian (jacfwd over jacrev); fallbacks of non-nn ops are not this file's business
    assert_close(pf.vmap(pf.hessian(loss), in_dims=(None, 0, 0))(W, x, t), want)


# ----------------------------------------------------------------------------------------
# CTC loss, bilinear (_trilinear), fractional max pooling
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets_kind", ["padded", "concatenated"])
@pytest.mark.parametrize("lengths", ["lists", "tensors"])
def test_ctc_loss(targets_kind, lengths):
    T, N, C, S = 6, 2, 4, 3
    lp = r(B, T, N, C).log_softmax(-1)
    tl = [3, 2]
    tgt = torch.randint(1, C, (B, N, S)) if targets_kind == "padded" else torch.randint(1, C, (B, sum(tl)))
    il = [6, 5]
    if lengths == "tensors":
        il_b = torch.tensor([[6, 5], [5, 6], [4, 6]])
        il, tl = torch.tensor(il), torch.tensor(tl)
    for red in ("none", "mean", "sum"):
        f = lambda lp, tgt: F.ctc_loss(lp, tgt, il, tl, reduction=red)  # noqa: E731
        for in_dims in [(0, 0), (0, None), (None, 0)]:
            args = [t if d == 0 else t[0] for t, d in zip((lp, tgt), in_dims)]
            check_vmap(f, args, in_dims, func_oracle=False)
            if in_dims[0] == 0:
                per_sample_grads(lambda lp, tgt: f(lp, tgt).sum(), args, in_dims)
        if lengths == "tensors":  # batched input lengths
            g = lambda lp, il: F.ctc_loss(lp, tgt[0], il, tl, reduction=red)  # noqa: E731
            check_vmap(g, (lp, il_b), func_oracle=False)
            per_sample_grads(lambda lp, il: g(lp, il).sum(), (lp, il_b), (0, 0))


def test_bilinear():
    x1, x2, w, b = r(B, 4, 2), r(B, 4, 3), r(B, 5, 2, 3), r(B, 5)
    for in_dims in [(0, 0, None, None), (0, None, None, None), (None, 0, 0, 0), (0, 0, 0, 0)]:
        args = [t if d == 0 else t[0] for t, d in zip((x1, x2, w, b), in_dims)]
        check_vmap(F.bilinear, args, in_dims)
        per_sample_grads(lambda *a: F.bilinear(*a).pow(2).sum(), args, in_dims, argnums=(0, 1, 2, 3))


@pytest.mark.parametrize("dim", [2, 3])
def test_fractional_max_pool(dim):
    pool = F.fractional_max_pool2d if dim == 2 else F.fractional_max_pool3d
    x = r(B, 2, 3, *[7] * dim)
    samples = torch.rand(B, 4, 3, dim, dtype=DT)  # more rows than N: the kernel reads the first N
    f = lambda x, s: pool(x, 2, output_size=3, _random_samples=s)  # noqa: E731
    for in_dims in [(0, 0), (0, None), (None, 0)]:
        args = [t if d == 0 else t[0] for t, d in zip((x, samples), in_dims)]
        check_vmap(f, args, in_dims, func_oracle=False)
        check_vmap(lambda x, s: f(x[0], s), args, in_dims, func_oracle=False)  # no N dim
        if in_dims[0] == 0:
            per_sample_grads(lambda x, s: f(x, s).pow(2).sum(), args, in_dims)


def test_adaptive_max_pool3d_backward_with_unbatched_indices_does_not_crash(device):
    """vmap over a vjp_fn: the saved input and indices are unbatched, and torch's
    adaptive_max_pool3d_backward reads expanded (stride-0) copies of them out of bounds."""
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, device=device)
    out, vjp_fn = pf.vjp(lambda t: torch.nn.functional.adaptive_max_pool3d(t, 2), x)
    cts = torch.randn(3, *out.shape, dtype=torch.float64, device=device)
    (got,) = pf.vmap(vjp_fn)(cts)
    xr = x.clone().requires_grad_()
    o = torch.nn.functional.adaptive_max_pool3d(xr, 2)
    want = torch.stack([torch.autograd.grad(o, xr, c, retain_graph=True)[0] for c in cts])
    assert torch.allclose(got, want)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_low_precision_norms_with_per_example_affine_round_once(device, dt):
    """layer_norm / group_norm kernels apply weight and bias in float32 and round once: with
    per-example (batched) parameters the rule does the same, bit for bit."""
    x = torch.randn(3, 4, 6, 5, device=device).to(dt)
    w, b = torch.randn(3, 5, device=device).to(dt), torch.randn(3, 5, device=device).to(dt)
    f = lambda x, w, b: torch.nn.functional.layer_norm(x, (5,), w, b)
    with no_fallback():
        assert torch.equal(pf.vmap(f)(x, w, b), loop_vmap(f)(x, w, b))
    wg, bg = torch.randn(3, 6, device=device).to(dt), torch.randn(3, 6, device=device).to(dt)
    g = lambda x, w, b: torch.nn.functional.group_norm(x, 3, w, b)
    with no_fallback():
        assert torch.equal(pf.vmap(g)(x, wg, bg), loop_vmap(g)(x, wg, bg))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_of_one_example_of_scores_with_a_size_one_target(device, reduction, weighted):
    # torch takes a 1-D target of size 1 for a 1-D input as the 0-D target (a 0-D loss); its own
    # backward then refuses the shapes, so the gradients' oracle is the 0-D target's
    x = torch.randn(4, 5, device=device, dtype=torch.float64)
    t = torch.randint(0, 5, (4, 1), device=device)
    t[1] = -100  # (one example ignored: nan for 'mean', as the loop)
    w = torch.rand(5, device=device, dtype=torch.float64) if weighted else None
    f = lambda xi, ti: F.nll_loss(xi, ti, weight=w, reduction=reduction)  # noqa: E731
    torch.testing.assert_close(pf.vmap(f)(x, t), loop_vmap(f)(x, t), equal_nan=True)  # (nan: 'mean' of an ignored one)
    assert_close(pf.vmap(lambda xi: f(xi, t[0]))(x), loop_vmap(lambda xi: f(xi, t[0]))(x))
    keep = [0, 2, 3]  # (the ignored example's 'mean' gradient is 0 / 0 in the oracle's formula too)
    got = pf.vmap(pf.grad(lambda xi, ti: f(xi, ti).sum()))(x[keep], t[keep])
    want = torch.stack([tf.grad(lambda xi: f(xi, t[i].reshape(())).sum())(x[i]) for i in keep])
    assert_close(got, want)
    with pytest.raises(ValueError, match="1D target must have size 1"):
        pf.vmap(f)(x, torch.randint(0, 5, (4, 2), device=device))
