"""Normalization rules: layer norm, group norm and batch norm (batch statistics as per-channel statistics of B*C channels; running statistics shared by the batch).

instance_norm, rms_norm and local_response_norm are CompositeImplicit: they arrive as
batch norm or as pointwise/reduction ops.
"""

from __future__ import annotations

import torch

from .. import _core
from ._registry import (flat_examples, batch_rule, batch_size_of, materialize, pad_to_rank, rank, full_args,
                        batch_into_channels, unbatch_channels, differentiated)

aten = torch.ops.aten


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
    return flat_examples(t, B), 0


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


def _below_version_counter():
    """The block's in-place writes skip the version counter, as batch norm's kernels update
    the running statistics: autograd saved them for the backward (which in training mode
    does not read them), so a counted write would make that backward refuse to run. (A rule
    usually runs with the counting key off anyway; not where autograd records on the physical
    values.)"""
    return torch._C._AutoDispatchBelowADInplaceOrView()


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
        if differentiated(x):
            # (differentiated: torch's derivative of _batch_norm_with_update refuses weight=None,
            # "Expected a proper Tensor but got None for argument #2 'weight'", in plain torch too)
            like = stats[0] if stats[0] is not None else x
            new[1] = torch.ones(x.shape[1], dtype=like.dtype, device=x.device)
            new[2] = torch.zeros(x.shape[1], dtype=like.dtype, device=x.device)
        priv = [torch.zeros_like(t) if t is not None else None for t in stats]
        new[rpos], new[rpos + 1] = priv
        out = list(op(*new))
        spatial = x.dim() - 2
        out[0] = _affine(out[0].unsqueeze(0), _per_channel(w, dims[1], spatial), _per_channel(b, dims[2], spatial))
        per_example = [None if p is None else p.unsqueeze(0).expand((B,) + p.shape) for p in priv]
        out_dims = [0] + [None] * (len(out) - 1)
        res = tuple(out)
    else:
        new[0] = batch_into_channels(x, True)
        new[1], new[2] = _fold_channels(w, dims[1], B), _fold_channels(b, dims[2], B)
        priv = [None if t is None else t.new_zeros((B * t.shape[0],)) for t in stats]
        new[rpos], new[rpos + 1] = priv
        out = op(*new)
        per_example = [None if p is None else flat_examples(p, B) for p in priv]
        y, y_dim = unbatch_channels(out[0], B, True)
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
            with _below_version_counter():  # (as the kernel's own update: see _below_version_counter)
                r.copy_(upd.to(r.dtype))
    return res, out_dims


@batch_rule(*_BN)
def batch_norm(op, args, kwargs, dims):
    rpos, tpos, functional = _BN[op]
    training = tpos if isinstance(tpos, bool) else args[tpos]
    B = batch_size_of(args, dims)
    if kwargs:
        args, dims = full_args(op, args, kwargs, dims)  # (defaults only: no tensors in kwargs)
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
    new[0] = batch_into_channels(materialize(x, xd, B), True)
    new[1], new[2] = _fold_channels(w, dims[1], B), _fold_channels(b, dims[2], B)
    if rpos is not None:
        for j in range(2):
            new[rpos + j] = _fold_channels(stats[j], sdims[j], B)
            if updates:  # reshape may have copied: update a private copy, written back below
                new[rpos + j] = new[rpos + j].clone()
    out = op(*new, **kwargs)
    if updates:
        with _below_version_counter():
            for j in range(2):
                stats[j].copy_(new[rpos + j].reshape(stats[j].shape))
    y, y_dim = unbatch_channels(out[0], B, True)
    res, out_dims = [y], [y_dim]
    for t in out[1:]:
        t, d = _unfold_stat(t, B)
        res.append(t)
        out_dims.append(d)
    return tuple(res), out_dims


def batch_norm_module_entry(original, args, kwargs):
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



@batch_rule(aten.native_batch_norm_backward.default, aten.batch_norm_backward.default)
def batch_norm_backward(op, args, kwargs, dims):
    B = batch_size_of(args, dims)
    new = list(args)
    new[0] = batch_into_channels(materialize(args[0], dims[0], B), True)
    new[1] = batch_into_channels(materialize(args[1], dims[1], B), True)
    for i in range(2, 7):  # weight, running_mean, running_var, save_mean, save_invstd/var
        new[i] = _fold_channels(args[i], dims[i], B)
    if len(args) > 10 and dims[10] is not None:  # batch_norm_backward's reserve (empty on CPU)
        new[10] = args[10].reshape(-1)
    gi, gw, gb = op(*new, **kwargs)
    gi_dim = None
    if gi is not None:
        gi, gi_dim = unbatch_channels(gi, B, True)
    gw = None if gw is None else flat_examples(gw, B)
    gb = None if gb is None else flat_examples(gb, B)
    return (gi, gw, gb), [gi_dim, 0, 0]
