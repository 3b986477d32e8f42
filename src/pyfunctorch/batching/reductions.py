"""Reductions and other ops that take logical ``dim`` arguments.

``dim_rule(pos, ...)`` builds a rule for an op whose argument ``pos`` is a dim (an
int, a list of ints, or None meaning "all dims"): every tensor argument is given a
batch dim at the front and the dims are shifted past it.
"""

from __future__ import annotations

import math

import torch

from .. import _core
from ._registry import flat_examples, batch_rule, batch_size_of, materialize, normalize_args, physical_dim, rank, wrap_dim

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
    given = args[pos] if len(args) > pos else kwargs.get(name)
    for d in given if isinstance(given, (list, tuple)) else (given,):
        if d is not None:
            wrap_dim(d, 0)  # only 0 and -1 name a scalar's dim (torch's IndexError otherwise)
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


def reducer(*ops, pos: int = 1, none_means_all: bool = True) -> None:
    """Register ``dim_rule`` for ops whose argument ``pos`` is a dim (an int, a list, or
    None). ``none_means_all``: a missing/None/empty dim means every dim (sum, mean, ...);
    False for ops that take exactly one dim (softmax, cumsum, sort, ...)."""
    batch_rule(*ops)(dim_rule(pos, none_means_all=none_means_all))


# -- the table: one line adds an op of a known kind ---------------------------------------
# reductions over a dim at position 1 (an int, a list, or None = all dims)
reducer(aten.sum.dim_IntList, aten.mean.dim, aten.nansum.default, aten.nanmean.default, aten.amax.default,
        aten.amin.default, aten.logsumexp.default, aten.prod.dim_int, aten.any.dim, aten.any.dims, aten.all.dim,
        aten.all.dims, aten.count_nonzero.dim_IntList, aten.max.dim, aten.min.dim,
        aten.var.correction, aten.std.correction, aten.var_mean.correction, aten.std_mean.correction)
# one dim at position 1, never "all dims": scans, softmaxes, order statistics, glu
reducer(aten.cumsum.default, aten.cumprod.default, aten.cummax.default, aten.cummin.default,
        aten.logcumsumexp.default, aten._softmax.default, aten._log_softmax.default, aten.softmax.int,
        aten.log_softmax.int, aten.sort.default, aten.argsort.default, aten.median.dim, aten.nanmedian.dim,
        aten.mode.default, aten.glu.default, none_means_all=False)
# the kernel itself, not its decomposition (softmax + where): differentiated around vmap, the
# decomposition's softmax of an all -inf row gave nan gradients where the kernel's formula gives 0
reducer(aten._safe_softmax.default, none_means_all=False)
# one dim at position 2: after k, after `stable`, after the grad_output of the same shape
reducer(aten.kthvalue.default, aten.sort.stable, aten.argsort.stable, aten._softmax_backward_data.default,
        aten._log_softmax_backward_data.default, pos=2, none_means_all=False)
# torch 2.5+: hash_tensor(self, dim=[] (all dims), *, keepdim, mode), a reduction over dim
if hasattr(aten, "hash_tensor"):
    reducer(aten.hash_tensor.default)


@batch_rule(aten.topk.default)
def topk(op, args, kwargs, dims):
    x = args[0]
    k = args[1]
    d = args[2] if len(args) > 2 else kwargs.pop("dim", -1)
    r = rank(x, 0)
    if r == 0:
        wrap_dim(d, 0)
        values, indices = op(x.unsqueeze(1), k, 1, *args[3:], **kwargs)
        return (values.squeeze(1), indices.squeeze(1)), 0
    return op(x, k, physical_dim(d, r), *args[3:], **kwargs), 0


@batch_rule(aten.sum.default, aten.mean.default, aten.prod.default)
def reduce_all(op, args, kwargs, dims):
    x = args[0]
    flat = flat_examples(x)
    dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
    if op is aten.sum.default:
        return aten.sum.dim_IntList(flat, [1], False, dtype=dtype), 0
    if op is aten.mean.default:
        return aten.mean.dim(flat, [1], False, dtype=dtype), 0
    return aten.prod.dim_int(flat, 1, False, dtype=dtype), 0


@batch_rule(aten.max.default, aten.min.default, aten.any.default, aten.all.default)
def max_all(op, args, kwargs, dims):
    x = args[0]
    flat = flat_examples(x)
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
        out = op(flat_examples(x), 1, False)
        if keepdim:
            out = out.reshape((x.shape[0],) + (1,) * r)
        return out, 0
    if r == 0:
        wrap_dim(d, 0)
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
        mn, mx = op(flat_examples(x), dim=1, keepdim=False)
        if keepdim:
            shape = (x.shape[0],) + (1,) * r
            mn, mx = mn.reshape(shape), mx.reshape(shape)
        return (mn, mx), 0
    return op(x, dim=physical_dim(d, r), keepdim=keepdim), 0



@batch_rule(aten.median.default, aten.nanmedian.default)
def median_all(op, args, kwargs, dims):
    # the (lower) median of all elements of each example
    x = args[0]
    flat = flat_examples(x)
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
        hist = hist / flat_examples(hist, B).sum(1).reshape((B,) + (1,) * N)
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
    args, kwargs, dims = normalize_args(op, args, kwargs, dims)
    x, bins, lo, hi = args
    _check_hist_input(x, [bins])
    B = x.shape[0]
    flat = x.reshape(B, -1, 1)
    lo, hi = float(lo), float(hi)
    if lo == hi and flat.shape[1] > 0:  # per example, the data's range
        lo, hi = (t.to(torch.float64) for t in aten.aminmax.default(flat_examples(flat, B), dim=1))
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
    args, kwargs, dims = normalize_args(op, args, kwargs, dims)
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
        edges = [flat_examples(materialize(bins, dims[1], B), B)]
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
        edges = [flat_examples(materialize(b, d, B), B) for b, d in zip(bins, bdims)]
        algorithm = "binary"
    return _histogram(xm, edges, w, density, algorithm), 0
