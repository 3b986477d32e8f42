"""Reductions and other ops that take logical ``dim`` arguments.

``dim_rule(pos, ...)`` builds a rule for an op whose argument ``pos`` is a dim (an
int, a list of ints, or None meaning "all dims"): every tensor argument is given a
batch dim at the front and the dims are shifted past it.
"""

from __future__ import annotations

import math

import torch

from ._registry import batch_rule, batch_size_of, materialize, physical_dim, rank

aten = torch.ops.aten


def _shift(d, r, none_means_all: bool):
    if d is None or (isinstance(d, (list, tuple)) and len(d) == 0 and none_means_all):
        return list(range(1, r + 1)) if r > 0 else [], True
    if isinstance(d, (list, tuple)):
        return [physical_dim(x, r) for x in d], False
    return physical_dim(d, r), False


def dim_rule(pos: int, name: str = "dim", none_means_all: bool = True):
    """Rule factory for ops with a dim argument at position ``pos`` (or kwarg ``name``)."""

    def rule(op, args, kwargs, dims):
        B = batch_size_of(args, dims)
        args = [materialize(a, d, B) if isinstance(a, torch.Tensor) else a for a, d in zip(args, dims)]
        r = rank(args[0], 0)
        if r == 0:
            return _on_scalars(op, args, kwargs, pos, name)
        if len(args) > pos:
            args[pos], _ = _shift(args[pos], r, none_means_all)
        elif name in kwargs:
            kwargs = dict(kwargs)
            kwargs[name], _ = _shift(kwargs[name], r, none_means_all)
        elif none_means_all:
            kwargs = dict(kwargs)
            kwargs[name] = list(range(1, r + 1))
        return op(*args, **kwargs), 0

    return rule


def _on_scalars(op, args, kwargs, pos, name):
    """Per-example 0-dim inputs: torch accepts dim 0/-1 (or none) on a scalar. Give each
    example a size-1 dim, run the op over it, and drop that dim from the outputs."""
    args = [a.unsqueeze(1) if isinstance(a, torch.Tensor) and a.dim() == 1 else a for a in args]
    schema_arg = next((a for a in op._schema.arguments if a.name == name), None)
    as_list = schema_arg is not None and ("List" in str(schema_arg.type) or "[]" in str(schema_arg.type))
    new_dim = [1] if as_list else 1  # whatever dim (0, -1, (), None) meant, it is this one
    if len(args) > pos:
        args[pos] = new_dim
    else:
        kwargs = dict(kwargs, **{name: new_dim})
    out = op(*args, **kwargs)

    def drop(t):
        return t.squeeze(1) if isinstance(t, torch.Tensor) and t.dim() == 2 else t

    return (type(out)(drop(t) for t in out) if isinstance(out, (tuple, list)) else drop(out)), 0


# dim at position 1 (an int, a list, or None = all dims)
for _op in [
    aten.sum.dim_IntList, aten.mean.dim, aten.nansum.default, aten.nanmean.default, aten.amax.default,
    aten.amin.default, aten.logsumexp.default, aten.prod.dim_int, aten.any.dim, aten.any.dims, aten.all.dim,
    aten.all.dims, aten.count_nonzero.dim_IntList, aten.max.dim, aten.min.dim,
    aten.cumsum.default, aten.cumprod.default, aten.cummax.default, aten.cummin.default, aten.logcumsumexp.default,
    aten._softmax.default, aten._log_softmax.default, aten.softmax.int, aten.log_softmax.int,
    aten.var.correction, aten.std.correction, aten.var_mean.correction, aten.std_mean.correction,
    aten.sort.default, aten.sort.stable, aten.argsort.default, aten.argsort.stable, aten.median.dim,
    aten.nanmedian.dim, aten.mode.default, aten.kthvalue.default,
    aten.glu.default,
]:
    pos = {aten.kthvalue.default: 2, aten.sort.stable: 2, aten.argsort.stable: 2}.get(_op, 1)
    if _op in (aten.sort.default, aten.argsort.default, aten.sort.stable, aten.argsort.stable):
        batch_rule(_op)(dim_rule(pos, none_means_all=False))
    else:
        batch_rule(_op)(dim_rule(pos, none_means_all=_op not in (
            aten._softmax.default, aten._log_softmax.default, aten.cumsum.default, aten.cumprod.default,
            aten.glu.default, aten.kthvalue.default, aten.mode.default, aten.median.dim, aten.nanmedian.dim,
            aten.cummax.default, aten.cummin.default, aten.logcumsumexp.default)))

