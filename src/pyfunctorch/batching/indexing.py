"""Indexing: index, index_put, gather, scatter, index_select/add/copy/fill, masked_scatter,
take/put, searchsorted/bucketize, and the backward/scatter forms of views.

Most rules reduce to two tricks:

* **dim ops** (gather, scatter, index_add ...): give every tensor a batch dim at the front
  (``materialize``) and shift ``dim`` past it. An index that is batched while the op wants
  one shared 1-d index (index_select, index_add, index_copy ...) becomes a gather/scatter
  index by viewing it along ``dim`` and expanding it to the source's shape.
* **advanced indexing** (``aten.index``, ``index_put``): index the batch-first self with a
  leading ``arange(B)`` index that broadcasts against the batched indices, so example ``b``
  only reads/writes its own slice; then undo numpy's "advanced dims go first/in place"
  reordering with one permutation (``_IndexPlan``).
"""

from __future__ import annotations


import math

import torch

from ..errors import batched_write_error
from ._registry import flat_examples, normalize_args, check_example, loop_examples, batch_rule, batch_size_of, materialize, pad_to_rank, per_example_signal, physical_dim, rank

aten = torch.ops.aten


# -- shared helpers ---------------------------------------------------------------------




def _is_inplace(op) -> bool:
    return op._schema.is_mutable


def _data_dependent(op):
    """The per-example results of ``op`` differ in shape: the function runs once per example."""
    return per_example_signal(
        f"vmap: {op} gives results of different shapes for different examples (a batched boolean "
        "mask selects a different number of elements per example); a batched tensor needs one shape.")


def _dim_index(index: torch.Tensor, d: int, shape) -> torch.Tensor:
    """A batched 1-d index ``(B, k)`` viewed along physical dim ``d`` and expanded to ``shape``
    (``shape[d] == k``): turns index_select/index_add/index_copy into gather/scatter."""
    view = [1] * len(shape)
    view[0], view[d] = index.shape[0], index.shape[1]
    return index.reshape(view).expand(shape)


def _batched_1d_index(index, d, B):
    """Batch-first ``(B, k)`` form of a (0-d or 1-d) logical index."""
    return flat_examples(materialize(index, d, B), B)


def _shape_with(shape, d, k):
    shape = list(shape)
    shape[d] = k
    return shape


# -- advanced indexing: aten.index / index_put --------------------------------------------


def _is_mask(t) -> bool:
    return t is not None and t.dtype in (torch.bool, torch.uint8)


def _expand_masks(op, indices, idims, B):
    """Replace each k-dim boolean mask by the k long indices of its True elements.

    An unbatched mask is plain ``nonzero``. A batched mask works only when every example
    selects the same number of elements (else the per-example results differ in shape)."""
    out, outd = [], []
    for t, d in zip(indices, idims):
        if not _is_mask(t):
            out.append(t)
            outd.append(d)
        elif d is None:
            out.extend(t.nonzero().unbind(1))
            outd.extend([None] * t.dim())
        else:
            k = t.dim() - 1
            nz = t.nonzero()  # (N, 1 + k), rows sorted by example
            counts = flat_examples(t, B).sum(1)
            if B and not bool((counts == counts[0]).all()):
                raise _data_dependent(op)
            n = nz.shape[0] // B if B else 0
            out.extend(nz[:, 1:].reshape(B, n, k).unbind(2))
            outd.extend([0] * k)
    return out, outd


