"""Neural-network ops: convolution, pooling, normalization, losses, embedding.

Most rules here use one of two folds, so that a single call of the aten kernel
serves the whole batch:

* **batch into N** (``fold_into_n``): ops on ``(N, C, *spatial)`` tensors treat
  every ``(n, c)`` plane independently, so a physical ``(B, N, C, ...)`` is run
  as ``(B*N, C, ...)`` and the result unflattened. A logical input without an
  N dim (``(C, H, W)``, which most of these ops accept) simply uses B as N.
* **batch into channels** (convolution with batched weights, batch norm): a
  per-example weight becomes B groups of ``groups`` each (``groups * B``), or
  per-example batch statistics become per-channel statistics of ``B*C``
  channels.

Served by exact ``torch._decomp`` decompositions instead (all their sub-ops have
rules): mse_loss, binary_cross_entropy (+backward, also with weights),
binary_cross_entropy_with_logits, smooth_l1_loss, huber_loss (+backwards),
soft_margin_loss, multilabel_soft_margin_loss, affine_grid. CompositeImplicit
functions never reach dispatch: max_pool1d, avg_pool1d, adaptive pools 1d,
instance_norm (batch norm), rms_norm, local_response_norm, kl_div, l1_loss,
cross_entropy (log_softmax + nll_loss) arrive as the ops handled here or as
pointwise/reduction ops.
"""

from __future__ import annotations

import torch

from .. import _core
from ._registry import batch_rule, batch_size_of, materialize, pad_to_rank, rank

aten = torch.ops.aten


def _ops(*names: str):
    """The non-out overloads of the named aten packets (names missing in this torch are skipped)."""
    out = []
    for n in names:
        packet = getattr(aten, n, None)
        if packet is None:
            continue
        for o in packet.overloads():
            op = getattr(packet, o)
            if not op._schema.is_mutable:  # out= variants: their outputs would be unbatched
                out.append(op)
    return out


def _map(fn, out):
    """Apply ``fn`` to every tensor of an op's output (a tensor or a tuple; None stays)."""
    if isinstance(out, (tuple, list)):
        return type(out)(None if o is None else fn(o) for o in out)
    return fn(out)


# -- batch into N: pooling, padding, upsampling, im2col -----------------------------------


def _input_size_pos(op):
    for i, a in enumerate(op._schema.arguments):
        if a.name == "input_size":
            return i
    return None


def fold_into_n(core: int):
    """Rule factory for ops on ``(N, C, *spatial)`` tensors that work on each ``(n, c)`` plane
    independently; ``core`` is the rank without N (C + spatial dims).

    Every tensor argument is materialized, then a logical ``(N, C, ...)`` batch
    ``(B, N, C, ...)`` runs as ``(B*N, C, ...)``; a logical ``(C, ...)`` input runs with B as
    N. Backward ops that take the input's size (``input_size``, N first) get N scaled."""

    def rule(op, args, kwargs, dims):
        B = batch_size_of(args, dims)
        tpos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        first = args[tpos[0]]
        has_n = rank(first, dims[tpos[0]]) > core
        new = list(args)
        # (torch's adaptive_max_pool3d_backward reads an expanded, stride-0 input or indices
        # out of bounds and crashes: backward kernels that take indices get real copies)
        dense = op in _TAKES_INDICES
        for i in tpos:
            t = materialize(args[i], dims[i], B)
            if dense and dims[i] is None:
                t = t.contiguous()
            new[i] = t.flatten(0, 1) if has_n else t
        size_pos = _input_size_pos(op)
        if size_pos is not None and has_n:
            size = list(new[size_pos])
            new[size_pos] = [B * size[0]] + size[1:]
        out = op(*new, **kwargs)
        if has_n:
            N = first.shape[1] if dims[tpos[0]] is not None else first.shape[0]
            out = _map(lambda o: o.reshape((B, N) + o.shape[1:]), out)
        return out, 0

    return rule


_FOLD_N = {
    2: ["reflection_pad1d", "reflection_pad1d_backward", "replication_pad1d", "replication_pad1d_backward",
        "upsample_nearest1d", "upsample_nearest1d_backward", "_upsample_nearest_exact1d",
        "_upsample_nearest_exact1d_backward", "upsample_linear1d", "upsample_linear1d_backward", "col2im"],
    3: ["max_pool2d_with_indices", "max_pool2d_with_indices_backward", "avg_pool2d", "avg_pool2d_backward",
        "_adaptive_avg_pool2d", "_adaptive_avg_pool2d_backward", "adaptive_max_pool2d",
        "adaptive_max_pool2d_backward", "max_unpool2d", "reflection_pad2d", "reflection_pad2d_backward",
        "replication_pad2d", "replication_pad2d_backward", "upsample_nearest2d", "upsample_nearest2d_backward",
        "_upsample_nearest_exact2d", "_upsample_nearest_exact2d_backward", "upsample_bilinear2d",
        "upsample_bilinear2d_backward", "upsample_bicubic2d", "upsample_bicubic2d_backward",
        "_upsample_bilinear2d_aa", "_upsample_bilinear2d_aa_backward", "_upsample_bicubic2d_aa",
        "_upsample_bicubic2d_aa_backward", "im2col", "grid_sampler_2d", "grid_sampler_2d_backward"],
    4: ["max_pool3d_with_indices", "max_pool3d_with_indices_backward", "avg_pool3d", "avg_pool3d_backward",
        "_adaptive_avg_pool3d", "_adaptive_avg_pool3d_backward", "adaptive_max_pool3d",
        "adaptive_max_pool3d_backward", "max_unpool3d", "reflection_pad3d", "reflection_pad3d_backward",
        "replication_pad3d", "replication_pad3d_backward", "upsample_nearest3d", "upsample_nearest3d_backward",
        "_upsample_nearest_exact3d", "_upsample_nearest_exact3d_backward", "upsample_trilinear3d",
        "upsample_trilinear3d_backward", "grid_sampler_3d", "grid_sampler_3d_backward"],
}
_TAKES_INDICES = frozenset(op for names in _FOLD_N.values() for op in _ops(*names)
                           if any(a.name == "indices" for a in op._schema.arguments))
for _core_rank, _names in _FOLD_N.items():
    batch_rule(*_ops(*_names))(fold_into_n(_core_rank))


@batch_rule(aten.constant_pad_nd.default, aten.pixel_shuffle.default, aten.pixel_unshuffle.default)
def trailing_dims(op, args, kwargs, dims):
    """Ops that touch only trailing dims and accept any number of leading ones: the batch
    dim rides along (constant_pad_nd's decomposition would write into an unbatched buffer)."""
    return op(*args, **kwargs), 0


