"""Convolution and pooling rules: conv (batched weights as groups), and the batch-into-N fold for pooling, padding, upsampling, im2col and fractional max pooling.

Most rules here fold the batch into an existing dim, so one call of the aten kernel
serves the whole batch:

* **batch into N** (``fold_into_n``): ops on ``(N, C, *spatial)`` tensors treat
  every ``(n, c)`` plane independently, so a physical ``(B, N, C, ...)`` is run
  as ``(B*N, C, ...)`` and the result unflattened. A logical input without an
  N dim (``(C, H, W)``, which most of these ops accept) simply uses B as N.
* **batch into groups** (convolution with batched weights): a per-example weight
  becomes B groups of ``groups`` each (``groups * B``).

CompositeImplicit functions never reach dispatch: max_pool1d, avg_pool1d and the
adaptive 1d pools arrive as the 2d ops handled here.
"""

from __future__ import annotations

import torch

from .. import _core
from ._registry import flat_examples, batch_rule, batch_size_of, functional_overloads as _ops, map_outputs as _map, materialize, rank, batch_into_channels, unbatch_channels, per_example_checked, check_example, plain_apply, shared_by_examples

aten = torch.ops.aten


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
        r = rank(first, dims[tpos[0]])
        if not core <= r <= core + 1:  # (the batch dim must not stand in for N or C)
            check_example(op, args, kwargs, dims)  # the op's own error for one example
        has_n = r > core
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
@per_example_checked  # (each example needs the op's minimum rank: the batch dim must not count)
def trailing_dims(op, args, kwargs, dims):
    """Ops that touch only trailing dims and accept any number of leading ones: the batch
    dim rides along (constant_pad_nd's decomposition would write into an unbatched buffer)."""
    return op(*args, **kwargs), 0


def circular_pad_entry(original, args, kwargs):
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



# -- convolution --------------------------------------------------------------------------






class _SharedFilters(torch.autograd.Function):
    """A convolution of a physical batch ``x`` (batch in front) with filters ``w`` (B, O, C/g,
    *K) whose examples are one filter bank (batch stride 0), and a bias ``b`` (B, O) shared the
    same way or None: the forward is one convolution with the batch in N (the bias inside it),
    as for unbatched filters; the filters' and the bias's gradients are per example (B groups,
    as for per-example filters; the output gradient summed per example), the input's one
    convolution again."""

    @staticmethod
    def forward(ctx, x, w, b, rest, groups, has_n):
        ctx.save_for_backward(x, w)
        ctx.rest, ctx.groups, ctx.has_n = rest, groups, has_n
        xf = x.flatten(0, 1) if has_n else x
        out = aten.convolution.default(xf, w[0], None if b is None else b[0], *rest, groups)
        return out.reshape(x.shape[:2] + out.shape[1:]) if has_n else out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        rest, groups, has_n = ctx.rest, ctx.groups, ctx.has_n
        B = w.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # each example's bias gradient: its output gradient summed over N and the spatial dims
        gb = g.sum([1] + list(range(3, g.dim())) if has_n else list(range(2, g.dim()))) if need_b else None

        def per_example_filters(mask):  # (B groups: the convolution_backward rule's per-example filters)
            gi, gw, _ = aten.convolution_backward.default(
                batch_into_channels(g, has_n), batch_into_channels(x, has_n), w.flatten(0, 1), None, *rest,
                groups * B, mask + [False])
            gi = None if gi is None else unbatch_channels(gi, B, has_n)[0].movedim(int(has_n), 0)
            return gi, None if gw is None else gw.reshape(w.shape)

        if torch.is_grad_enabled():  # (a graph recorded: through the per-example filters throughout)
            return (*per_example_filters([need_x, need_w]), gb, None, None, None)
        gi = gw = None
        if need_x:
            gf, xf = (g.flatten(0, 1), x.flatten(0, 1)) if has_n else (g, x)
            gi = aten.convolution_backward.default(gf, xf, w[0], None, *rest, groups, [True, False, False])[0]
            gi = gi.reshape(x.shape)
        if need_w:
            gw = per_example_filters([False, True])[1]
        return gi, gw, gb, None, None, None


_shared_filters = plain_apply(_SharedFilters)


def _plus_example_bias(out, bias, has_n: bool, k: int):
    """``out`` (B, [N,] O, *spatial) plus each example's bias ``bias`` (B, O)."""
    return out + bias.reshape((bias.shape[0],) + (1,) * int(has_n) + (-1,) + (1,) * k)


@batch_rule(aten.convolution.default)
def convolution(op, args, kwargs, dims):
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    xd, wd, bd = dims[0], dims[1], dims[2]
    B = batch_size_of(args, dims)
    k = rank(w, wd) - 2  # spatial dims
    has_n = rank(x, xd) == k + 2
    rest = (stride, padding, dilation, transposed, output_padding)
    if wd is not None and not transposed and type(x) is torch.Tensor and shared_by_examples(w):
        # filters shared by every example, differentiated per example (per-sample gradients:
        # reverse._Shadow expands them along the batch)
        b = None if bias is None else materialize(bias, bd, B)
        if b is not None and not shared_by_examples(b):  # (a per-example or constant bias: added after)
            out = _shared_filters(materialize(x, xd, B), w, None, rest, groups, has_n)
            return _plus_example_bias(out, b, has_n, k), 0
        return _shared_filters(materialize(x, xd, B), w, b, rest, groups, has_n), 0
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
            out = _plus_example_bias(out, bias, has_n, k)
        return out, 0
    # per-example filters (model ensembling): B*groups groups over B*C input channels.
    # Weight (B, O, C/g, *K) -> (B*O, C/g, *K); transposed (B, C, O/g, *K) -> (B*C, O/g, *K):
    # either way the channel order (b, group, ...) lines up with the folded input.
    xg = batch_into_channels(materialize(x, xd, B), has_n)
    bg = None if bias is None else materialize(bias, bd, B).flatten()
    out = op(xg, w.flatten(0, 1), bg, *rest, groups * B)
    return unbatch_channels(out, B, has_n)


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
    gi, gw, gb = op(batch_into_channels(go, has_n), batch_into_channels(x, has_n), wg, bsz, *rest, groups * B, mask)
    gi_dim = None
    if gi is not None:
        gi, gi_dim = unbatch_channels(gi, B, has_n)
    if gw is not None:
        gw = gw.reshape((B, -1) + gw.shape[1:])
    if gb is not None:
        gb = flat_examples(gb, B)
    return (gi, gw, gb), [gi_dim, 0, 0]

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


# cuDNN's convolution kernels are reached only when a CompositeImplicit caller picks them for a
# wrapper (torch's own ``convolution`` dispatches them on plain tensors, below vmap): they are
# ``convolution`` without a bias, so that rule serves them.


@batch_rule(aten.cudnn_convolution.default)
def cudnn_convolution(op, args, kwargs, dims):
    x, w, padding, stride, dilation, groups = args[:6]
    k = w.dim() - 2 - (dims[1] is not None)
    return convolution(aten.convolution.default, [x, w, None, stride, padding, dilation, False, [0] * k, groups],
                       {}, [dims[0], dims[1]] + [None] * 7)


@batch_rule(aten.cudnn_convolution_transpose.default)
def cudnn_convolution_transpose(op, args, kwargs, dims):
    x, w, padding, output_padding, stride, dilation, groups = args[:7]
    return convolution(aten.convolution.default, [x, w, None, stride, padding, dilation, True, output_padding, groups],
                       {}, [dims[0], dims[1]] + [None] * 7)