class _IndexPlan:
    """How to compute ``self[indices]`` for every example with one aten.index call.

    ``phys`` is the index list for the physical self, and the physical result equals the
    logical batch-first result ``(B, *L)`` permuted by ``perm`` (``None``: no permutation).
    ``lrank`` is ``len(L)``, the logical result rank.

    numpy places the broadcast index dims where the advanced indices are when they are
    adjacent, and first when a slice separates them. Prepending a batch index (``arange``,
    or a full slice when no index is batched) can change which case applies; ``perm`` fixes it.
    """

    def __init__(self, indices, idims, self_rank, self_batched, B, device):
        pos = [i for i, t in enumerate(indices) if t is not None]
        adjacent = pos == list(range(pos[0], pos[-1] + 1))
        p = pos[0]
        nb = max(rank(t, d) for t, d in zip(indices, idims) if t is not None)  # broadcast rank
        self.lrank = nb + self_rank - len(pos)
        n = self.lrank + 1
        ident = list(range(n))
        any_batched = any(d is not None for d in idims)
        if not any_batched:
            # self[:, *indices]: the batch slice is a slice, so separated advanced indices put
            # their dims before the batch dim: P = (bcast, B, rest)
            self.phys = [None] + list(indices)
            self.perm = None if adjacent else list(range(1, nb + 1)) + [0] + list(range(nb + 1, n))
            return
        # batched indices: pad to the common rank behind the batch dim so that broadcasting
        # lines the batch dims up, as per example
        padded = [None if t is None else (pad_to_rank(t, d, nb) if d is not None else t) for t, d in zip(indices, idims)]
        if self_batched:
            # self[arange(B), *indices]: the advanced block always starts at dim 0:
            # P = (B, bcast, dims before the block, rest) when the block started at p > 0
            ar = torch.arange(B, device=device).reshape((B,) + (1,) * nb)
            self.phys = [ar] + padded
            if adjacent and p > 0:
                self.perm = [0] + list(range(p + 1, p + 1 + nb)) + list(range(1, p + 1)) + list(range(p + 1 + nb, n))
            else:
                self.perm = None
        else:
            # unbatched self: the batch dim is just the leading broadcast dim of the indices:
            # P = (dims before the block, B, bcast, rest) when adjacent
            self.phys = padded
            self.perm = list(range(1, p + 1)) + [0] + list(range(p + 1, n)) if adjacent and p > 0 else None
        assert self.perm is None or sorted(self.perm) == ident

    def to_logical(self, out):
        """Physical result -> batch-first logical result."""
        if self.perm is None:
            return out
        inv = [0] * len(self.perm)
        for j, q in enumerate(self.perm):
            inv[q] = j
        return out.permute(inv)

    def to_physical(self, values, vd):
        """Values for index_put (broadcastable to the logical ``L``) -> broadcastable to the
        physical result."""
        if vd is None:
            values = values.reshape((1,) * (self.lrank + 1 - values.dim()) + values.shape)
        else:
            values = pad_to_rank(values, 0, self.lrank)
        return values if self.perm is None else values.permute(self.perm)


def _prepare_indices(op, indices, idims, B):
    """Long indices (masks expanded) and their dims, or None where aten.index itself fails
    per example (no index tensor, or a 0-d mask): then the caller lets aten raise."""
    idims = list(idims) if idims is not None else [None] * len(indices)
    indices = list(indices)
    if all(t is None for t in indices) or any(_is_mask(t) and rank(t, d) == 0 for t, d in zip(indices, idims)):
        return None
    return _expand_masks(op, indices, idims, B)


@batch_rule(aten.index.Tensor, aten._unsafe_index.Tensor)
def index(op, args, kwargs, dims):
    self_, indices = args[0], args[1]
    sd = dims[0]
    B = batch_size_of(args, dims)
    prepared = _prepare_indices(op, indices, dims[1], B)
    if prepared is None:
        return op(self_, list(indices)), 0  # raises as it would per example
    indices, idims = prepared
    plan = _IndexPlan(indices, idims, rank(self_, sd), sd is not None, B, self_.device)
    return plan.to_logical(op(self_, plan.phys)), 0


@batch_rule(aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
            aten._unsafe_index_put.default)
def index_put(op, args, kwargs, dims):
    args, kwargs, dims = normalize_args(op, args, kwargs, dims)
    self_, indices, values = args[0], args[1], args[2]
    sd, vd = dims[0], dims[2]
    if _is_inplace(op) and sd is None:
        raise batched_write_error(op)
    B = batch_size_of(args, dims)
    prepared = _prepare_indices(op, indices, dims[1], B)
    if prepared is None:
        return op(*args, **kwargs), 0  # raises as it would per example
    indices, idims = prepared
    # out-of-place ops copy self first, so an expanded unbatched self is fine
    self_p = materialize(self_, sd, B)
    plan = _IndexPlan(indices, idims, rank(self_, sd), True, B, self_.device)
    out = op(self_p, plan.phys, plan.to_physical(values, vd), *args[3:], **kwargs)
    return out, 0


# -- dim ops: gather / scatter ------------------------------------------------------------


def _flatten_scalars(r, *ts):
    """0-d logical operands: view them as 1-d so that dim 0 is physical dim 1."""
    if r > 0:
        return ts
    return tuple(flat_examples(t) if isinstance(t, torch.Tensor) else t for t in ts)


