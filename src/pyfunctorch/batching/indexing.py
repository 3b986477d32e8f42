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

from .. import _core
from ._registry import batch_rule, batch_size_of, materialize, pad_to_rank, per_example_signal, physical_dim, rank

aten = torch.ops.aten


# -- shared helpers ---------------------------------------------------------------------


def _inplace_error(op):
    from ..batched import _inplace_error  # lazy: batched imports this package

    return _inplace_error(op)


def _normalize(op, args, kwargs, dims):
    """Positional form of every non-kwarg-only argument (defaults filled in), so rules can
    unpack by position whatever way the caller passed them. Kwarg-only ones stay in kwargs."""
    args, dims, kwargs = list(args), list(dims), dict(kwargs)
    for i, a in enumerate(op._schema.arguments):
        if a.kwarg_only:
            break
        if i < len(args):
            continue
        if a.name in kwargs:
            args.append(kwargs.pop(a.name))
        elif a.has_default_value():
            args.append(a.default_value)
        else:
            break
        dims.append(None)
    return args, kwargs, dims


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
    return materialize(index, d, B).reshape(B, -1)


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
            counts = t.reshape(B, -1).sum(1)
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
    args, kwargs, dims = _normalize(op, args, kwargs, dims)
    self_, indices, values = args[0], args[1], args[2]
    sd, vd = dims[0], dims[2]
    if _is_inplace(op) and sd is None:
        raise _inplace_error(op)
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
    return tuple(t.reshape(t.shape[0], -1) if isinstance(t, torch.Tensor) else t for t in ts)


@batch_rule(aten.gather.default)
def gather(op, args, kwargs, dims):
    args, kwargs, dims = _normalize(op, args, kwargs, dims)
    x, d, index = args[0], args[1], args[2]
    B = batch_size_of(args, dims)
    r = rank(x, dims[0])
    x_p, i_p = _flatten_scalars(r, materialize(x, dims[0], B), materialize(index, dims[2], B))
    out = op(x_p, physical_dim(d, r), i_p, *args[3:], **kwargs)
    return out.reshape((B,) + index.shape[dims[2] is not None:]), 0


@batch_rule(aten.scatter.src, aten.scatter.value, aten.scatter.reduce, aten.scatter.value_reduce,
            aten.scatter_.src, aten.scatter_.value, aten.scatter_.reduce, aten.scatter_.value_reduce,
            aten.scatter_add.default, aten.scatter_add_.default, aten.scatter_reduce.two,
            aten.scatter_reduce_.two)
def scatter(op, args, kwargs, dims):
    # (self, dim, index, src-or-value, [reduce])
    args, kwargs, dims = _normalize(op, args, kwargs, dims)
    if _is_inplace(op) and dims[0] is None:
        raise _inplace_error(op)
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
        idx = index.reshape(B, -1)
        out = x_p.gather(pd, _dim_index(idx, pd, _shape_with(x_p.shape, pd, idx.shape[1])))
    return (out.reshape(B) if r == 0 else out), 0


def _index_source_op(scatter_op, scatter_inplace):
    """Rule for index_add/index_copy/index_reduce(self, dim, index, source, ...):
    a batched index becomes a scatter index expanded to the source's shape."""

    def rule(op, args, kwargs, dims):
        args, kwargs, dims = _normalize(op, args, kwargs, dims)
        inplace = _is_inplace(op)
        if inplace and dims[0] is None:
            raise _inplace_error(op)
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
        raise _inplace_error(op)
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
        raise _inplace_error(op)
    B = batch_size_of(args, dims)
    xs, ms = x.shape[dims[0] is not None:], mask.shape[dims[1] is not None:]
    shape = tuple(xs) if inplace else tuple(torch.broadcast_shapes(xs, ms))
    x_b = pad_to_rank(materialize(x, dims[0], B), 0, len(shape)).expand((B,) + shape)
    m_b = pad_to_rank(materialize(mask, dims[1], B), 0, len(shape)).expand((B,) + shape)
    src = materialize(source, dims[2], B).reshape(B, -1)
    flat = m_b.reshape(B, -1)
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
    g = materialize(grad, dims[0], B).reshape(B, -1)
    m = pad_to_rank(materialize(mask, dims[1], B), 0, len(shape)).expand((B,) + shape).reshape(B, -1)
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
    flat = x.reshape(B, -1)
    if dims[1] is None:
        return aten.index.Tensor(flat, [None, index]), 0
    ar = torch.arange(B, device=x.device).reshape(B, 1)
    return aten.index.Tensor(flat, [ar, index.reshape(B, -1)]).reshape((B,) + ishape), 0


