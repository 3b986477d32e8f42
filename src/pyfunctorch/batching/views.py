"""Views, reshapes and joins: shift logical dims past the batch dim."""

from __future__ import annotations

import math

import torch

from ._registry import flat_examples, batch_rule, check_example, overloads, per_example_checked, batch_size_of, materialize, pad_to_rank, physical_dim, rank, wrap_dim

aten = torch.ops.aten


def _example_size(size, x):
    """``size`` with its -1 resolved from one example's number of elements: with an empty
    batch the physical tensor has 0 elements, which leaves -1 ambiguous for the batch."""
    size = tuple(size)
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        if known:  # (known == 0: ambiguous per example too; the op raises as the loop does)
            i = size.index(-1)
            size = size[:i] + (math.prod(x.shape[1:]) // known,) + size[i + 1:]
    return size


@batch_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten._reshape_alias.default,
            aten.view_copy.default)
def view(op, args, kwargs, dims):
    x, size = args[0], _example_size(args[1], args[0])
    if op is aten._reshape_alias.default or op is aten._unsafe_view.default:
        # (composites apply _unsafe_view to tensors they just computed: contiguous per example
        # in the loop, while the physical value may keep a permuted batch layout)
        return x.reshape((x.shape[0],) + tuple(size)), 0
    if op is aten.view.default and not x.is_contiguous():
        try:
            return x.view((x.shape[0],) + tuple(size)), 0
        except RuntimeError:
            # the physical layout refuses: so does each example's (its error), unless the
            # example's own layout allows the view (then a copy of the batch)
            check_example(op, args, kwargs, dims)
        return x.reshape((x.shape[0],) + tuple(size)), 0
    return op(x, (x.shape[0],) + tuple(size)), 0


@batch_rule(aten.view.dtype)
def view_dtype(op, args, kwargs, dims):
    return op(*args, **kwargs), 0


@batch_rule(aten.expand.default, aten.expand_copy.default)
def expand(op, args, kwargs, dims):
    x, size = args[0], tuple(args[1])
    x = pad_to_rank(x, 0, len(size))
    return op(x, (x.shape[0],) + size, *args[2:], **kwargs), 0


@batch_rule(aten.permute.default, aten.permute_copy.default)
def permute(op, args, kwargs, dims):
    x, perm = args[0], args[1]
    r = rank(x, 0)
    if len(perm) != r:
        raise RuntimeError("permute(sparse_coo): number of dimensions in the tensor input does not match the "
                           f"length of the desired ordering of dimensions i.e. input.dim() = {r} is not equal to "
                           f"len(dims) = {len(perm)}")
    return op(x, [0] + [wrap_dim(d, r) + 1 for d in perm]), 0


@batch_rule(aten.transpose.int, aten.transpose_copy.int, aten.transpose_.default)
def transpose(op, args, kwargs, dims):
    x, d0, d1 = args
    r = rank(x, 0)
    if r == 0:  # torch allows transpose(0, -1) of a scalar: the identity
        physical_dim(d0, r), physical_dim(d1, r)  # (still validates the dims)
        return (x if op is aten.transpose_.default else x.view(x.shape)), 0
    return op(x, physical_dim(d0, r), physical_dim(d1, r)), 0


@batch_rule(aten.t.default, aten.t_copy.default, aten.t_.default)
@per_example_checked  # (t refuses more than 2 dims)
def t(op, args, kwargs, dims):
    x = args[0]
    if rank(x, 0) < 2:
        return x if op is not aten.t_.default else x, 0
    if op is aten.t_.default:
        return x.transpose_(1, 2), 0
    return x.transpose(1, 2), 0


@batch_rule(aten.unsqueeze.default, aten.unsqueeze_copy.default, aten.unsqueeze_.default)
def unsqueeze(op, args, kwargs, dims):
    x, d = args
    return op(x, wrap_dim(d, rank(x, 0) + 1) + 1), 0


@batch_rule(aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze_copy.default,
            aten.squeeze_copy.dim, aten.squeeze_copy.dims, aten.squeeze_.default, aten.squeeze_.dim,
            aten.squeeze_.dims)