@batch_rule(aten.gather.default)
def gather(op, args, kwargs, dims):
    args, kwargs, dims = normalize_args(op, args, kwargs, dims)
    x, d, index = args[0], args[1], args[2]
    B = batch_size_of(args, dims)
    r = rank(x, dims[0])
    if r == 0:  # (flattening would hide an index of the wrong rank: the op's own check)
        check_example(op, args, kwargs, dims)
    x_p, i_p = _flatten_scalars(r, materialize(x, dims[0], B), materialize(index, dims[2], B))
    out = op(x_p, physical_dim(d, r), i_p, *args[3:], **kwargs)
    return out.reshape((B,) + index.shape[dims[2] is not None:]), 0


@batch_rule(aten.scatter.src, aten.scatter.value, aten.scatter.reduce, aten.scatter.value_reduce,
            aten.scatter_.src, aten.scatter_.value, aten.scatter_.reduce, aten.scatter_.value_reduce,
            aten.scatter_add.default, aten.scatter_add_.default, aten.scatter_reduce.two,
            aten.scatter_reduce_.two)
def scatter(op, args, kwargs, dims):
    # (self, dim, index, src-or-value, [reduce])
    args, kwargs, dims = normalize_args(op, args, kwargs, dims)
    if _is_inplace(op) and dims[0] is None:
        raise batched_write_error(op)
    B = batch_size_of(args, dims)
    x, d = args[0], args[1]
    r = rank(x, dims[0])
    # index and src are only read: expanding them is enough
    tensors = [materialize(a, e, B) if isinstance(a, torch.Tensor) else a for a, e in zip(args[:4], dims[:4])]
    x_p, i_p, src = _flatten_scalars(r, tensors[0], tensors[2], tensors[3])
    out = op(x_p, physical_dim(d, r), i_p, src, *args[4:], **kwargs)
    if _is_inplace(op):
        return args[0], 0
    return out.reshape(tensors[0].shape), 0


# -- index_select / index_add / index_copy / index_fill / index_reduce ----------------


@batch_rule(aten.index_select.default)
def index_select(op, args, kwargs, dims):
    x, d, index = args
    B = batch_size_of(args, dims)
    r = rank(x, dims[0])
    x_p = materialize(x, dims[0], B)
    (x_p,) = _flatten_scalars(r, x_p)
    pd = physical_dim(d, r)
    if dims[2] is None:
        out = op(x_p, pd, index)
    else:
        idx = flat_examples(index, B)
        out = x_p.gather(pd, _dim_index(idx, pd, _shape_with(x_p.shape, pd, idx.shape[1])))
    return (out.reshape(B) if r == 0 else out), 0


def _index_source_op(scatter_op, scatter_inplace):
    """Rule for index_add/index_copy/index_reduce(self, dim, index, source, ...):
    a batched index becomes a scatter index expanded to the source's shape."""

    def rule(op, args, kwargs, dims):
        args, kwargs, dims = normalize_args(op, args, kwargs, dims)
        inplace = _is_inplace(op)
        if inplace and dims[0] is None:
            raise batched_write_error(op)
        x, d, index, src = args[:4]
        B = batch_size_of(args, dims)
        r = rank(x, dims[0])
        x_p, src_p = _flatten_scalars(r, materialize(x, dims[0], B), materialize(src, dims[3], B))
        pd = physical_dim(d, r)
        if dims[2] is None:
            out = op(x_p, pd, index, src_p, *args[4:], **kwargs)
        else:
            idx = _dim_index(_batched_1d_index(index, 0, B), pd, src_p.shape)
            extra = list(args[4:])
            kw = dict(kwargs)
            if op in (aten.index_add.default, aten.index_add_.default):
                alpha = kw.pop("alpha", 1)
                if alpha != 1:
                    src_p = src_p * alpha
            fn = scatter_inplace if inplace else scatter_op
            out = fn(x_p, pd, idx, src_p, *extra, **kw)
        if inplace:
            return args[0], 0
        return out.reshape(materialize(x, dims[0], B).shape), 0

    return rule


batch_rule(aten.index_add.default, aten.index_add_.default)(
    _index_source_op(aten.scatter_add.default, aten.scatter_add_.default))
batch_rule(aten.index_copy.default, aten.index_copy_.default)(
    _index_source_op(aten.scatter.src, aten.scatter_.src))
batch_rule(aten.index_reduce.default, aten.index_reduce_.default)(
    _index_source_op(aten.scatter_reduce.two, aten.scatter_reduce_.two))


@batch_rule(aten.index_fill.int_Scalar, aten.index_fill.int_Tensor, aten.index_fill_.int_Scalar,
            aten.index_fill_.int_Tensor)