@batch_rule(aten.put.default, aten.put_.default)
def put(op, args, kwargs, dims):
    args, kwargs, dims = _normalize(op, args, kwargs, dims)
    x, index, source, accumulate = args
    inplace = _is_inplace(op)
    if inplace and dims[0] is None:
        raise _inplace_error(op)
    B = batch_size_of(args, dims)
    x_p = materialize(x, dims[0], B)
    ar = torch.arange(B, device=x.device).reshape(B, 1)
    idx = materialize(index, dims[1], B).reshape(B, -1)
    src = materialize(source, dims[2], B).reshape(B, -1)
    out = aten.index_put.default(x_p.reshape(B, -1), [ar, idx], src, accumulate).reshape(x_p.shape)
    if inplace:
        x.copy_(out)
        return x, 0
    return out, 0


# -- searchsorted / bucketize ---------------------------------------------------------


def _searchsorted_batched_seq(seq, values, vd, B, kwargs):
    """searchsorted with a batched 1-d sequence: one row of values per example."""
    vals = materialize(values, vd, B)
    out = aten.searchsorted.Tensor(seq.contiguous(), vals.reshape(B, -1).contiguous(), **kwargs)
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
    nz = (x != 0).reshape(B, -1)
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


# -- histc / histogram / histogramdd ----------------------------------------------------
# Without range= the bin edges of an example span that example's data, so they differ per
# example: bin by hand, with the kernel's own arithmetic (HistogramKernel.cpp) so that elements
# on a bin edge land where they do per example:
#   histc:                  pos = int((x - lo) * bins / (hi - lo))
#   histogram(int bins):    the same, then corrected by comparing x with its neighbouring edges
#   histogram(tensor bins): pos = (number of edges <= x) - 1 (a binary search)
# where lo/hi are the first and last edges; elements outside [lo, hi] (and NaN) are skipped and
# the last bin is closed on the right. Every op is out of place (also at outer vmap levels).


def _check_hist_input(x, bins):
    if not x.is_floating_point():
        raise NotImplementedError(f'"histogram_cpu" not implemented for \'{str(x.dtype).split(".")[-1].capitalize()}\'')
    for i, n in enumerate(bins):
        if n <= 0:
            raise RuntimeError(f"torch.histogram(): bins must be > 0, but got {n} for dimension {i}")


def _check_data_range(lo, hi, message):
    """Raise as the kernel does when an example's data range (``(B, N)`` doubles) is not finite.
    Values batched at an outer vmap level are not read in Python (that level would re-run the
    function per example): an assert on the tensor checks them, with a shorter message."""
    if lo.numel() == 0:
        return
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if isinstance(lo, _core.LevelTensor) or isinstance(hi, _core.LevelTensor):
        torch._assert_async(~bad.any(), "the range [min, max] of an example's data is not finite (it holds inf "
                                        "or nan): pass range= or remove the non-finite values")
        return
    if bool(bad.any()):
        b, d = (int(i) for i in bad.nonzero()[0])
        raise RuntimeError(message(d, float(lo[b, d]), float(hi[b, d])))