# torch 2.5+: hash_tensor(self, dim=[] (all dims), *, keepdim, mode), a reduction over dim
if hasattr(aten, "hash_tensor"):
    batch_rule(aten.hash_tensor.default)(dim_rule(1))

# the dim comes after one tensor argument that has the same logical shape
for _op in [aten._softmax_backward_data.default, aten._log_softmax_backward_data.default]:
    batch_rule(_op)(dim_rule(2, none_means_all=False))


@batch_rule(aten.topk.default)
def topk(op, args, kwargs, dims):
    x = args[0]
    k = args[1]
    d = args[2] if len(args) > 2 else kwargs.pop("dim", -1)
    r = rank(x, 0)
    if r == 0:
        values, indices = op(x.unsqueeze(1), k, 1, *args[3:], **kwargs)
        return (values.squeeze(1), indices.squeeze(1)), 0
    return op(x, k, physical_dim(d, r), *args[3:], **kwargs), 0


def _flat_examples(x):
    """(B, numel of one example): unlike reshape(B, -1) also defined for B == 0."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


@batch_rule(aten.sum.default, aten.mean.default, aten.prod.default)
def reduce_all(op, args, kwargs, dims):
    x = args[0]
    flat = _flat_examples(x)
    dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
    if op is aten.sum.default:
        return aten.sum.dim_IntList(flat, [1], False, dtype=dtype), 0
    if op is aten.mean.default:
        return aten.mean.dim(flat, [1], False, dtype=dtype), 0
    return aten.prod.dim_int(flat, 1, False, dtype=dtype), 0


@batch_rule(aten.max.default, aten.min.default, aten.any.default, aten.all.default)
def max_all(op, args, kwargs, dims):
    x = args[0]
    flat = _flat_examples(x)
    if op is aten.max.default:
        return aten.amax.default(flat, [1]), 0
    if op is aten.min.default:
        return aten.amin.default(flat, [1]), 0
    if op is aten.any.default:
        return aten.any.dim(flat, 1), 0
    return aten.all.dim(flat, 1), 0


@batch_rule(aten.argmax.default, aten.argmin.default)
def argmax(op, args, kwargs, dims):
    x = args[0]
    d = args[1] if len(args) > 1 else kwargs.get("dim", None)
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    r = rank(x, 0)
    if d is None:
        out = op(_flat_examples(x), 1, False)
        if keepdim:
            out = out.reshape((x.shape[0],) + (1,) * r)
        return out, 0
    if r == 0:
        return op(x.unsqueeze(1), 1, keepdim).reshape(x.shape[0]), 0
    return op(x, physical_dim(d, r), keepdim), 0


@batch_rule(aten.linalg_vector_norm.default)
def vector_norm(op, args, kwargs, dims):
    x = args[0]
    ord_ = args[1] if len(args) > 1 else kwargs.pop("ord", 2)
    d = args[2] if len(args) > 2 else kwargs.pop("dim", None)
    keepdim = args[3] if len(args) > 3 else kwargs.pop("keepdim", False)
    r = rank(x, 0)
    pd, _ = _shift(d, r, True)
    if r == 0:  # (a 0-dim example: the norm of its one element, keepdim or not; dtype= applies)
        return op(x.unsqueeze(1), ord_, [1], False, **kwargs), 0
    return op(x, ord_, pd, keepdim, **kwargs), 0


@batch_rule(aten.renorm.default, aten.renorm_.default)
def renorm(op, args, kwargs, dims):
    # renorm rescales each slice along `dim` by the norm over all *other* dims: merge the
    # batch dim into `dim` so that norms never mix examples.
    x, p, d, maxnorm = args
    r = rank(x, 0)
    pd = physical_dim(d, r)
    moved = x.movedim(pd, 1)
    shape = moved.shape
    flat = moved.reshape((shape[0] * shape[1],) + tuple(shape[2:]))
    out = aten.renorm.default(flat, p, 0, maxnorm).reshape(shape).movedim(1, pd)
    if op is aten.renorm_.default:
        return x.copy_(out), 0
    return out, 0


# FFTs take a list of dims: shift them past the batch dim.
for _op in [aten._fft_r2c.default, aten._fft_c2c.default, aten._fft_c2r.default]:
    batch_rule(_op)(dim_rule(1, none_means_all=False))


@batch_rule(aten.aminmax.default)
def aminmax(op, args, kwargs, dims):
    x = args[0]
    d = args[1] if len(args) > 1 else kwargs.get("dim", None)
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    r = rank(x, 0)
    if d is None or r == 0:  # over all elements of each example
        if r == 0:
            physical_dim(d, r) if d is not None else None
        mn, mx = op(_flat_examples(x), dim=1, keepdim=False)
        if keepdim:
            shape = (x.shape[0],) + (1,) * r
            mn, mx = mn.reshape(shape), mx.reshape(shape)
        return (mn, mx), 0
    return op(x, dim=physical_dim(d, r), keepdim=keepdim), 0



@batch_rule(aten.median.default, aten.nanmedian.default)
def median_all(op, args, kwargs, dims):
    # the (lower) median of all elements of each example
    x = args[0]
    flat = _flat_examples(x)
    dim_op = aten.median.dim if op is aten.median.default else aten.nanmedian.dim
    return dim_op(flat, 1)[0], 0


# -- segment_reduce -------------------------------------------------------------------------
# Per example, ``lengths``/``offsets`` have the shape of ``data`` up to ``axis`` plus one dim of
# segments: they carry the leading dims of ``data``, so a batch dim in front of both is just one
# more leading dim (the segments of example b index example b's data only).


def _segment_axis(kwargs, r):
    axis = kwargs.get("axis", 0)
    return physical_dim(axis, r)


@batch_rule(aten.segment_reduce.default, batched_kwargs=True)
def segment_reduce(op, args, kwargs, dims, kwarg_dims=None):
    kwarg_dims = kwarg_dims or {}
    data, reduce = args[0], args[1]
    tensors = {k: kwargs[k] for k in ("lengths", "indices", "offsets") if kwargs.get(k) is not None}
    B = batch_size_of([data, *tensors.values()], [dims[0], *(kwarg_dims.get(k) for k in tensors)])
    r = rank(data, dims[0])
    kwargs = dict(kwargs, axis=_segment_axis(kwargs, r))
    for k, t in tensors.items():
        kwargs[k] = materialize(t, kwarg_dims.get(k), B).contiguous()  # (the kernel reads raw memory)
    return op(materialize(data, dims[0], B).contiguous(), reduce, **kwargs), 0


@batch_rule(aten._segment_reduce_backward.default, batched_kwargs=True)
def segment_reduce_backward(op, args, kwargs, dims, kwarg_dims=None):
    # (grad, output, data, reduce): grad/output have the reduced shape, data the input's
    kwarg_dims = kwarg_dims or {}
    tensors = {k: kwargs[k] for k in ("lengths", "offsets") if kwargs.get(k) is not None}
    B = batch_size_of([*args[:3], *tensors.values()], [*dims[:3], *(kwarg_dims.get(k) for k in tensors)])
    r = rank(args[2], dims[2])
    kwargs = dict(kwargs, axis=_segment_axis(kwargs, r))
    for k, t in tensors.items():
        kwargs[k] = materialize(t, kwarg_dims.get(k), B).contiguous()
    grad, output, data = (materialize(t, d, B).contiguous() for t, d in zip(args[:3], dims[:3]))
    return op(grad, output, data, *args[3:], **kwargs), 0


# -- asserts on tensor values (no Python read of the data) ------------------------------------------


@batch_rule(aten._assert_async.default, aten._assert_async.msg)
def assert_async(op, args, kwargs, dims):
    # every example's condition must hold: one assert on all of them. (Rules use this to check
    # data they must not read in Python: at an inner vmap level their values may be batched at
    # an outer level, and a Python read would make that level re-run the function per example.)
    cond = args[0]
    return op((cond != 0).all(), *args[1:], **kwargs), None