def index_fill(op, args, kwargs, dims):
    x, d, index, value = args
    inplace = _is_inplace(op)
    if inplace and dims[0] is None:
        raise batched_write_error(op)
    B = batch_size_of(args, dims)
    r = rank(x, dims[0])
    (x_p,) = _flatten_scalars(r, materialize(x, dims[0], B))
    pd = physical_dim(d, r)
    value_batched = isinstance(value, torch.Tensor) and dims[3] is not None
    if dims[2] is None and not value_batched:
        out = op(x_p, pd, index, value)
    else:
        # fill = scatter of the value at the (per-example) indices; index_fill wraps negatives
        size = x_p.shape[pd]
        idx = _batched_1d_index(index, dims[2], B)
        idx = torch.where(idx < 0, idx + size, idx)
        idx = _dim_index(idx, pd, _shape_with(x_p.shape, pd, idx.shape[1]))
        if isinstance(value, torch.Tensor):  # 0-d per example: broadcast it over the index
            if value_batched:
                value = value.reshape((B,) + (1,) * (x_p.dim() - 1))
            value = value.to(x_p.dtype).expand(idx.shape)
        out = (x_p.scatter_ if inplace else x_p.scatter)(pd, idx, value)
    if inplace:
        return args[0], 0
    return out.reshape(materialize(x, dims[0], B).shape), 0


# -- masked_scatter, take, put ----------------------------------------------------------


@batch_rule(aten.masked_scatter.default, aten.masked_scatter_.default)
def masked_scatter(op, args, kwargs, dims):
    # Example b fills its True positions, in order, with source_b's first elements; the
    # result shape does not depend on the mask, so this vectorizes: element j of the mask
    # takes source element (number of Trues before j).
    x, mask, source = args
    inplace = _is_inplace(op)
    if inplace and dims[0] is None:
        raise batched_write_error(op)
    B = batch_size_of(args, dims)
    xs, ms = x.shape[dims[0] is not None:], mask.shape[dims[1] is not None:]
    shape = tuple(xs) if inplace else tuple(torch.broadcast_shapes(xs, ms))
    x_b = pad_to_rank(materialize(x, dims[0], B), 0, len(shape)).expand((B,) + shape)
    m_b = pad_to_rank(materialize(mask, dims[1], B), 0, len(shape)).expand((B,) + shape)
    src = flat_examples(materialize(source, dims[2], B), B)
    flat = flat_examples(m_b, B)
    if src.shape[1] == 0:
        if bool(flat.any()):
            raise RuntimeError("masked_scatter: expected source to have at least as many elements as "
                               "the ones in mask")
        out = x_b
    else:
        pos = (flat.long().cumsum(1) - 1).clamp_(min=0)
        out = torch.where(m_b, src.gather(1, pos).reshape((B,) + shape), x_b)
    if inplace:
        args[0].copy_(out)
        return args[0], 0
    return out, 0


@batch_rule(aten.masked_scatter_backward.default)
def masked_scatter_backward(op, args, kwargs, dims):
    # grad of masked_scatter's source: example b's grad at its True positions, in order,
    # zero-padded to the source size; scatter each element to its rank among the Trues
    # (the rest go to a dump column past the end).
    grad, mask, sizes = args
    B = batch_size_of(args, dims)
    shape = tuple(grad.shape[dims[0] is not None:])
    g = flat_examples(materialize(grad, dims[0], B), B)
    m = flat_examples(pad_to_rank(materialize(mask, dims[1], B), 0, len(shape)).expand((B,) + shape), B)
    n = 1
    for s in sizes:
        n *= s
    pos = m.long().cumsum(1) - 1
    pos = torch.where(m & (pos < n), pos, n)
    out = g.new_zeros((B, n + 1)).scatter_(1, pos, g)
    return out[:, :n].reshape((B,) + tuple(sizes)), 0


@batch_rule(aten.take.default)
def take(op, args, kwargs, dims):
    # take = index into the flattened self (aten.index, not Python indexing: a 0-d index
    # must stay a tensor index; negative indices wrap the same way)
    x, index = args
    B = batch_size_of(args, dims)
    ishape = index.shape[dims[1] is not None:]
    if dims[0] is None:  # every example reads the same flat self
        return aten.index.Tensor(x.reshape(-1), [index]), 0
    flat = flat_examples(x, B)
    if dims[1] is None:
        return aten.index.Tensor(flat, [None, index]), 0
    ar = torch.arange(B, device=x.device).reshape(B, 1)
    return aten.index.Tensor(flat, [ar, flat_examples(index, B)]).reshape((B,) + ishape), 0