def _circular_pad(original, args, kwargs):
    """``F.pad(mode='circular')`` while a transform is live. Its CompositeImplicit kernel
    (``_pad_circular``) allocates an empty output and copies slices into it, which cannot be
    batched from below (the buffer is unbatched); the same result as a ``cat`` of slices can."""
    x = args[0] if args else kwargs.get("input")
    pad = args[1] if len(args) > 1 else kwargs.get("pad")
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    k = len(pad) // 2 if pad is not None else 0  # padded dims
    if mode != "circular" or not isinstance(x, _core.LevelTensor) or not k + 1 <= x.dim() <= k + 2:
        return original(*args, **kwargs)  # (also raises torch's own error for bad shapes)
    for i in range(len(pad) // 2):  # pad pairs start from the last dim
        d, left, right = x.dim() - 1 - i, pad[2 * i], pad[2 * i + 1]
        # negative pads crop first; positive pads then wrap around the cropped tensor
        x = x.narrow(d, max(-left, 0), x.shape[d] - max(-left, 0) - max(-right, 0))
        n = x.shape[d]
        parts = [x.narrow(d, n - left, left)] if left > 0 else []
        parts.append(x)
        if right > 0:
            parts.append(x.narrow(d, 0, right))
        x = torch.cat(parts, d) if len(parts) > 1 else x
    return x


_core.patch_while_active(torch.nn.functional, "pad", _circular_pad)


# -- convolution --------------------------------------------------------------------------


def _to_groups(x, has_n):
    """``(B, N, C, *S)`` (or ``(B, C, *S)`` without N) -> ``(N, B*C, *S)``."""
    if not has_n:
        x = x.unsqueeze(1)
    return x.movedim(0, 1).flatten(1, 2)


def _from_groups(y, B, has_n):
    """``(N, B*C, *S)`` -> the batched result and its batch dim."""
    y = y.reshape((y.shape[0], B, -1) + y.shape[2:])
    if not has_n:
        return y.squeeze(0), 0
    return y, 1


@batch_rule(aten.convolution.default)
def convolution(op, args, kwargs, dims):
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    xd, wd, bd = dims[0], dims[1], dims[2]
    B = batch_size_of(args, dims)
    k = rank(w, wd) - 2  # spatial dims
    has_n = rank(x, xd) == k + 2
    rest = (stride, padding, dilation, transposed, output_padding)
    if wd is None:
        # shared filters: the batch joins N; a batched bias is added afterwards
        if xd is None:
            out = op(x, w, None, *rest, groups).unsqueeze(0)
        elif has_n:
            out = op(x.flatten(0, 1), w, bias if bd is None else None, *rest, groups)
            out = out.reshape((B, x.shape[1]) + out.shape[1:])
        else:
            out = op(x, w, bias if bd is None else None, *rest, groups)
        if bd is not None:
            out = out + bias.reshape((B,) + (1,) * int(has_n) + (-1,) + (1,) * k)
        return out, 0
    # per-example filters (model ensembling): B*groups groups over B*C input channels.
    # Weight (B, O, C/g, *K) -> (B*O, C/g, *K); transposed (B, C, O/g, *K) -> (B*C, O/g, *K):
    # either way the channel order (b, group, ...) lines up with the folded input.
    xg = _to_groups(materialize(x, xd, B), has_n)
    bg = None if bias is None else materialize(bias, bd, B).flatten()
    out = op(xg, w.flatten(0, 1), bg, *rest, groups * B)
    return _from_groups(out, B, has_n)


@batch_rule(aten.convolution_backward.default)
def convolution_backward(op, args, kwargs, dims):
    go, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask = args
    B = batch_size_of(args, dims)
    k = rank(w, dims[2]) - 2
    has_n = rank(x, dims[1]) == k + 2
    rest = (stride, padding, dilation, transposed, output_padding)
    go = materialize(go, dims[0], B)
    x = materialize(x, dims[1], B)
    if dims[2] is None and not mask[1]:
        # shared filters and no filter gradient: the batch joins N
        gi = gb = None
        if mask[0]:
            if has_n:
                gi = op(go.flatten(0, 1), x.flatten(0, 1), w, None, *rest, groups, [True, False, False])[0]
                gi = gi.reshape(x.shape)
            else:
                gi = op(go, x, w, None, *rest, groups, [True, False, False])[0]
        if mask[2]:
            cdim = 1 + has_n
            gb = go.sum([d for d in range(1, go.dim()) if d != cdim])
        return (gi, None, gb), 0
    # per-example filter gradients (per-sample gradients): one call with B*groups groups
    wg = materialize(w, dims[2], B).flatten(0, 1)
    bsz = None if bias_sizes is None else [B * bias_sizes[0]]
    gi, gw, gb = op(_to_groups(go, has_n), _to_groups(x, has_n), wg, bsz, *rest, groups * B, mask)
    gi_dim = None
    if gi is not None:
        gi, gi_dim = _from_groups(gi, B, has_n)
    if gw is not None:
        gw = gw.reshape((B, -1) + gw.shape[1:])
    if gb is not None:
        gb = gb.reshape(B, -1)
    return (gi, gw, gb), [gi_dim, 0, 0]


# -- layer norm / group norm ---------------------------------------------------------------


_HALF = (torch.float16, torch.bfloat16)


def _float(t):
    return None if t is None else t.float()


def _affine(out, w, b):
    """``out * w + b``, the parameters already shaped to broadcast against ``out``."""
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out


def _per_channel(t, d, spatial: int):
    """A per-channel parameter, ``(C,)`` or batched ``(B, C)``, shaped to broadcast against a
    physical ``(B, N, C, *spatial)`` tensor."""
    if t is None:
        return None
    if d is None:
        return t.reshape((-1,) + (1,) * spatial)
    return t.reshape((t.shape[0], 1, -1) + (1,) * spatial)


@batch_rule(aten.native_layer_norm.default)
def native_layer_norm(op, args, kwargs, dims):
    x, ns, w, b, eps = args
    B = batch_size_of(args, dims)
    x = materialize(x, dims[0], B)
    if dims[2] is None and dims[3] is None:
        return op(x, ns, w, b, eps), 0  # normalized over trailing dims: the batch rides along
    r = rank(x, 0)  # batched parameters (B, *ns) broadcast once padded to the input's rank
    w, b = pad_to_rank(w, dims[2], r), pad_to_rank(b, dims[3], r)
    if x.dtype in _HALF:  # the kernel applies the affine part in float32 and rounds once
        out, mean, rstd = op(x.float(), ns, None, None, eps)
        return (_affine(out, _float(w), _float(b)).to(x.dtype), mean.to(x.dtype), rstd.to(x.dtype)), 0
    out, mean, rstd = op(x, ns, None, None, eps)
    return (_affine(out, w, b), mean, rstd), 0


@batch_rule(aten.native_layer_norm_backward.default)
def native_layer_norm_backward(op, args, kwargs, dims):
    go, x, ns, mean, rstd, w, b, mask = args
    B = batch_size_of(args, dims)
    # contiguous: the CPU kernel reads mean/rstd as flat buffers of M values, ignoring their
    # strides, so an expanded (unbatched) mean would be read past its end
    go, x, mean, rstd = (materialize(t, d, B).contiguous()
                         for t, d in zip((go, x, mean, rstd), [dims[i] for i in (0, 1, 3, 4)]))
    r = rank(x, 0)
    lead = list(range(1, 1 + r - len(ns)))  # per example, the parameter grads sum over these
    gi = gw = gb = None
    if mask[0]:
        if dims[5] is None:
            gi = op(go, x, ns, mean, rstd, w, None, [True, False, False])[0]
        else:  # d/dx of xhat * w is the weightless backward of go * w
            gi = op(go * pad_to_rank(w, 0, r), x, ns, mean, rstd, None, None, [True, False, False])[0]
    if mask[1] and w is not None:
        gw = go * ((x - mean) * rstd)
        gw = gw.sum(lead) if lead else gw
    if mask[2] and b is not None:
        gb = go.sum(lead) if lead else go
    return (gi, gw, gb), 0


@batch_rule(aten.native_group_norm.default)
def native_group_norm(op, args, kwargs, dims):
    x, w, b, N, C, HxW, group, eps = args
    B = batch_size_of(args, dims)
    x = materialize(x, dims[0], B)
    spatial = x.dim() - 3
    affine_batched = dims[1] is not None or dims[2] is not None
    # (the kernel needs a contiguous input: a batch dim moved to the front may not be)
    half = affine_batched and x.dtype in _HALF  # (the kernel's affine part: float32, rounded once)
    out, mean, rstd = op((x.float() if half else x).flatten(0, 1).contiguous(), None if affine_batched else w,
                         None if affine_batched else b, B * N, C, HxW, group, eps)
    out = out.reshape(x.shape)
    if affine_batched:
        pw, pb = _per_channel(w, dims[1], spatial), _per_channel(b, dims[2], spatial)
        out = _affine(out, _float(pw), _float(pb)).to(x.dtype) if half else _affine(out, pw, pb)
    if half:
        mean, rstd = mean.to(x.dtype), rstd.to(x.dtype)
    return (out, mean.reshape(B, N, group), rstd.reshape(B, N, group)), 0


@batch_rule(aten.native_group_norm_backward.default)
def native_group_norm_backward(op, args, kwargs, dims):
    go, x, mean, rstd, w, N, C, HxW, group, mask = args
    B = batch_size_of(args, dims)
    go, x, mean, rstd = (materialize(t, d, B).contiguous() for t, d in zip((go, x, mean, rstd), dims[:4]))
    spatial = x.dim() - 3
    gi = gw = gb = None
    if mask[0]:
        if dims[4] is None:
            gin, wn = go, w
        else:  # d/dx of xhat * w is the weightless backward of go * w
            gin, wn = go * _per_channel(w, 0, spatial), None
        gi = op(gin.flatten(0, 1), x.flatten(0, 1), mean.flatten(0, 1), rstd.flatten(0, 1), wn,
                B * N, C, HxW, group, [True, False, False])[0].reshape(x.shape)
    red = [1] + list(range(3, x.dim()))  # per example: sum over N and spatial dims
    if mask[1] and w is not None:
        g, gm = (B, N, group, (C // group) * HxW), (B, N, group, 1)  # (explicit: N may be 0)
        xhat = ((x.reshape(g) - mean.reshape(gm)) * rstd.reshape(gm)).reshape(x.shape)
        gw = (go * xhat).sum(red)
    if mask[2]:
        gb = go.sum(red)
    return (gi, gw, gb), 0


# -- batch norm ----------------------------------------------------------------------------
# Each example is itself an (N, C, ...) batch with its own statistics: move B next to C and
# fold, (B, N, C, ...) -> (N, B*C, ...), so the kernel computes B*C channel statistics.

# op -> (position of running_mean or None, position of `training` or its fixed value,
#        functional: returns new running stats instead of updating them in place)
_BN = {
    aten.native_batch_norm.default: (3, 5, False),
    aten._native_batch_norm_legit.default: (3, 5, False),
    aten._native_batch_norm_legit.no_stats: (None, 3, False),
    aten._native_batch_norm_legit_no_training.default: (3, False, False),
    aten._native_batch_norm_legit_functional.default: (3, 5, True),
    aten._batch_norm_with_update.default: (3, True, False),
    aten._batch_norm_with_update_functional.default: (3, True, True),
    aten._batch_norm_no_update.default: (3, False, False),
}


def _fold_channels(t, d, B):
    """Per-channel tensor ``(C,)`` or batched ``(B, C)`` -> ``(B*C,)``; None stays None."""
    return None if t is None else materialize(t, d, B).reshape(-1)


def _unfold_stat(t, B):
    """``(B*C,)`` -> ``(B, C)`` batched; empty placeholders (eval mode, reserve) stay unbatched."""
    if t is None or t.numel() == 0:
        return t, None
    return t.reshape(B, -1), 0


def _momentum_pos(op):
    for i, a in enumerate(op._schema.arguments):
        if a.name == "momentum":
            return i
    raise AssertionError(op)


# -- running statistics shared by the whole batch -------------------------------------------
# vmap's definition is the loop ``for x_i in x: bn(x_i)``: with unbatched running stats that
# loop updates them once per example, in order. With momentum m_i for example i (a constant m,
# or 1/(n0+1+i) for nn.BatchNorm's cumulative moving average, momentum=None), the result is
#     r_B = prod_j (1 - m_j) r_0 + sum_i m_i prod_{j>i} (1 - m_j) s_i
# where s_i are example i's own batch statistics (mean, and the variance unbiased over its
# own N*spatial elements). That single well-defined value is written into the buffers; the
# per-example s_i come from one kernel call on the folded batch with private stats and
# momentum 1 (which makes the kernel's "updated" stats exactly s_i).

#: (running_mean, n0) of the nn.BatchNorm forward calls in flight with momentum=None
#: (cumulative moving average): n0 is num_batches_tracked before the loop's first example
_BN_CMA: list = []


def _loop_weights(B, m, cma_n0):
    """Weights ``(w0, [w_i])`` of ``r_0`` and of each example's statistics after B updates."""
    ms = [1.0 / (cma_n0 + 1 + i) for i in range(B)] if cma_n0 is not None else [m] * B
    ws = []
    for i in range(B):
        w = ms[i]
        for j in range(i + 1, B):
            w *= 1.0 - ms[j]
        ws.append(w)
    w0 = 1.0
    for mj in ms:
        w0 *= 1.0 - mj
    return w0, ws


def _vmap_batch_sizes(t) -> dict:
    """{vmap interpreter: batch size} of the levels at which ``t`` is batched."""
    out = {}
    while isinstance(t, _core.LevelTensor):
        if t._interp.kind == "vmap" and not getattr(t, "_lazy", False):
            out[t._interp] = t._interp.batch_size
        t = t._value
    return out


def _cma_n0(running_mean):
    for rm, n0 in reversed(_BN_CMA):
        if rm is running_mean:
            return n0
    return None


def _bn_shared_stats_update(op, args, dims, B):
    """Batch norm in training mode with running stats that are not batched (see above):
    the batched output, and the buffers updated as the per-example loop updates them."""
    rpos = _BN[op][0]
    stats = [args[rpos], args[rpos + 1]]
    below = {}
    for i in range(3):
        if isinstance(args[i], torch.Tensor):
            below.update(_vmap_batch_sizes(args[i]))
    for t in stats:
        if t is not None:
            for lv in _vmap_batch_sizes(t):
                below.pop(lv, None)
    if below:
        raise RuntimeError(
            f"vmap: {op} in training mode with running_mean/running_var that are not batched, under "
            "two vmap levels that both batch the input (or the affine parameters), is not supported. "
            "Pass the running stats batched at one of them (e.g. stack_module_state / in_dims), or use "
            "track_running_stats=False, or eval mode (module.eval())."
        )
    x, xd = args[0], dims[0]
    w, b = args[1], args[2]
    mpos = _momentum_pos(op)
    momentum = args[mpos]
    cma = _cma_n0(stats[0])
    new = list(args)
    new[mpos] = 1.0  # the kernel's "updated" private stats are then the batch statistics
    if xd is None:
        # only the affine part is batched: every example has the same statistics s, so the
        # loop's B updates are r_B = w0 r_0 + (sum w_i) s
        new[1] = new[2] = None
        priv = [torch.zeros_like(t) if t is not None else None for t in stats]
        new[rpos], new[rpos + 1] = priv
        out = list(op(*new))
        spatial = x.dim() - 2
        out[0] = _affine(out[0].unsqueeze(0), _per_channel(w, dims[1], spatial), _per_channel(b, dims[2], spatial))
        per_example = [None if p is None else p.unsqueeze(0).expand((B,) + p.shape) for p in priv]
        out_dims = [0] + [None] * (len(out) - 1)
        res = tuple(out)
    else:
        new[0] = _to_groups(x, True)
        new[1], new[2] = _fold_channels(w, dims[1], B), _fold_channels(b, dims[2], B)
        priv = [None if t is None else t.new_zeros((B * t.shape[0],)) for t in stats]
        new[rpos], new[rpos + 1] = priv
        out = op(*new)
        per_example = [None if p is None else p.reshape(B, -1) for p in priv]
        y, y_dim = _from_groups(out[0], B, True)
        res, out_dims = [y], [y_dim]
        for t in out[1:]:
            t, d = _unfold_stat(t, B)
            res.append(t)
            out_dims.append(d)
        res = tuple(res)
    w0, ws = _loop_weights(B, momentum, cma)
    wt = torch.tensor(ws, dtype=torch.float64).reshape(B, 1)
    with torch.no_grad():
        for r, s in zip(stats, per_example):
            if r is None:
                continue
            # accumulate in float64: r_0 and the s_i may differ in size by orders of magnitude
            upd = w0 * r.double() + (wt * s.double()).sum(0)
            r.copy_(upd.to(r.dtype))
    return res, out_dims


@batch_rule(*_BN)
def batch_norm(op, args, kwargs, dims):
    rpos, tpos, functional = _BN[op]
    training = tpos if isinstance(tpos, bool) else args[tpos]
    B = batch_size_of(args, dims)
    if kwargs:
        args, dims = _full_args(op, args, kwargs, dims)  # (defaults only: no tensors in kwargs)
        kwargs = {}
    x, xd = args[0], dims[0]
    w, b = args[1], args[2]
    stats = [args[rpos], args[rpos + 1]] if rpos is not None else [None, None]
    sdims = [dims[rpos], dims[rpos + 1]] if rpos is not None else [None, None]
    updates = training and not functional and stats[0] is not None
    if updates and all(d is None for d in sdims):
        return _bn_shared_stats_update(op, args, dims, B)
    if updates and any(d is None and t is not None for t, d in zip(stats, sdims)):
        raise RuntimeError(
            f"vmap: {op} in training mode with running_mean batched and running_var not (or the other "
            "way round): batch both or neither."
        )
    new = list(args)
    new[0] = _to_groups(materialize(x, xd, B), True)
    new[1], new[2] = _fold_channels(w, dims[1], B), _fold_channels(b, dims[2], B)
    if rpos is not None:
        for j in range(2):
            new[rpos + j] = _fold_channels(stats[j], sdims[j], B)
            if updates:  # reshape may have copied: update a private copy, written back below
                new[rpos + j] = new[rpos + j].clone()
    out = op(*new, **kwargs)
    if updates:
        for j in range(2):
            stats[j].copy_(new[rpos + j].reshape(stats[j].shape))
    y, y_dim = _from_groups(out[0], B, True)
    res, out_dims = [y], [y_dim]
    for t in out[1:]:
        t, d = _unfold_stat(t, B)
        res.append(t)
        out_dims.append(d)
    return tuple(res), out_dims


def _bn_module_forward(original, args, kwargs):
    """``nn.BatchNorm*.forward`` while a transform is live. The loop ``for x_i in x: bn(x_i)``
    that vmap stands for calls forward once per example: ``num_batches_tracked`` grows by the
    batch size, and with momentum=None the i-th call averages with factor 1/(n0+1+i). Both
    happen in Python, outside any op, so they are done here; the batch-norm rule does the rest."""
    self = args[0]
    x = args[1] if len(args) > 1 else kwargs.get("input")
    nbt = getattr(self, "num_batches_tracked", None)
    rm = self.running_mean
    if (not self.training or not self.track_running_stats or nbt is None or rm is None
            or len(args) + len(kwargs) != 2 or not isinstance(x, torch.Tensor)):
        return original(*args, **kwargs)
    # the loop's calls of forward: the examples of the levels that batch the op but not the stats
    sizes = {}
    for t in (x, self.weight, self.bias):
        if t is not None:
            sizes.update(_vmap_batch_sizes(t))
    for lv in _vmap_batch_sizes(rm):
        sizes.pop(lv, None)
    if not sizes or (self.momentum is None and isinstance(nbt, _core.LevelTensor)):
        return original(*args, **kwargs)
    n = 1
    for bs in sizes.values():
        n *= bs
    self._check_input_dim(x)
    if self.momentum is None:
        n0 = int(nbt)
        nbt.add_(n)
        _BN_CMA.append((self.running_mean, n0))
        try:
            return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                  True, 1.0 / (n0 + 1), self.eps)
        finally:
            _BN_CMA.pop()
    nbt.add_(n)
    return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                                          self.momentum, self.eps)


_core.patch_while_active(torch.nn.modules.batchnorm._BatchNorm, "forward", _bn_module_forward)


@batch_rule(aten.native_batch_norm_backward.default, aten.batch_norm_backward.default)
def batch_norm_backward(op, args, kwargs, dims):
    B = batch_size_of(args, dims)
    new = list(args)
    new[0] = _to_groups(materialize(args[0], dims[0], B), True)
    new[1] = _to_groups(materialize(args[1], dims[1], B), True)
    for i in range(2, 7):  # weight, running_mean, running_var, save_mean, save_invstd/var
        new[i] = _fold_channels(args[i], dims[i], B)
    if len(args) > 10 and dims[10] is not None:  # batch_norm_backward's reserve (empty on CPU)
        new[10] = args[10].reshape(-1)
    gi, gw, gb = op(*new, **kwargs)
    gi_dim = None
    if gi is not None:
        gi, gi_dim = _from_groups(gi, B, True)
    gw = None if gw is None else gw.reshape(B, -1)
    gb = None if gb is None else gb.reshape(B, -1)
    return (gi, gw, gb), [gi_dim, 0, 0]


# -- embedding -------------------------------------------------------------------------------


def _offsets(B, per, like, ndim):
    """``b * per`` for each example, shaped to broadcast against a ``(B, ...)`` tensor of rank ``ndim``."""
    return (torch.arange(B, device=like.device, dtype=like.dtype) * per).reshape((B,) + (1,) * (ndim - 1))


@batch_rule(aten.embedding.default)
def embedding(op, args, kwargs, dims):
    w, idx = args[0], args[1]
    if dims[0] is None:
        return op(*args, **kwargs), 0  # a plain lookup of batched indices
    # per-example tables: one table of B*V rows, example b's indices shifted by b*V. An index
    # outside [0, V) would land in another example's rows: send it past the end so that the
    # kernel raises its own "index out of range" (no data-dependent check needed)
    B, V = w.shape[0], w.shape[1]
    idx = materialize(idx, dims[1], B)
    shifted = torch.where((idx < 0) | (idx >= V), B * V, idx + _offsets(B, V, idx, idx.dim()))
    return op(w.flatten(0, 1), shifted, *args[2:], **kwargs), 0


@batch_rule(aten.embedding_dense_backward.default)
def embedding_dense_backward(op, args, kwargs, dims):
    go, idx, num_weights, padding_idx, scale_grad_by_freq = args
    B = batch_size_of(args, dims)
    if dims[1] is None:
        # shared indices: the batch rides in the feature dim, (B, *I, D) -> (*I, B*D)
        D = go.shape[-1]
        out = op(go.movedim(0, -2).flatten(-2), idx, num_weights, padding_idx, scale_grad_by_freq)
        return out.reshape(num_weights, B, D), 1
    go = materialize(go, dims[0], B)
    if padding_idx >= 0:  # after shifting, each example has its own padding row: mask instead
        go = go.masked_fill((idx == padding_idx).unsqueeze(-1), 0)
    out = op(go, idx + _offsets(B, num_weights, idx, idx.dim()), B * num_weights, -1, scale_grad_by_freq)
    return out.reshape(B, num_weights, -1), 0


@batch_rule(aten.embedding_renorm_.default)
def embedding_renorm_(op, args, kwargs, dims):
    # Per example: each row of the table that the indices name (negative ones wrap) is scaled
    # by max_norm / (norm + 1e-7) if its norm exceeds max_norm. Gather the named rows, scale them
    # as the kernel does (the scale in double, applied in the table's dtype), scatter them back
    # (a row named twice gets the same value twice).
    w, idx, max_norm, norm_type = args
    if dims[0] is None:  # per-example indices would renorm one shared table differently
        from .indexing import _inplace_error

        raise _inplace_error(op)
    if w.dim() != 3:
        raise RuntimeError(f"embedding_renorm_: Expected 2-dimensional tensor, but got {w.dim() - 1}-dimensional tensor "
                           "for argument #1 'self'")
    if idx.dtype not in (torch.int64, torch.int32):
        raise RuntimeError("embedding_renorm_: Expected tensor for argument #2 'indices' to have one of the following "
                           f"scalar types: Long, Int; but got {idx.dtype} instead")
    B, V, D = w.shape
    idx = materialize(idx, dims[1], B).reshape(B, -1).long()
    idx = torch.where(idx < 0, idx + V, idx).unsqueeze(-1).expand(B, idx.shape[1], D)
    rows = w.gather(1, idx)
    norm = torch.linalg.vector_norm(rows, norm_type, dim=-1, keepdim=True).double()
    scale = torch.where(norm > max_norm, max_norm / (norm + 1e-7), torch.ones((), dtype=norm.dtype, device=norm.device))
    w.scatter_(1, idx, rows * scale.to(w.dtype))
    return args[0], 0


# -- embedding_bag -------------------------------------------------------------------------------
# The bags of all examples become the bags of one call: example b's indices follow those of
# examples < b (its offsets shift by b*L), and a per-example table joins one table of B*V rows
# (its indices shift by b*V; padding entries point at one extra zero row, the folded call's
# padding_idx). The auxiliary outputs are made to look like the per-example kernel's:
#   offset2bag: empty on the kernel's 'sum' fast path (a float/half/bfloat16 table whose rows
#     are contiguous, per_sample_weights too, no padding_idx), else each index's bag;
#   bag_size:   the bag sizes (less padding) for 'mean'/'max'; for 'sum' the kernel leaves it
#     uninitialized (shaped like offsets in the forward-only op): zeros here;
#   max_indices: the argmax rows for 'max', else shaped like bag_size (a copy of it).


def _plain(*ts):
    """Whether reading these tensors' values is free (no outer vmap level would have to run
    the function per example)."""
    return not any(isinstance(t, _core.LevelTensor) for t in ts if t is not None)


def _loop_tuple(op, args, dims, B):
    """As ``_loop``, for ops that return a tuple of tensors."""
    outs = [op(*[a.select(0, b) if d is not None else a for a, d in zip(args, dims)]) for b in range(B)]
    return tuple(torch.stack(col) for col in zip(*outs)), 0


def _bag_fast_path(dtype, row_stride, pad, psw_stride):
    """Whether the CPU kernel takes its 'sum' fast path (which leaves offset2bag empty)."""
    return (dtype in (torch.float32, torch.float16, torch.bfloat16) and row_stride == 1 and pad < 0
            and (psw_stride is None or psw_stride == 1))


@batch_rule(aten._embedding_bag_forward_only.default, aten._embedding_bag.default)
def embedding_bag(op, args, kwargs, dims):
    args, dims = _full_args(op, args, kwargs, dims)
    w, idx, off, sgbf, mode, sparse, psw, ilo, pad = args
    wd, id_, od, pd = dims[0], dims[1], dims[2], dims[6]
    B = batch_size_of(args, dims)
    if rank(idx, id_) != 1 or rank(off, od) != 1 or rank(w, wd) != 2:
        return _loop_tuple(op, args, dims, B)  # (2-d indices, or inputs the kernel rejects)
    V, D = w.shape[-2], w.shape[-1]
    itype = torch.promote_types(idx.dtype, off.dtype)
    idx = materialize(idx, id_, B).to(itype)
    off = materialize(off, od, B).to(itype)
    L, n_off = idx.shape[1], off.shape[1]
    nb = n_off - 1 if ilo else n_off
    if nb < 0 or (ilo and n_off == 0):
        return _loop_tuple(op, args, dims, B)  # (raises as per example)
    if _plain(off) and n_off:
        first, last = off[:, 0], off[:, -1]
        if bool((first != 0).any()):
            bad = int(first[first != 0][0])
            raise RuntimeError("offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to start "
                               f"from position 0. However, got {bad}")
        if bool((last > L).any()):
            raise RuntimeError(f"offsets[-1] can not be greater than input's length {L} but got offsets[-1] of "
                               f"{int(last.max())}")
        if ilo and bool((last != L).any()):
            # the kernel's paths disagree on where the last bag ends then: run it per example
            return _loop_tuple(op, args, dims, B)
    elif n_off:  # offsets batched at an outer level: check them without reading them in Python
        first, last = off[:, 0], off[:, -1]
        torch._assert_async((first == 0).all(), "embedding_bag: offsets[0] has to be 0, i.e., the first sequence in "
                                                "the mini-batch has to start from position 0")
        torch._assert_async((last <= L).all(), f"embedding_bag: offsets[-1] can not be greater than input's length {L}")
        if ilo:
            torch._assert_async((last == L).all(), "embedding_bag under nested vmap: include_last_offset=True needs "
                                                   f"offsets[-1] == len(input) ({L}) in every example")
    # the per-example 'sum' fast path (it decides the shape of offset2bag)
    fast = _bag_fast_path(w.dtype, w.stride(2) if wd is not None else w.stride(1), pad,
                          None if psw is None else (psw.stride(1) if pd is not None else psw.stride(0)))
    ar = torch.arange(B, device=idx.device, dtype=itype).reshape(B, 1)
    if wd is not None:
        if _plain(idx) and idx.numel() and bool(((idx < 0) | (idx >= V)).any()):
            bad = idx[(idx < 0) | (idx >= V)][0]
            raise IndexError(f"embedding_bag: Expected idx >= 0 && idx < num_embeddings but found idx to be {int(bad)}")
        table = w.reshape(B * V, D)
        flat_idx = idx + ar * V
        rows = B * V
    else:
        table, flat_idx, rows = w, idx, V
    pad_f = pad
    psw_f = None if psw is None else materialize(psw, pd, B).reshape(-1)
    if pad >= 0 and wd is not None:  # each example's padding row -> one shared zero row
        table = torch.cat([table, table.new_zeros((1, D))])
        flat_idx = torch.where(idx == pad, torch.full((), rows, dtype=itype, device=idx.device), flat_idx)
        pad_f = rows
    elif mode == 0 and not fast and _bag_fast_path(table.dtype, table.stride(1), pad_f,
                                                     None if psw_f is None else psw_f.stride(0)):
        # keep the folded call off the fast path too (offset2bag): a padding row nobody names
        table = torch.cat([table, table.new_zeros((1, D))])
        pad_f = rows
    if wd is not None and not _plain(idx):
        # (under an outer vmap the check above cannot read the indices: an out-of-range one
        # would name another example's row, so send it past the table's end, where the
        # kernel raises)
        flat_idx = torch.where((idx < 0) | (idx >= V), table.shape[0], flat_idx)
    flat_off = (off[:, :nb] + ar * L).reshape(-1)
    out, o2b, bag_size, max_idx = op(table, flat_idx.reshape(-1), flat_off, sgbf, mode, sparse, psw_f, False, pad_f)
    out = out.reshape(B, nb, D)
    if mode == 0 and fast:
        o2b = o2b.new_zeros((B, 0))
    else:
        o2b = o2b.reshape(B, L) - ar * nb
    if mode == 0:
        n = n_off if op is aten._embedding_bag_forward_only.default else nb
        bag_size = torch.zeros((B, n), dtype=itype, device=idx.device)
    else:
        bag_size = bag_size.reshape(B, nb)
    if mode == 2:
        max_idx = max_idx.reshape(B, nb, D)
        if wd is not None:  # back to per-example rows (an empty bag keeps its 0)
            shift = (ar * V).reshape(B, 1, 1)
            max_idx = torch.where(max_idx >= shift, max_idx - shift, max_idx)
    else:
        max_idx = bag_size.clone()
    return (out, o2b, bag_size, max_idx), 0


def _fold_bag_indices(idx, B, V, pad, itype):
    """Example b's indices into a table of B*V rows (+ one dump row, B*V, for padding entries):
    (flat indices, number of rows, padding_idx of the folded call)."""
    ar = torch.arange(B, device=idx.device, dtype=itype).reshape(B, 1)
    flat = idx.to(itype) + ar * V
    if pad < 0:
        return flat.reshape(-1), B * V, -1
    flat = torch.where(idx == pad, torch.full((), B * V, dtype=itype, device=idx.device), flat)
    return flat.reshape(-1), B * V + 1, B * V


def _fold_bag_offsets(off, B, L, nb, itype):
    ar = torch.arange(B, device=off.device, dtype=itype).reshape(B, 1)
    return (off.to(itype)[:, :nb] + ar * L).reshape(-1)


def _fold_offset2bag(o2b, B, nb):
    if o2b.shape[1] == 0:  # (the 'sum' fast path left it empty: the backward rebuilds it from the offsets)
        return o2b.reshape(-1)
    ar = torch.arange(B, device=o2b.device, dtype=o2b.dtype).reshape(B, 1)
    return (o2b + ar * nb).reshape(-1)


@batch_rule(aten._embedding_bag_backward.default, aten._embedding_bag_dense_backward.default)
def embedding_bag_backward(op, args, kwargs, dims):
    # The grad of each example's table: one table of B*V rows, as the forward folds it.
    args, dims = _full_args(op, args, kwargs, dims)
    dense = op is aten._embedding_bag_dense_backward.default
    if dense:
        grad, idx, o2b, bag_size, max_idx, V, sgbf, mode, psw, pad = args
        off, sparse = None, False
        od = None
        gd, id_, o2d, bsd, mid, pd = dims[0], dims[1], dims[2], dims[3], dims[4], dims[8]
    else:
        grad, idx, off, o2b, bag_size, max_idx, V, sgbf, mode, sparse, psw, pad = args
        gd, id_, od, o2d, bsd, mid, pd = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[10]
    B = batch_size_of(args, dims)
    if sparse or rank(idx, id_) != 1 or rank(grad, gd) != 2:
        return _loop(op, args, dims, B)  # (sparse gradients; inputs the kernel rejects)
    grad = materialize(grad, gd, B)
    nb, D = grad.shape[1], grad.shape[2]
    idx = materialize(idx, id_, B)
    itype = idx.dtype if off is None else torch.promote_types(idx.dtype, off.dtype)
    L = idx.shape[1]
    o2b = materialize(o2b, o2d, B)
    if dense and o2b.shape[1] == 0 and L:
        return _loop(op, args, dims, B)  # (no offsets to rebuild offset2bag from)
    if sgbf and mode != 2:
        psw = None if psw is None else materialize(psw, pd, B)
        bag_size = materialize(bag_size, bsd, B)
        o2b = _bag_of_index(o2b, None if off is None else materialize(off, od, B), B, L, nb)
        return _bag_grad_by_freq(grad, idx, o2b, bag_size, V, mode, psw, pad), 0
    flat_idx, rows, pad_f = _fold_bag_indices(idx, B, V, pad, itype)
    bag_size = materialize(bag_size, bsd, B).reshape(-1)
    max_idx = materialize(max_idx, mid, B)
    if mode == 2:  # argmax rows of example b's table
        ar = torch.arange(B, device=max_idx.device, dtype=max_idx.dtype).reshape((B,) + (1,) * (max_idx.dim() - 1))
        max_idx = max_idx + ar * V
    max_idx = max_idx.reshape((-1,) + tuple(max_idx.shape[2:]))
    psw_f = None if psw is None else materialize(psw, pd, B).reshape(-1)
    o2b_f = _fold_offset2bag(o2b, B, nb)
    g = grad.reshape(B * nb, D)
    if dense:
        out = op(g, flat_idx, o2b_f, bag_size, max_idx, rows, sgbf, mode, psw_f, pad_f)
    else:
        off_f = _fold_bag_offsets(materialize(off, od, B), B, L, nb, itype)
        out = op(g, flat_idx, off_f, o2b_f, bag_size, max_idx, rows, sgbf, mode, False, psw_f, pad_f)
    return out[: B * V].reshape(B, V, D), 0


def _bag_of_index(o2b, off, B, L, nb):
    """Each index's bag, ``(B, L)``: offset2bag, or (where the forward left it empty) counted
    from the offsets."""
    if o2b.shape[1] == L:
        return o2b
    pos = torch.arange(L, device=off.device, dtype=off.dtype).expand(B, L).contiguous()
    return aten.searchsorted.Tensor(off[:, :nb].contiguous(), pos, right=True) - 1


def _bag_grad_by_freq(grad, idx, bag, bag_size, V, mode, psw, pad):
    """The table gradient of 'sum'/'mean' bags with scale_grad_by_freq, ``(B, V, D)``, computed
    by hand: the CPU kernel walks the sorted indices in groups of equal values and divides group
    number ``i`` by the frequency of ``sorted_indices[i]`` (not of the group's own value), which
    no fold of the examples into one call reproduces. Same arithmetic: the scale in double
    (per-sample weight / frequency / bag size), applied in the gradient's dtype."""
    B, nb, D = grad.shape
    L = idx.shape[1]
    idx = idx.long()
    srt = idx.sort(1).values
    first = torch.ones((B, 1), dtype=torch.bool, device=idx.device)
    group = torch.cat([first, srt[:, 1:] != srt[:, :-1]], 1).long().cumsum(1) - 1  # group of sorted[k]
    where = aten.searchsorted.Tensor(srt.contiguous(), idx.contiguous())  # first sorted position of idx[j]
    key = srt.gather(1, group.gather(1, where))  # sorted[group of idx[j]]
    counts = torch.zeros((B, V), dtype=torch.float64, device=idx.device).scatter_add(
        1, idx, torch.ones((), dtype=torch.float64, device=idx.device).expand(B, L))
    scale = 1.0 / counts.gather(1, key)
    if psw is not None:
        scale = psw.to(torch.float64) * scale
    bag = bag.long()
    if mode == 1:
        size = bag_size.reshape(B, -1).gather(1, bag.clamp(0, max(nb - 1, 0))).to(torch.float64)
        scale = torch.where(size != 0, scale / size, scale)
    keep = idx != pad
    contrib = grad.gather(1, bag.clamp(0, max(nb - 1, 0)).unsqueeze(-1).expand(B, L, D))
    contrib = torch.where(keep.unsqueeze(-1), contrib * scale.to(grad.dtype).unsqueeze(-1),
                          torch.zeros((), dtype=grad.dtype, device=grad.device))
    ar = torch.arange(B, device=idx.device).reshape(B, 1)
    out = torch.zeros((B * V, D), dtype=grad.dtype, device=grad.device)
    return out.index_add(0, (idx + ar * V).reshape(-1), contrib.reshape(B * L, D)).reshape(B, V, D)


@batch_rule(aten._embedding_bag_per_sample_weights_backward.default)
def embedding_bag_per_sample_weights_backward(op, args, kwargs, dims):
    # per index: grad[bag] . weight[index] (0 for padding): fold the bags and the tables
    args, dims = _full_args(op, args, kwargs, dims)
    grad, w, idx, off, o2b, mode, pad = args
    gd, wd, id_, od, o2d = dims[:5]
    B = batch_size_of(args, dims)
    if rank(idx, id_) != 1 or rank(grad, gd) != 2 or rank(w, wd) != 2:
        return _loop(op, args, dims, B)
    grad = materialize(grad, gd, B)
    nb, D = grad.shape[1], grad.shape[2]
    idx = materialize(idx, id_, B)
    itype = torch.promote_types(idx.dtype, off.dtype)
    L = idx.shape[1]
    if wd is not None:
        V = w.shape[1]
        flat_idx, rows, pad_f = _fold_bag_indices(idx, B, V, pad, itype)
        table = w.reshape(B * V, D)
        if rows > B * V:
            table = torch.cat([table, table.new_zeros((1, D))])
    else:
        table, flat_idx, pad_f = w, idx.to(itype).reshape(-1), pad
    off_f = _fold_bag_offsets(materialize(off, od, B), B, L, nb, itype)
    o2b_f = _fold_offset2bag(materialize(o2b, o2d, B), B, nb)
    out = op(grad.reshape(B * nb, D), table, flat_idx, off_f, o2b_f, mode, pad_f)
    return out.reshape(B, L), 0


# -- nll_loss ----------------------------------------------------------------------------------
# Computed on the physical tensors with gather/scatter: per-example reductions ('mean' divides
# by each example's own total weight) and batched class weights come out directly.


def _nll_parts(x, xd, target, td, weight, wd, ignore_index, B):
    x = materialize(x, xd, B)
    target = materialize(target, td, B)
    cdim = 1 if x.dim() == 2 else 2  # physical class dim: logical (C,) or (N, C, ...)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))
    if weight is None:
        wt = valid.to(x.dtype)
    else:
        if wd is None:
            wt = weight.index_select(0, safe.reshape(-1)).reshape(safe.shape)
        else:
            wt = weight.gather(1, safe.reshape(B, -1)).reshape(safe.shape)
        wt = wt * valid
    return x, safe, wt, cdim


def _per_example_sum(t):
    return t.reshape(t.shape[0], -1).sum(1)


@batch_rule(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
def nll_loss_forward(op, args, kwargs, dims):
    x, target, weight, reduction, ignore_index = args
    B = batch_size_of(args, dims)
    x, safe, wt, cdim = _nll_parts(x, dims[0], target, dims[1], weight, dims[2], ignore_index, B)
    loss = -x.gather(cdim, safe.unsqueeze(cdim)).squeeze(cdim) * wt
    if reduction == 0:  # none
        return (loss, torch.zeros((), dtype=x.dtype, device=x.device)), [0, None]
    total = _per_example_sum(wt)
    out = _per_example_sum(loss)
    if reduction == 1:  # mean
        out = out / total
    return (out, total), 0


@batch_rule(aten.nll_loss_backward.default, aten.nll_loss2d_backward.default)
def nll_loss_backward(op, args, kwargs, dims):
    go, x, target, weight, reduction, ignore_index, total_weight = args
    B = batch_size_of(args, dims)
    x, safe, wt, cdim = _nll_parts(x, dims[1], target, dims[2], weight, dims[3], ignore_index, B)
    r = safe.dim()  # physical rank of the per-element losses
    if reduction == 0:
        g = go if dims[0] is not None else go.unsqueeze(0)
    else:
        g = go.reshape((-1,) + (1,) * (r - 1))
        if reduction == 1:
            g = g / total_weight.reshape((-1,) + (1,) * (r - 1))
    val = -(wt * g).to(x.dtype)
    # ignored targets get no gradient even where grad_output is nan (an all-ignored 'mean'
    # batch has total weight 0): the kernel skips them rather than multiplying by weight 0
    valid = materialize(target, dims[2], B) != ignore_index
    val = torch.where(valid, val.expand(safe.shape), torch.zeros((), dtype=x.dtype, device=x.device))
    gi = torch.zeros_like(x).scatter(cdim, safe.unsqueeze(cdim), val.unsqueeze(cdim))
    return gi, 0


# -- multi_margin_loss, multilabel_margin_loss ----------------------------------------------
# Per-sample losses of a logical (N, C) or (C,) input: fold the batch into N, call the kernel
# with reduction='none' and reduce per example. (torch._decomp's multilabel_margin_loss_forward
# disagrees with the kernel, so it must not serve these ops.)


def _full_args(op, args, kwargs, dims):
    """Positional args (and their dims) with the schema's defaults filled in: dispatch drops
    trailing defaults."""
    args, dims = list(args), list(dims)
    for a in op._schema.arguments[len(args):]:
        if a.kwarg_only:
            break
        args.append(kwargs[a.name] if a.name in kwargs else a.default_value)
        dims.append(None)
    return args, dims


def _rows(t, d, B, C):
    """Materialize ``t`` and flatten a logical ``(N, C)``/``(C,)`` (or ``(N,)``/``()`` if C is None) batch."""
    t = materialize(t, d, B)
    return t.reshape(-1, C) if C is not None else t.reshape(-1)


def _margin_shapes(x, d, B):
    """(physical shape, number of classes C, physical shape of per-row losses) of a logical
    ``(N, C)``, ``(C,)`` or ``()`` input (a 0-dim input is one row of one class)."""
    shape = materialize(x, d, B).shape
    if rank(x, d) == 0:
        return shape, 1, shape
    return shape, shape[-1], shape[:-1]


def _reduce_rows(loss, B, reduction):
    """Per-row losses ``(B*N,)`` -> per-example losses for ``reduction``."""
    loss = loss.reshape(B, -1)
    if reduction == 1:
        return loss.mean(1)
    if reduction == 2:
        return loss.sum(1)
    return loss


def _row_grads(go, d, B, n, reduction):
    """The grad of each row's loss, ``(B*n,)``, from the per-example grad_output."""
    go = materialize(go, d, B)
    if reduction == 0:
        return go.reshape(-1)
    g = go.reshape(B, 1).expand(B, n)
    return (g / n if reduction == 1 else g).reshape(-1)


def _loop(op, args, dims, B):
    """One call per example, inside a rule: for rare corners a fold cannot express."""
    outs = [op(*[a.select(0, b) if d is not None else a for a, d in zip(args, dims)]) for b in range(B)]
    return torch.stack(outs), 0


@batch_rule(aten.multi_margin_loss.default)
def multi_margin_loss(op, args, kwargs, dims):
    args, dims = _full_args(op, args, kwargs, dims)
    x, target, p, margin, weight, reduction = args
    B = batch_size_of(args, dims)
    if dims[4] is not None:  # per-example class weights: no single kernel call takes them
        return _loop(op, args, dims, B)
    _, C, lead = _margin_shapes(x, dims[0], B)
    loss = op(_rows(x, dims[0], B, C), _rows(target, dims[1], B, None), p, margin, weight, 0)
    loss = _reduce_rows(loss, B, reduction)
    return (loss.reshape(lead) if reduction == 0 else loss), 0


@batch_rule(aten.multi_margin_loss_backward.default)
def multi_margin_loss_backward(op, args, kwargs, dims):
    args, dims = _full_args(op, args, kwargs, dims)
    go, x, target, p, margin, weight, reduction = args
    B = batch_size_of(args, dims)
    if dims[5] is not None:
        return _loop(op, args, dims, B)
    shape, C, _ = _margin_shapes(x, dims[1], B)
    xr = _rows(x, dims[1], B, C)
    g = _row_grads(go, dims[0], B, xr.shape[0] // B, reduction)
    gi = op(g, xr, _rows(target, dims[2], B, None), p, margin, weight, 0)
    return gi.reshape(shape), 0


@batch_rule(aten.multilabel_margin_loss_forward.default)
def multilabel_margin_loss_forward(op, args, kwargs, dims):
    x, target, reduction = args
    B = batch_size_of(args, dims)
    shape, C, lead = _margin_shapes(x, dims[0], B)
    loss, is_target = op(_rows(x, dims[0], B, C), _rows(target, dims[1], B, C), 0)
    loss = _reduce_rows(loss, B, reduction)
    return (loss.reshape(lead) if reduction == 0 else loss, is_target.reshape(shape)), 0


@batch_rule(aten.multilabel_margin_loss_backward.default)
def multilabel_margin_loss_backward(op, args, kwargs, dims):
    go, x, target, reduction, is_target = args
    B = batch_size_of(args, dims)
    shape, C, _ = _margin_shapes(x, dims[1], B)
    xr = _rows(x, dims[1], B, C)
    g = _row_grads(go, dims[0], B, xr.shape[0] // B, reduction)
    gi = op(g, xr, _rows(target, dims[2], B, C), 0, _rows(is_target, dims[4], B, C))
    return gi.reshape(shape), 0


# -- cdist, attention ------------------------------------------------------------------------


def _flat_lead(t, lead):
    """Expand ``t``'s leading dims to ``lead`` and flatten them into one."""
    return t.expand(tuple(lead) + t.shape[-2:]).reshape((-1,) + t.shape[-2:])


@batch_rule(aten._cdist_forward.default)
def cdist_forward(op, args, kwargs, dims):
    x1, x2 = args[0], args[1]
    B = batch_size_of(args, dims)
    x1, x2 = materialize(x1, dims[0], B), materialize(x2, dims[1], B)
    r = max(x1.dim(), x2.dim())
    x1, x2 = pad_to_rank(x1, 0, r - 1), pad_to_rank(x2, 0, r - 1)
    lead = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    out = op(_flat_lead(x1, lead), _flat_lead(x2, lead), *args[2:], **kwargs)
    return out.reshape(tuple(lead) + out.shape[-2:]), 0


@batch_rule(aten._cdist_backward.default)
def cdist_backward(op, args, kwargs, dims):
    grad, x1, x2, p, cdist = args
    B = batch_size_of(args, dims)
    grad, cdist = materialize(grad, dims[0], B), materialize(cdist, dims[4], B)
    lead = grad.shape[:-2]
    x1 = pad_to_rank(materialize(x1, dims[1], B), 0, len(lead) + 1)
    x2 = pad_to_rank(materialize(x2, dims[2], B), 0, len(lead) + 1)
    out = op(_flat_lead(grad, lead), _flat_lead(x1, lead), _flat_lead(x2, lead), p, _flat_lead(cdist, lead))
    return out.reshape(tuple(lead) + out.shape[-2:]), 0


def _check_pdist(x, p):
    if x.dim() != 3:
        raise RuntimeError(f"pdist only supports 2D tensors, got: {x.dim() - 1}D")
    if p < 0:
        raise RuntimeError("pdist only supports non-negative p values")


@batch_rule(aten._pdist_forward.default)
def pdist_forward(op, args, kwargs, dims):
    # the pairs i < j of each example's cdist, row-major (the order pdist lists them in);
    # compute_mode 2: the direct formula, never the matmul shortcut for p=2
    x = args[0]
    p = args[1] if len(args) > 1 else kwargs.get("p", 2.0)
    _check_pdist(x, p)
    n = x.shape[1]
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    return aten._cdist_forward.default(x, x, p, 2)[:, i, j], 0


@batch_rule(aten._pdist_backward.default)
def pdist_backward(op, args, kwargs, dims):
    # pdist(x)[k] = cdist(x, x)[i_k, j_k]: x gets the gradient of both of its roles, which is
    # cdist's backward (w.r.t. x1) of the symmetric grad G + G^T over the symmetric distances
    grad, x, p, dist = args
    B = batch_size_of(args, dims)
    grad, x, dist = (materialize(t, d, B) for t, d in zip((grad, x, dist), (dims[0], dims[1], dims[3])))
    _check_pdist(x, p)
    n = x.shape[1]
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    g = _sym_from_pairs(grad, n, i, j)
    d = _sym_from_pairs(dist, n, i, j)
    return aten._cdist_backward.default(g, x.contiguous(), x.contiguous(), p, d), 0


def _sym_from_pairs(v, n, i, j):
    """``(B, n(n-1)/2)`` values of the pairs i < j -> the symmetric ``(B, n, n)`` matrix (zero
    diagonal)."""
    B = v.shape[0]
    flat = v.new_zeros((B, n * n))
    idx = torch.cat([i * n + j, j * n + i]).expand(B, -1)
    return flat.scatter(1, idx, torch.cat([v, v], 1)).reshape(B, n, n)


def _fold_mask(kwargs, B, N, kwarg_dims=None):
    """attn_mask for the folded call. Per example it is (L, S) or broadcasts against
    (N, H, L, S) as a 4-d tensor; after folding, N becomes B*N. A batched mask (B, *mask)
    gives every example its own."""
    m = kwargs.get("attn_mask")
    if m is None:
        return kwargs
    if kwarg_dims and kwarg_dims.get("attn_mask") is not None:
        if m.dim() == 3:  # (B, L, S)
            m = m[:, None, None]
        if m.dim() == 5:
            m = m.expand((B, N) + m.shape[2:]).flatten(0, 1)
        return dict(kwargs, attn_mask=m)  # (anything else: let the kernel raise its error)
    if m.dim() == 4 and m.shape[0] != 1:
        return dict(kwargs, attn_mask=m.unsqueeze(0).expand((B,) + m.shape).flatten(0, 1))
    return kwargs


def _check_attention_dropout(dropout_p):
    """Attention with dropout is random. A rule is not told which vmap level runs it, so follow
    every live vmap level, as random factories do: 'different' everywhere -> the fold draws
    independently per example; otherwise raise."""
    if not dropout_p:
        return
    from ..batched import RandomnessError

    modes = {i.randomness for i in _core.interpreter_stack() if i.kind == "vmap"}
    if modes - {"different"}:
        raise RandomnessError(
            "vmap: scaled_dot_product_attention with dropout_p > 0 is random; under vmap it needs "
            "randomness='different' (each example draws its own dropout mask). randomness='same' "
            "cannot be honoured with batched inputs. Or pass dropout_p=0 (e.g. model.eval())."
        )


def _attention_batch(args, dims, kwargs, kwarg_dims, n):
    """Batch size and per-example N of an attention call whose first ``n`` args are tensors."""
    B = batch_size_of([*args[:n], kwargs.get("attn_mask")], [*dims[:n], (kwarg_dims or {}).get("attn_mask")])
    q, d = args[0], dims[0]
    return B, q.shape[1] if d is not None else q.shape[0]


@batch_rule(aten._scaled_dot_product_flash_attention_for_cpu.default, batched_kwargs=True)
def sdpa_flash_cpu(op, args, kwargs, dims, kwarg_dims=None):
    # the kernel takes (N, H, L, E): the batch joins N
    _check_attention_dropout(args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0))
    B, N = _attention_batch(args, dims, kwargs, kwarg_dims, 3)
    q, k, v = (materialize(t, d, B).flatten(0, 1) for t, d in zip(args[:3], dims[:3]))
    out, lse = op(q, k, v, *args[3:], **_fold_mask(kwargs, B, N, kwarg_dims))
    return (out.reshape((B, -1) + out.shape[1:]), lse.reshape((B, -1) + lse.shape[1:])), 0


@batch_rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default, batched_kwargs=True)
def sdpa_flash_cpu_backward(op, args, kwargs, dims, kwarg_dims=None):
    B, N = _attention_batch(args, dims, kwargs, kwarg_dims, 6)
    ts = [materialize(t, d, B).flatten(0, 1) for t, d in zip(args[:6], dims[:6])]
    grads = op(*ts, *args[6:], **_fold_mask(kwargs, B, N, kwarg_dims))
    return tuple(g.reshape((B, -1) + g.shape[1:]) for g in grads), 0


# -- recurrent layers ----------------------------------------------------------------------------
# torch's RNN/GRU/LSTM kernels (``_VF.rnn_tanh``, ``gru``, ``lstm``, the ``*_cell`` ops) are
# CompositeImplicit C++ loops that accumulate in place into ``linear(hidden, w_hh, b_hh)``:
# ``linear_hh(h).add_(linear_ih(x))``, and GRU's ``chunked_hgates[0].add_(...)``. When the
# initial hidden state is not batched (``nn.RNN`` makes it with ``torch.zeros`` when none is
# given) but the input or the weights are, that buffer is unbatched and the ``add_`` would write
# batched values into it. Giving the hidden state the batch of the other arguments (adding a
# zero that is batched at their levels) makes every step's buffer batched; values are unchanged.


def _batched_zero(tensors):
    """A 0-dim zero batched at every level where any of ``tensors`` is; None if none is wrapped."""
    zero = None
    for t in tensors:
        if isinstance(t, _core.LevelTensor):
            z = t.new_zeros(())
            zero = z if zero is None else zero + z
    return zero


def _rnn_entry(original, args, kwargs):
    if kwargs or len(args) < 3:
        return original(*args, **kwargs)
    name = original.__name__
    if name.endswith("_cell"):
        pos = 1
    else:  # the packed-sequence overloads take (data, batch_sizes, hx, params, ...)
        pos = 2 if isinstance(args[1], torch.Tensor) and (name == "lstm" or isinstance(args[2], torch.Tensor)) else 1
    flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
    zero = _batched_zero(flat)
    if zero is None:
        return original(*args, **kwargs)
    hx = args[pos]
    if isinstance(hx, (list, tuple)):
        hx = type(hx)(h + zero for h in hx)
    elif isinstance(hx, torch.Tensor):
        hx = hx + zero
    new = list(args)
    new[pos] = hx
    return original(*new, **kwargs)


for _rnn_name in ("rnn_tanh", "rnn_relu", "gru", "lstm", "rnn_tanh_cell", "rnn_relu_cell", "gru_cell", "lstm_cell"):
    _core.patch_while_active(torch._VF, _rnn_name, _rnn_entry)


# -- fractional max pooling ----------------------------------------------------------------------
# The backward ops fold the batch into N like the other pools; the forward also takes the
# per-(n, c) random samples (N', C, k), of which the kernel reads the first N rows (one row
# for an input without N).


def _fractional_max_pool(core):
    def rule(op, args, kwargs, dims):
        x, ksize, osize, samples = args
        B = batch_size_of(args, dims)
        x = materialize(x, dims[0], B)
        has_n = x.dim() - 1 > core
        # the kernel reads the first N rows of the samples (the first row without N)
        s = materialize(samples, dims[3], B)[:, : x.shape[1] if has_n else 1].flatten(0, 1)
        out, idx = op(x.flatten(0, 1) if has_n else x, ksize, osize, s)
        if has_n:
            out, idx = (t.reshape(x.shape[:2] + t.shape[1:]) for t in (out, idx))
        return (out, idx), 0

    return rule


batch_rule(aten.fractional_max_pool2d.default)(_fractional_max_pool(3))
batch_rule(aten.fractional_max_pool3d.default)(_fractional_max_pool(4))
batch_rule(aten.fractional_max_pool2d_backward.default)(fold_into_n(3))
batch_rule(aten.fractional_max_pool3d_backward.default)(fold_into_n(4))


# -- _trilinear (nn.Bilinear) ---------------------------------------------------------------------


@batch_rule(aten._trilinear.default)
def trilinear(op, args, kwargs, dims):
    # every input is unsqueezed at its expand dims to one common rank, multiplied and summed
    # over sumdim: with the batch dim in front of each, every listed dim moves up by one
    args, dims = _full_args(op, args, kwargs, dims)
    B = batch_size_of(args, dims)
    i1, i2, i3 = (materialize(t, d, B) for t, d in zip(args[:3], dims[:3]))
    up = lambda ds: [d + 1 for d in ds]  # noqa: E731  (the lists hold non-negative dims)
    return op(i1, i2, i3, up(args[3]), up(args[4]), up(args[5]), up(args[6]), args[7] + 1), 0


# -- CTC loss ----------------------------------------------------------------------------------------
# Each example's (T, N, C) log-probs join the N sequences of one kernel call, (T, B*N, C); the
# targets (padded (N, S) or concatenated (sum of lengths,)) and lengths follow in the same
# (example, sequence) order.


def _ctc_fold(args, dims, B, lp_pos):
    """Folded (log_probs, targets, input_lengths, target_lengths) and N.

    With per-example target lengths the kernel sizes log_alpha (N, T, 2*max_len+1) by the
    longest target of the whole batch rather than of each example: log_alpha is only read
    by the backward (which folds the same way), and the losses do not depend on it."""
    lp, tg, il, tl = args[lp_pos:lp_pos + 4]
    ld, td, ild, tld = dims[lp_pos:lp_pos + 4]
    lp = materialize(lp, ld, B)  # (B, T, N, C)
    N = lp.shape[2]
    lp = lp.movedim(0, 1).flatten(1, 2)
    tg = materialize(tg, td, B).flatten(0, 1)  # (B, N, S) -> (B*N, S); (B, L) -> (B*L,)
    if isinstance(il, torch.Tensor):
        il = materialize(il, ild, B).reshape(-1)
        tl = materialize(tl, tld, B).reshape(-1)
    else:
        il, tl = list(il) * B, list(tl) * B
    return lp, tg, il, tl, N


@batch_rule(aten._ctc_loss.default, aten._ctc_loss.Tensor)
def ctc_loss(op, args, kwargs, dims):
    args, dims = _full_args(op, args, kwargs, dims)
    B = batch_size_of(args, dims)
    lp, tg, il, tl, N = _ctc_fold(args, dims, B, 0)
    nll, alpha = op(lp, tg, il, tl, *args[4:])
    return (nll.reshape(B, N), alpha.reshape((B, N) + alpha.shape[1:])), 0


@batch_rule(aten._ctc_loss_backward.default, aten._ctc_loss_backward.Tensor)
def ctc_loss_backward(op, args, kwargs, dims):
    args, dims = _full_args(op, args, kwargs, dims)
    B = batch_size_of(args, dims)
    lp, tg, il, tl, N = _ctc_fold(args, dims, B, 1)
    grad, nll, alpha = (materialize(t, d, B).flatten(0, 1) for t, d in zip(
        (args[0], args[5], args[6]), (dims[0], dims[5], dims[6])))
    out = op(grad, lp, tg, il, tl, nll, alpha, *args[7:])
    return out.reshape((out.shape[0], B, N) + out.shape[2:]), 1