def squeeze(op, args, kwargs, dims):
    x = args[0]
    r = rank(x, 0)
    if len(args) == 1:
        pdims = [i + 1 for i in range(r) if x.shape[i + 1] == 1]
    else:
        ds = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        if r == 0:
            for d in ds:
                wrap_dim(d, 0)  # torch accepts 0 and -1 on a scalar (validates the rest)
        pdims = [physical_dim(d, r) for d in ds] if r > 0 else []
    name = "squeeze_" if op._schema.is_mutable else "squeeze"
    return getattr(x, name)(pdims) if pdims else (x if name == "squeeze" else x), 0


@batch_rule(aten.select.int, aten.select_copy.int)
def select(op, args, kwargs, dims):
    x, d, i = args
    return op(x, physical_dim(d, rank(x, 0)), i), 0


@batch_rule(aten.slice.Tensor, aten.slice_copy.Tensor)
def slice_(op, args, kwargs, dims):
    x = args[0]
    d = args[1] if len(args) > 1 else kwargs.pop("dim", 0)
    return op(x, physical_dim(d, rank(x, 0)), *args[2:], **kwargs), 0


@batch_rule(aten.narrow.default, aten.narrow_copy.default)
def narrow(op, args, kwargs, dims):
    x, d = args[0], args[1]
    return op(x, physical_dim(d, rank(x, 0)), *args[2:]), 0


@batch_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.unsafe_split.Tensor,
            aten.unsafe_split_with_sizes.default, aten.split_copy.Tensor, aten.split_with_sizes_copy.default,
            aten.chunk.default, aten.unsafe_chunk.default, aten.tensor_split.sections, aten.tensor_split.indices)
def split(op, args, kwargs, dims):
    x, size = args[0], args[1]
    if rank(x, 0) == 0:  # the op's own error ("split expects at least a 1-dimensional tensor")
        check_example(op, args, kwargs, dims, kernel=True)
    d = args[2] if len(args) > 2 else kwargs.pop("dim", 0)
    return op(x, size, physical_dim(d, rank(x, 0)), **kwargs), 0


@batch_rule(aten.unbind.int, aten.unbind_copy.int)
def unbind(op, args, kwargs, dims):
    x = args[0]
    d = args[1] if len(args) > 1 else kwargs.pop("dim", 0)
    return op(x, physical_dim(d, rank(x, 0))), 0


@batch_rule(aten.movedim.int)
def movedim(op, args, kwargs, dims):
    x, s, d = args
    r = rank(x, 0)
    return op(x, physical_dim(s, r), physical_dim(d, r)), 0


@batch_rule(aten.diagonal.default, aten.diagonal_copy.default)
def diagonal(op, args, kwargs, dims):
    x = args[0]
    offset = args[1] if len(args) > 1 else kwargs.get("offset", 0)
    d1 = args[2] if len(args) > 2 else kwargs.get("dim1", 0)
    d2 = args[3] if len(args) > 3 else kwargs.get("dim2", 1)
    r = rank(x, 0)
    return op(x, offset, physical_dim(d1, r), physical_dim(d2, r)), 0


@batch_rule(aten.diag_embed.default)
def diag_embed(op, args, kwargs, dims):
    x = args[0]
    offset = args[1] if len(args) > 1 else kwargs.get("offset", 0)
    d1 = args[2] if len(args) > 2 else kwargs.get("dim1", -2)
    d2 = args[3] if len(args) > 3 else kwargs.get("dim2", -1)
    r = rank(x, 0) + 1
    return op(x, offset, physical_dim(d1, r), physical_dim(d2, r)), 0


@batch_rule(aten.cat.default)
def cat(op, args, kwargs, dims):
    tensors, tdims = args[0], dims[0]
    d = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    B = batch_size_of([tensors], [tdims])
    if any(rank(t, e) == 0 for t, e in zip(tensors, tdims)):  # torch's own error
        check_example(op, args, kwargs, dims, kernel=True)
    # legacy: 1-d empty tensors are skipped by cat whatever their rank
    keep = [(t, e) for t, e in zip(tensors, tdims) if not (rank(t, e) == 1 and t.shape[-1] == 0 and t.numel() == 0)]
    if not keep:
        return op([materialize(t, e, B) for t, e in zip(tensors, tdims)], 1), 0
    r = rank(keep[0][0], keep[0][1])
    return op([materialize(t, e, B) for t, e in keep], physical_dim(d, r)), 0


@batch_rule(aten.stack.default)
def stack(op, args, kwargs, dims):
    tensors, tdims = args[0], dims[0]
    d = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    B = batch_size_of([tensors], [tdims])
    r = rank(tensors[0], tdims[0]) + 1
    return op([materialize(t, e, B) for t, e in zip(tensors, tdims)], physical_dim(d, r)), 0