@batch_rule(aten.put.default, aten.put_.default)
def put(op, args, kwargs, dims):
    args, kwargs, dims = normalize_args(op, args, kwargs, dims)
    x, index, source, accumulate = args
    inplace = _is_inplace(op)
    if inplace and dims[0] is None:
        raise batched_write_error(op)
    B = batch_size_of(args, dims)
    x_p = materialize(x, dims[0], B)
    ar = torch.arange(B, device=x.device).reshape(B, 1)
    idx = flat_examples(materialize(index, dims[1], B), B)
    src = flat_examples(materialize(source, dims[2], B), B)
    out = aten.index_put.default(flat_examples(x_p, B), [ar, idx], src, accumulate).reshape(x_p.shape)
    if inplace:
        x.copy_(out)
        return x, 0
    return out, 0


# -- searchsorted / bucketize ---------------------------------------------------------


def _searchsorted_batched_seq(seq, values, vd, B, kwargs):
    """searchsorted with a batched 1-d sequence: one row of values per example."""
    vals = materialize(values, vd, B)
    out = aten.searchsorted.Tensor(seq.contiguous(), flat_examples(vals, B).contiguous(), **kwargs)
    return out.reshape(vals.shape)


def _scalar_values(v, like):
    return torch.tensor(v, device=like.device)


@batch_rule(aten.searchsorted.Tensor, aten.searchsorted.Scalar, batched_kwargs=True)
def searchsorted(op, args, kwargs, dims, kwarg_dims=None):
    seq, values = args
    kwargs = dict(kwargs)
    dims = list(dims)
    if kwarg_dims and kwarg_dims.get("sorter") is not None:
        # a per-example sorter: searching seq with sorter is searching seq.gather(-1, sorter)
        # (the result indexes the sorted order either way)
        sorter = kwargs.pop("sorter")
        seq = materialize(seq, dims[0], sorter.shape[0])
        if sorter.shape != seq.shape:
            raise RuntimeError("torch.searchsorted(): boundary and sorter must have the same size, but got "
                               f"boundary tensor {list(seq.shape[1:])} and got sorter tensor {list(sorter.shape[1:])}")
        seq, dims[0] = seq.gather(-1, sorter), 0
    B = batch_size_of([seq, values], dims)
    seq_rank = rank(seq, dims[0])
    if seq_rank == 0 and dims[0] is not None:  # 0-dim boundaries per example: the op's own error
        check_example(op, [seq, values], kwargs, dims, kernel=True)
    if dims[0] is None:  # only the values are batched (contiguous: avoids torch's copy warning)
        return op(seq, values.contiguous(), **kwargs), 0
    if kwargs.get("sorter") is not None:  # an unbatched sorter goes with the batched sequence
        kwargs["sorter"] = materialize(kwargs["sorter"], None, B).contiguous()
    if op is aten.searchsorted.Scalar:
        values, vd = _scalar_values(values, seq), None
    else:
        vd = dims[1]
    if seq_rank == 1:
        return _searchsorted_batched_seq(seq, values, vd, B, kwargs), 0
    return aten.searchsorted.Tensor(seq, materialize(values, vd, B).contiguous(), **kwargs), 0


@batch_rule(aten.bucketize.Tensor, aten.bucketize.Scalar)
def bucketize(op, args, kwargs, dims):
    values, boundaries = args
    B = batch_size_of(args, dims)
    if dims[1] is None:  # shared boundaries
        return op(values.contiguous(), boundaries, **kwargs), 0
    vd = dims[0]
    if op is aten.bucketize.Scalar:
        values, vd = _scalar_values(values, boundaries), None
    # bucketize(v, b, right=r) is searchsorted(b, v, right=r)
    return _searchsorted_batched_seq(boundaries, values, vd, B, kwargs), 0


