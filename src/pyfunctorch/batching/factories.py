"""Factory rules: ``new_*`` on a batched self (one fresh tensor per example) and the forward-AD tangent allocator."""

from __future__ import annotations

import torch

from ._registry import batch_rule, batch_size_of, materialize

aten = torch.ops.aten


# -- new_* factories on a batched self: one fresh tensor per example ------------------------
# (torch internals allocate buffers this way and then write batched data into them, e.g.
# autograd's CopySlices: `grad.new_empty_strided(...)` then `.copy_(grad)`)


def _example_span(size, stride) -> int:
    return 1 + sum((n - 1) * st for n, st in zip(size, stride)) if all(n > 0 for n in size) else 0


@batch_rule(aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
            aten.new_empty_strided.default)
def new_factory(op, args, kwargs, dims):
    x, size = args[0], tuple(args[1])
    B = x.shape[0]
    if op is aten.new_empty_strided.default:
        stride = tuple(args[2])
        return op(x, (B,) + size, (max(_example_span(size, stride), 1),) + stride, **kwargs), 0
    return op(x, (B,) + size, *args[2:], **kwargs), 0


@batch_rule(aten._new_zeros_with_same_feature_meta.default)
def new_zeros_with_same_feature_meta(op, args, kwargs, dims):
    # zeros of shape self.shape[:n] + other.shape with other's strides (forward AD allocates
    # tangents this way): the batch dim becomes one more leading "batch" dim of self.
    self_, other = args
    B = batch_size_of(args, dims)
    n = kwargs.get("self_num_batch_dims", 0)
    feature = other  # per-example strides:
    if dims[1] is not None:
        feature = other.select(0, 0) if B else torch.empty_strided(  # (an empty batch has no example 0)
            other.shape[1:], other.stride()[1:], dtype=other.dtype, device=other.device)
    return op(materialize(self_, dims[0], B), feature, self_num_batch_dims=n + 1), 0