@batch_rule(aten.repeat.default)
def repeat(op, args, kwargs, dims):
    x, reps = args[0], tuple(args[1])
    x = pad_to_rank(x, 0, len(reps))
    return op(x, (1,) + reps), 0


@batch_rule(aten.flip.default)
def flip(op, args, kwargs, dims):
    x, ds = args
    r = rank(x, 0)
    return op(x, [physical_dim(d, r) for d in ds]), 0


@batch_rule(aten.roll.default)
def roll(op, args, kwargs, dims):
    x, shifts = args[0], args[1]
    ds = args[2] if len(args) > 2 else kwargs.get("dims", [])
    r = rank(x, 0)
    if not ds:
        B = x.shape[0]
        return op(flat_examples(x, B), shifts, [1]).reshape(x.shape), 0
    return op(x, shifts, [physical_dim(d, r) for d in ds]), 0


@batch_rule(aten.unfold.default)
def unfold(op, args, kwargs, dims):
    x, d, size, step = args
    r = rank(x, 0)
    if r == 0:  # a scalar unfolds as a 1-element dim: shape (size,) == (1,)
        physical_dim(d, r)
        return flat_examples(op(x.unsqueeze(1), 1, size, step)), 0
    return op(x, physical_dim(d, r), size, step), 0


@batch_rule(*overloads(aten.to), aten._to_copy.default, aten.type_as.default,
            aten.alias.default, aten.detach.default, aten.lift_fresh.default, aten.contiguous.default)
def trailing_only(op, args, kwargs, dims):
    """Ops that only touch trailing dims (or none): the batch dim rides along."""
    return op(*args, **kwargs), 0


# (tril/triu need 2 dims per example: the batch dim must not count as one)
batch_rule(aten.tril.default, aten.triu.default, aten.tril_.default, aten.triu_.default)(
    per_example_checked(trailing_only))


@batch_rule(aten.as_strided.default, aten.as_strided_.default)
def as_strided(op, args, kwargs, dims):
    # Each example's storage starts one batch stride after the previous one (true for every
    # batched value this library allocates), so per-example as_strided(size, stride, offset)
    # is physical as_strided with the batch stride prepended. (as_strided_: in place; the
    # dispatcher hands the rule a fresh view to restride.)
    x, size, stride = args[0], tuple(args[1]), tuple(args[2])
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", None)
    if offset is None:
        offset = x.storage_offset()
    restride = x.as_strided_ if op is aten.as_strided_.default else x.as_strided
    return restride((x.shape[0],) + size, (x.stride(0),) + stride, offset), 0


def _storage_change_error(op, what):
    return RuntimeError(
        f"vmap: {op} {what} inside vmap is not supported: each example would need storage of its own, "
        "which one batched tensor cannot hold (and running it per example would leave the batch "
        "unchanged). Nothing was modified. Use an out-of-place op instead (`x = x.new_empty(size)`, "
        "`x = x.reshape(size)`, `x = src.clone()`)."
    )


@batch_rule(aten.resize_.default, aten.resize_as_.default)
def resize_(op, args, kwargs, dims):
    # a resize to the shape the example already has changes nothing (out= paths do this)
    x = args[0]
    if dims[0] is None:
        from ..errors import batched_write_error
        raise batched_write_error(op)
    if op is aten.resize_.default:
        size = tuple(args[1])
    else:
        size = tuple(args[1].shape[1:] if dims[1] is not None else args[1].shape)
    if size == tuple(x.shape[1:]):
        return x, 0
    if x.shape[0] and x.select(0, 0).is_contiguous() and math.prod(size) <= math.prod(x.shape[1:]):
        # shrinking a contiguous example keeps its first elements in place: a restride
        strides = [1] * len(size)
        for i in range(len(size) - 2, -1, -1):
            strides[i] = strides[i + 1] * max(size[i + 1], 1)
        return x.as_strided_((x.shape[0],) + size, (x.stride(0),) + tuple(strides), x.storage_offset()), 0
    raise _storage_change_error(op, f"to a new shape {size} (from {tuple(x.shape[1:])}) that needs more "
                                    "memory per example, or of a non-contiguous example,")


@batch_rule(*overloads(aten.set_))
def set_(op, args, kwargs, dims):
    raise _storage_change_error(op, "(pointing a tensor at another storage)")