@batch_rule(aten.nonzero_static.default)
def nonzero_static(op, args, kwargs, dims):
    # Per example: the indices of the first `size` nonzero elements (row-major), padded with
    # fill_value. Element j of example b is its nonzero number rank = (nonzeros before j): it
    # goes to row `rank` when rank < size (the others to a dump row), then rows unravel.
    x = args[0]
    size, fill = kwargs["size"], kwargs.get("fill_value", -1)
    B, shape = x.shape[0], tuple(x.shape[1:])
    nz = flat_examples((x != 0), B)
    n = nz.shape[1]
    rank_ = nz.long().cumsum(1) - 1
    slot = torch.where(nz & (rank_ < size), rank_, size)
    flat = torch.arange(n, device=x.device).expand(B, n)
    found = torch.full((B, size + 1), -1, dtype=torch.int64, device=x.device).scatter(1, slot, flat)[:, :size]
    coords = []
    stride = 1
    for s in reversed(shape):
        s = max(s, 1)  # (a size-0 dim: no element, every row is fill)
        coords.append(found // stride % s)
        stride *= s
    out = torch.stack(coords[::-1], dim=2) if coords else found.new_zeros((B, size, 0))
    return torch.where((found >= 0).unsqueeze(2), out, torch.full((), fill, dtype=torch.int64, device=x.device)), 0


# -- backward forms of views, and the *_scatter ops ---------------------------------------
# The backward ops take the logical input sizes: prepend the batch size and shift the dims.


@batch_rule(aten.select_backward.default)
def select_backward(op, args, kwargs, dims):
    g, sizes, d, i = args
    return op(g, [g.shape[0]] + list(sizes), physical_dim(d, len(sizes)), i), 0


@batch_rule(aten.slice_backward.default)
def slice_backward(op, args, kwargs, dims):
    g, sizes, d, start, end, step = args
    return op(g, [g.shape[0]] + list(sizes), physical_dim(d, len(sizes)), start, end, step), 0


@batch_rule(aten.diagonal_backward.default)
def diagonal_backward(op, args, kwargs, dims):
    g, sizes, offset, d1, d2 = args
    r = len(sizes)
    return op(g, [g.shape[0]] + list(sizes), offset, physical_dim(d1, r), physical_dim(d2, r)), 0


@batch_rule(aten.unfold_backward.default)
def unfold_backward(op, args, kwargs, dims):
    g, sizes, d, size, step = args
    if len(sizes) == 0:  # unfold of a 0-d tensor: g has shape (size,) == (1,)
        return g.reshape(g.shape[0]), 0
    return op(g, [g.shape[0]] + list(sizes), physical_dim(d, len(sizes)), size, step), 0


def _scatter_view(shift):
    """Rule for ``*_scatter(self, src, ...)``: both get a batch dim (out-of-place ops copy
    self first, so expanding an unbatched one is enough); ``shift`` fixes the dim args."""

    def rule(op, args, kwargs, dims):
        args, kwargs, dims = normalize_args(op, args, kwargs, dims)
        B = batch_size_of(args, dims)
        x, src = materialize(args[0], dims[0], B), materialize(args[1], dims[1], B)
        return op(x, src, *shift(rank(x, 0), args[2:]), **kwargs), 0

    return rule


# select_scatter(self, src, dim, index), slice_scatter(self, src, dim, start, end, step),
# diagonal_scatter(self, src, offset, dim1, dim2)
batch_rule(aten.select_scatter.default)(_scatter_view(lambda r, a: (physical_dim(a[0], r), a[1])))
batch_rule(aten.slice_scatter.default)(_scatter_view(lambda r, a: (physical_dim(a[0], r), *a[1:])))
batch_rule(aten.diagonal_scatter.default)(
    _scatter_view(lambda r, a: (a[0], physical_dim(a[1], r), physical_dim(a[2], r))))


@batch_rule(aten.as_strided_scatter.default)
def as_strided_scatter(op, args, kwargs, dims):
    # As views.as_strided: each example addresses its own contiguous storage region. The
    # offset is absolute, i.e. relative to the storage offset the (logical) self reports.
    # One batched call only where that is exact: each example of self contiguous, the
    # default offset, and the strided window inside the example (else it would reach into
    # the next example's storage where the loop raises): otherwise run per example.
    args, kwargs, dims = normalize_args(op, args, kwargs, dims)
    B = batch_size_of(args, dims)
    size, stride = tuple(args[2]), tuple(args[3])
    x = materialize(args[0], dims[0], B)
    per = math.prod(x.shape[1:])
    extent = 1 + sum((n - 1) * st for n, st in zip(size, stride)) if all(n > 0 for n in size) else 0
    if B and (args[4] is not None or not x.select(0, 0).is_contiguous() or extent > per or min(stride, default=0) < 0):
        return loop_examples(op, args, dims, B)
    x = x.contiguous()
    src = materialize(args[1], dims[1], B)
    return op(x, src, (B,) + size, (per,) + stride, x.storage_offset()), 0