def _linspace(lo, hi, steps: int):
    """``torch.linspace(lo[b], hi[b], steps)`` for every row, bit for bit as the CPU kernel
    computes it (start + step*i for the first half, end - step*(steps-1-i) for the rest, with a
    fused multiply-add; the step a true division, not a multiplication by a reciprocal)."""
    lo, hi = lo.reshape(-1, 1), hi.reshape(-1, 1)
    if steps == 1:
        return lo
    step = (hi - lo) / torch.full_like(hi, steps - 1)
    idx = torch.arange(steps, dtype=lo.dtype, device=lo.device)
    first = torch.addcmul(lo, step, idx)
    last = torch.addcmul(hi, -step, (steps - 1) - idx)
    return torch.where(torch.arange(steps, device=lo.device) < steps // 2, first, last)


def _outer_edges(x, range_, dtype):
    """Per example and data dim, the outermost bin edges as torch.histogram picks them:
    ``range`` if given, else the data's min and max (0 and 1 for no data); an empty range is
    widened by 0.5 each side (in double, as the kernel does). ``x`` is ``(B, M, N)``; returns
    two ``(B, N)`` tensors."""
    B, M, N = x.shape
    if range_ is not None:
        if len(range_) != 2 * N:
            raise RuntimeError(f"torch.histogramdd: for a {N}-dimensional histogram range should have {2 * N} "
                               f"elements, but got {len(range_)}")
        lo, hi = [float(v) for v in range_[0::2]], [float(v) for v in range_[1::2]]
        for d in range(N):
            if not (math.isfinite(lo[d]) and math.isfinite(hi[d])):
                raise RuntimeError(f"torch.histogramdd: dimension {d}'s range [{lo[d]}, {hi[d]}] is not finite")
            if lo[d] > hi[d]:
                raise RuntimeError(f"torch.histogramdd: min should not exceed max, but got min {lo[d]} max "
                                   f"{hi[d]} for dimension {d}")
        lo = torch.tensor(lo, dtype=torch.float64, device=x.device).expand(B, N)
        hi = torch.tensor(hi, dtype=torch.float64, device=x.device).expand(B, N)
    elif M == 0:
        lo = torch.zeros((B, N), dtype=torch.float64, device=x.device)
        hi = torch.ones((B, N), dtype=torch.float64, device=x.device)
    else:
        lo, hi = (t.to(torch.float64) for t in aten.aminmax.default(x, dim=1))
        _check_data_range(lo, hi, lambda d, a, b: f"torch.histogramdd: dimension {d}'s range [{a}, {b}] is not finite")
    same = lo == hi
    return torch.where(same, lo - 0.5, lo).to(dtype), torch.where(same, hi + 0.5, hi).to(dtype)


def _bin_edges(x, bins, range_):
    """The bin edges of every data dim: a list of ``(B, bins[d] + 1)`` tensors."""
    lo, hi = _outer_edges(x, range_, x.dtype)
    return [_linspace(lo[:, d], hi[:, d], n + 1) for d, n in enumerate(bins)]


def _histogram(x, edges, weight, density, algorithm):
    """The histograms of a batch of ``(M, N)`` data, ``x`` of shape ``(B, M, N)``: ``edges`` a
    list of ``(B, n_d)`` bin edges, ``weight`` ``(B, M)`` or None. Returns ``(B, *bins)``."""
    B, M, N = x.shape
    nbins = [e.shape[1] - 1 for e in edges]
    inside = torch.ones((B, M), dtype=torch.bool, device=x.device)
    flat = torch.zeros((B, M), dtype=torch.int64, device=x.device)
    for d, e in enumerate(edges):
        v, n = x[:, :, d], nbins[d]
        left, right = e[:, :1], e[:, -1:]
        ok = (v >= left) & (v <= right)
        if algorithm == "binary":
            pos = aten.searchsorted.Tensor(e.contiguous(), v.contiguous(), right=True) - 1
        else:
            pos = ((v - left) * n / (right - left)).masked_fill(~ok, 0).to(torch.int64)
            if algorithm == "local":  # upper_bound over the edges pos-1 .. pos+1
                lo_k = (pos - 1).clamp(min=0)
                hi_k = (pos + 2).clamp(max=n + 1)
                below = torch.zeros_like(pos)
                for k in (pos - 1, pos, pos + 1):
                    valid = (k >= lo_k) & (k < hi_k)
                    ek = e.gather(1, k.clamp(0, n))
                    below = below + (valid & (ek <= v)).to(torch.int64)
                pos = lo_k + below - 1
        pos = torch.where(pos == n, pos - 1, pos)  # the last bin includes its right edge
        inside = inside & ok
        flat = flat * n + pos.clamp(0, max(n - 1, 0))
    w = torch.ones((), dtype=x.dtype, device=x.device).expand(B, M) if weight is None else weight
    w = torch.where(inside, w, torch.zeros((), dtype=x.dtype, device=x.device))
    total = 1
    for n in nbins:
        total *= n
    hist = torch.zeros((B, total), dtype=x.dtype, device=x.device).scatter_add(1, flat, w)
    hist = hist.reshape((B, *nbins))
    if density:
        hist = hist / hist.reshape(B, -1).sum(1).reshape((B,) + (1,) * N)
        for d, e in enumerate(edges):
            shape = [B] + [1] * N
            shape[1 + d] = nbins[d]
            hist = hist / e.diff(dim=1).reshape(shape)
    return hist


def _hist_weight(weight, wd, B, M, logical_shape):
    """The weights as ``(B, M)``. histogramdd wants the input's shape less its last dim (a 0-d
    weight counts as ``(1,)``); histogram (``logical_shape=None``) only as many elements."""
    if weight is None:
        return None
    ws = tuple(weight.shape[wd is not None:])
    if logical_shape is None:
        if math.prod(ws) != M:
            raise RuntimeError("torch.histogramdd: if weight tensor is provided it should have the same shape as the "
                               f"input tensor excluding its innermost dimension, but got input with {M} elements "
                               f"and weight with shape {list(ws)}")
    elif (ws or (1,)) != tuple(logical_shape):
        raise RuntimeError("torch.histogramdd: if weight tensor is provided it should have the same shape as the "
                           f"input tensor excluding its innermost dimension, but got weight with shape {list(ws)}")
    return materialize(weight, wd, B).reshape(B, M)


@batch_rule(aten.histc.default)
def histc(op, args, kwargs, dims):
    args, kwargs, dims = _normalize(op, args, kwargs, dims)
    x, bins, lo, hi = args
    _check_hist_input(x, [bins])
    B = x.shape[0]
    flat = x.reshape(B, -1, 1)
    lo, hi = float(lo), float(hi)
    if lo == hi and flat.shape[1] > 0:  # per example, the data's range
        lo, hi = (t.to(torch.float64) for t in aten.aminmax.default(flat.reshape(B, -1), dim=1))
        _check_data_range(lo[:, None], hi[:, None], lambda d, a, b: f"torch.histc: range of [{a}, {b}] is not finite")
    else:
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise RuntimeError(f"torch.histc: range of [{lo}, {hi}] is not finite")
        if not lo <= hi:
            raise RuntimeError("torch.histc: max must be larger than min")
        lo = torch.full((B,), lo, dtype=torch.float64, device=x.device)
        hi = torch.full((B,), hi, dtype=torch.float64, device=x.device)
    same = lo == hi
    lo, hi = torch.where(same, lo - 1, lo).to(x.dtype), torch.where(same, hi + 1, hi).to(x.dtype)
    edges = [_linspace(lo, hi, bins + 1)]
    return _histogram(flat, edges, None, False, "linear"), 0


@batch_rule(aten.histogram.bin_ct, aten.histogram.bins_tensor, batched_kwargs=True)
def histogram(op, args, kwargs, dims, kwarg_dims=None):
    args, kwargs, dims = _normalize(op, args, kwargs, dims)
    kwarg_dims = kwarg_dims or {}
    x, bins = args[0], args[1]
    weight, density = kwargs.get("weight"), kwargs.get("density", False)
    B = batch_size_of([x, bins, weight], [dims[0], dims[1], kwarg_dims.get("weight")])
    xm = materialize(x, dims[0], B).reshape(B, -1, 1)
    w = _hist_weight(weight, kwarg_dims.get("weight"), B, xm.shape[1], None)
    if op is aten.histogram.bin_ct:
        _check_hist_input(x, [bins])
        edges = _bin_edges(xm, [bins], kwargs.get("range"))
        algorithm = "local"
    else:
        _check_hist_input(x, [bins.shape[-1] - 1])
        edges = [materialize(bins, dims[1], B).reshape(B, -1)]
        algorithm = "binary"
    hist = _histogram(xm, edges, w, density, algorithm)
    if op is aten.histogram.bins_tensor and dims[1] is None:
        return (hist, bins.clone()), [0, None]
    return (hist, edges[0]), 0


def _dd_input(x, d, B):
    """``(B, M, N)`` form of a batched ``(..., N)`` histogramdd input."""
    x = materialize(x, d, B)
    if x.dim() < 3:
        raise RuntimeError(f"torch.histogramdd: input tensor should have at least 2 dimensions, but got {x.dim() - 1}")
    return x.reshape(B, -1, x.shape[-1])


@batch_rule(aten._histogramdd_bin_edges.default, batched_kwargs=True)
def histogramdd_bin_edges(op, args, kwargs, dims, kwarg_dims=None):
    x, bins = args[0], list(args[1])
    if dims[0] is None:  # only the weight is batched: the edges do not depend on it
        return op(x, bins, **dict(kwargs, weight=None)), None
    B = x.shape[0]
    _check_hist_input(x, bins)
    xm = _dd_input(x, dims[0], B)
    if len(bins) != xm.shape[2]:
        raise RuntimeError(f"torch.histogramdd: expected {xm.shape[2]} sequences of bin edges for a {xm.shape[2]}-"
                           f"dimensional histogram but got {len(bins)}")
    return _bin_edges(xm, bins, kwargs.get("range")), 0


@batch_rule(aten._histogramdd_from_bin_cts.default, aten._histogramdd_from_bin_tensors.default,
            batched_kwargs=True)
def histogramdd_from_bins(op, args, kwargs, dims, kwarg_dims=None):
    kwarg_dims = kwarg_dims or {}
    x, bins = args[0], list(args[1])
    weight, density = kwargs.get("weight"), kwargs.get("density", False)
    bdims = dims[1] if isinstance(dims[1], list) else [None] * len(bins)
    B = batch_size_of([x, bins, weight], [dims[0], dims[1], kwarg_dims.get("weight")])
    xm = _dd_input(x, dims[0], B)
    N = xm.shape[2]
    if len(bins) != N:
        raise RuntimeError(f"torch.histogramdd: expected {N} sequences of bin edges for a {N}-dimensional "
                           f"histogram but got {len(bins)}")
    logical = tuple(x.shape[dims[0] is not None:])[:-1]
    w = _hist_weight(weight, kwarg_dims.get("weight"), B, xm.shape[1], logical or (1,))
    if op is aten._histogramdd_from_bin_cts.default:
        _check_hist_input(x, bins)
        edges, algorithm = _bin_edges(xm, bins, kwargs.get("range")), "local"
    else:
        _check_hist_input(x, [b.shape[-1] - 1 for b in bins])
        edges = [materialize(b, d, B).reshape(B, -1) for b, d in zip(bins, bdims)]
        algorithm = "binary"
    return _histogram(xm, edges, w, density, algorithm), 0


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
        args, kwargs, dims = _normalize(op, args, kwargs, dims)
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
    args, kwargs, dims = _normalize(op, args, kwargs, dims)
    B = batch_size_of(args, dims)
    rel = (args[4] if args[4] is not None else args[0].storage_offset()) - args[0].storage_offset()
    x = materialize(args[0], dims[0], B).contiguous()
    src = materialize(args[1], dims[1], B)
    size, stride = tuple(args[2]), tuple(args[3])
    per = x[0].numel()
    return op(x, src, (B,) + size, (per,) + stride, x.storage_offset() + rel), 0


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
    feature = other.select(0, 0) if dims[1] is not None else other  # per-example strides
    return op(materialize(self_, dims[0], B), feature, self_num_batch_dims=n + 1), 0
